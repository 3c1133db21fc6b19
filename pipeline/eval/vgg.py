"""VGG-16 from supplied weights (torchvision's layout, by path or URI; nothing is downloaded): the network behind
LPIPS and the feature space of improved precision and recall (Kynkäänniemi et al. use its fc2 activations)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_vgg16(weights_uri: str) -> nn.Module:
    """torchvision's VGG-16 with the weights at ``weights_uri`` (strictly checked), frozen, in eval mode."""
    import torchvision

    from pipeline.models.checkpoints import load_state_dict

    vgg = torchvision.models.vgg16(weights=None)
    try:
        vgg.load_state_dict(load_state_dict(weights_uri), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{weights_uri}: not torchvision's vgg16 state dict ({str(exc).splitlines()[0]})") from None
    return vgg.eval().requires_grad_(False)


class VGG16Features(nn.Module):
    """uint8 N x H x W x 3 images -> their 4096-d fc2 activations (after its ReLU), images resized to 224 px."""

    name = "vgg16-fc2"

    def __init__(self, weights_uri: str):
        super().__init__()
        vgg = load_vgg16(weights_uri)
        self.features, self.avgpool, self.fc = vgg.features, vgg.avgpool, vgg.classifier[:5]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, images: np.ndarray) -> np.ndarray:
        device = self.mean.device
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().to(device) / 255.0
        x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        x = self.features((x - self.mean) / self.std)
        return self.fc(torch.flatten(self.avgpool(x), 1)).cpu().numpy()
