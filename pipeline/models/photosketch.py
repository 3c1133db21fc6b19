"""PhotoSketch (Li et al., 2019): the pix2pix ResNet generator that maps photos to contour sketches.

Key layout ``model.N.*`` equals the official checkpoint's. Both upstream programs run the network in
training mode, so batch norm always normalises with the statistics of what it is given, never with the
stored running averages: ``per_image`` (PhotoSketch's own inference, one photo at a time, computed here
for a whole batch in one call) or ``batch`` (statistics pooled over the batch, as GANSketching trains).

The network runs channels-last in both modes and in any floating dtype: ``net.to(torch.bfloat16)`` is the
preprocess stage's fast path on hardware with bf16 matrix units (see ``pipeline.models.sketchers``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORM_MODES = ("per_image", "batch")


class BatchStatNorm(nn.BatchNorm2d):
    """BatchNorm2d (same parameters and buffers) that always uses the statistics of its input."""

    def __init__(self, channels: int, mode: str = "per_image"):
        super().__init__(channels)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "per_image":
            # Batch-norm statistics of one image at a time == instance norm with BN's affine parameters ==
            # group norm with one group per channel, whose CPU kernel works on channels-last (and bf16) tensors
            # in place of instance_norm's reshape-and-copy.
            return F.group_norm(x, x.shape[1], self.weight, self.bias, self.eps)
        return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=False), BatchStatNorm(dim, mode), nn.ReLU(True),
            nn.Identity(),  # the checkpoint's slot for dropout, which PhotoSketch leaves off
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=False), BatchStatNorm(dim, mode),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class PhotoSketch(nn.Module):
    """Photo ([-1, 1], B×3×H×W) -> sketch ([-1, 1], B×1×H×W, dark lines on white)."""

    def __init__(self, norm: str = "per_image", ngf: int = 64, n_blocks: int = 9, in_channels: int = 3,
                 out_channels: int = 1):
        super().__init__()
        if norm not in NORM_MODES:
            raise ValueError(f"PhotoSketch norm {norm!r} is not one of {', '.join(NORM_MODES)}")
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7, bias=False),
                                   BatchStatNorm(ngf, norm), nn.ReLU(True)]
        for i in range(2):
            mult = 2**i
            layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=False),
                       BatchStatNorm(ngf * mult * 2, norm), nn.ReLU(True)]
        layers += [ResnetBlock(ngf * 4, norm) for _ in range(n_blocks)]
        for i in range(2):
            mult = 2 ** (2 - i)
            layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1,
                                          bias=False),
                       BatchStatNorm(ngf * mult // 2, norm), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        self._norm = norm

    @property
    def norm(self) -> str:
        return self._norm

    @norm.setter
    def norm(self, mode: str) -> None:
        if mode not in NORM_MODES:
            raise ValueError(f"PhotoSketch norm {mode!r} is not one of {', '.join(NORM_MODES)}")
        self._norm = mode
        for m in self.modules():
            if isinstance(m, BatchStatNorm):
                m.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # oneDNN's convolutions and both norms are faster channels-last
        x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).contiguous()
