"""LPIPS (Zhang et al. 2018), VGG variant: the perceptual distance of PPL and of projection.

Images in [-1, 1] pass LPIPS's scaling layer (shift [-0.030, -0.088, -0.188], scale [0.458, 0.448, 0.450]) and
torchvision's VGG-16 ``features`` up to relu5_3; at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 the features
are unit-normalised over channels, their squared difference weighted per channel by LPIPS's linear layers
(the ``lpips`` package's ``weights/v0.1/vgg.pth``: ``lin{i}.model.1.weight``, 1 x C x 1 x 1), averaged over
space and summed over layers. Without linear weights every channel weighs 1 (LPIPS's "baseline" variant).
Both files are supplied by path or URI (nothing is downloaded).
"""

from __future__ import annotations

import torch
from torch import nn

LAYERS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16.features
CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """``lpips(a, b)`` -> one distance per pair of images (N x 3 x H x W in [-1, 1])."""

    def __init__(self, vgg_weights: str, lpips_weights: str | None = None):
        from pipeline.eval.vgg import load_vgg16
        from pipeline.models.checkpoints import load_state_dict

        super().__init__()
        self.features = load_vgg16(vgg_weights).features[:LAYERS[-1] + 1]
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        weights = [torch.ones(1, c, 1, 1) for c in CHANNELS]
        if lpips_weights:
            state = load_state_dict(lpips_weights)
            for i, c in enumerate(CHANNELS):
                key = f"lin{i}.model.1.weight"
                if key not in state or tuple(state[key].shape) != (1, c, 1, 1):
                    have = tuple(state[key].shape) if key in state else "missing"
                    raise ValueError(f"{lpips_weights}: not LPIPS's VGG linear weights ({key}: expected "
                                     f"1 x {c} x 1 x 1, got {have})")
                weights[i] = state[key].float()
        for i, w in enumerate(weights):
            self.register_buffer(f"lin{i}", w)

    def feats(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised features at LPIPS's five layers."""
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LAYERS:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def compare(self, fa: list[torch.Tensor], fb: list[torch.Tensor]) -> torch.Tensor:
        """The distance per pair from two `feats` lists."""
        total = 0
        for i, (a, b) in enumerate(zip(fa, fb)):
            total = total + ((a - b).pow(2) * getattr(self, f"lin{i}")).sum(1).mean((1, 2))
        return total

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.compare(self.feats(a), self.feats(b))
