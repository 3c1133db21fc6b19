"""Image -> sketch networks behind one interface: [-1, 1] B×3×H×W images to differentiable
[-1, 1] B×1×H×W sketches, dark lines (-1) on white (+1).

``photosketch`` is the PhotoSketch network (needs its published weights); ``edges`` is a weight-free
contour extractor (blurred colour gradients, soft-thresholded) so that the demo and tests run anywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SKETCHERS = ("edges", "photosketch")
PRECISIONS = ("auto", "fp32", "bf16")


class EdgeSketcher(nn.Module):
    """Differentiable contours: Gaussian blur, Sobel gradients of every colour channel, soft threshold."""

    def __init__(self, sigma: float = 1.0, threshold: float = 0.35):
        super().__init__()
        radius = max(1, int(2 * sigma + 0.5))
        t = torch.arange(-radius, radius + 1, dtype=torch.float32)
        g = torch.exp(-(t**2) / (2 * sigma**2))
        g = g / g.sum()
        self.register_buffer("blur", (g[:, None] * g[None, :])[None, None], persistent=False)
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 4
        self.register_buffer("sobel", torch.stack([sobel, sobel.t()])[:, None], persistent=False)
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = x.reshape(b * c, 1, h, w) * 0.5 + 0.5
        pad = self.blur.shape[-1] // 2
        y = F.conv2d(F.pad(y, [pad] * 4, mode="replicate"), self.blur.to(y.dtype))
        grad = F.conv2d(F.pad(y, [1] * 4, mode="replicate"), self.sobel.to(y.dtype))
        mag = grad.square().sum(1).reshape(b, c, h, w).sum(1, keepdim=True)
        strength = torch.tanh(torch.sqrt(mag + 1e-6) / self.threshold)
        return 1.0 - 2.0 * strength


class PhotoSketchSketcher(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _needs_weights() -> ValueError:
    return ValueError("the photosketch sketcher needs its weights: set data.sketcher_weights (or pass "
                      "--sketcher-weights) to the PhotoSketch checkpoint, e.g. photosketch.pth from the "
                      "PhotoSketch release; or use sketcher 'edges', which needs none")


def build_sketcher(name: str, weights_uri: str | None = None, norm: str = "batch",
                   device: torch.device | str | None = None) -> nn.Module:
    """A frozen sketcher by name. ``norm`` is PhotoSketch's batch-norm mode (``batch`` or ``per_image``)."""
    if name == "edges":
        net: nn.Module = EdgeSketcher()
    elif name == "photosketch":
        if not weights_uri:
            raise _needs_weights()
        from pipeline.models.checkpoints import load_into, load_state_dict
        from pipeline.models.photosketch import PhotoSketch

        ps = PhotoSketch(norm=norm)
        load_into(ps, load_state_dict(weights_uri), source=weights_uri)
        net = PhotoSketchSketcher(ps)
    else:
        raise ValueError(f"unknown sketcher {name!r} (known: {', '.join(SKETCHERS)})")
    net.requires_grad_(False)
    net.eval()
    return net.to(device) if device is not None else net


def sketcher_fingerprint(name: str, weights_uri: str | None = None) -> str:
    """``name:sha256-of-weights`` (``edges:none``): recorded with every dataset and run."""
    if name not in SKETCHERS:
        raise ValueError(f"unknown sketcher {name!r} (known: {', '.join(SKETCHERS)})")
    if name == "edges":
        return "edges:none"
    if not weights_uri:
        raise _needs_weights()
    from pipeline.models.checkpoints import sha256_of

    return f"{name}:{sha256_of(weights_uri)}"


def has_fast_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: a CUDA GPU that supports bf16, or a CPU with
    AMX tiles or AVX-512 BF16 (where oneDNN's bf16 convolutions run several times faster than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    # torch exposes the CPU feature checks only under private names; without them, assume none
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check() for check in checks if check is not None)


def resolve_sketch_precision(sketcher: str, setting: str, gpus: bool = False) -> str:
    """The dtype the preprocess stage sketches in: ``fp32`` or ``bf16``. ``auto`` picks bf16 for PhotoSketch
    on GPU clusters (``gpus``) and on CPUs with bf16 matrix units, fp32 otherwise; the weight-free ``edges``
    sketcher always runs in fp32 (it costs little next to decoding)."""
    if setting not in PRECISIONS:
        raise ValueError(f"data.sketch_precision {setting!r} is not one of {', '.join(PRECISIONS)}")
    if sketcher == "edges":
        return "fp32"
    if setting != "auto":
        return setting
    return "bf16" if gpus or has_fast_bf16("cpu") else "fp32"
