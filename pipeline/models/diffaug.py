"""Differentiable augmentation (DiffAugment, Zhao et al. 2020) for the discriminators' inputs.

Policies: ``translation`` (shift by up to 1/8 of the size, zero fill), ``cutout`` (a square of half the size
set to zero), ``color`` (brightness, saturation, contrast). Combine them as ``"color,translation,cutout"``;
``""`` is none. Each sample gets its own random parameters; randomness comes from an optional
``torch.Generator`` so that training can be resumed exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POLICIES = ("color", "translation", "cutout")


def parse_policy(policy: str) -> list[str]:
    """Split a comma-separated policy; an unknown name is an error naming it."""
    names = [p.strip() for p in (policy or "").split(",") if p.strip()]
    for name in names:
        if name not in POLICIES:
            raise ValueError(f"unknown augmentation policy {name!r} (known: {', '.join(POLICIES)})")
    return names


def _rand(shape, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator).to(x.device, x.dtype)


def _randint(low: int, high: int, shape, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=generator).to(x.device)


def color(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    b = x.shape[0]
    x = x + (_rand((b, 1, 1, 1), x, generator) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand((b, 1, 1, 1), x, generator) * 2) + mean
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (_rand((b, 1, 1, 1), x, generator) + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = 0.125, generator: torch.Generator | None = None) -> torch.Tensor:
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    tx = _randint(-sh, sh + 1, (b, 1, 1), x, generator)
    ty = _randint(-sw, sw + 1, (b, 1, 1), x, generator)
    gy = torch.arange(h, device=x.device).view(1, h, 1)
    gx = torch.arange(w, device=x.device).view(1, 1, w)
    # pad by one zero pixel and clamp into it, so shifted-in areas are zero
    iy = torch.clamp(gy + tx + 1, 0, h + 1).expand(b, h, w)
    ix = torch.clamp(gx + ty + 1, 0, w + 1).expand(b, h, w)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)  # b, h+2, w+2, c
    bi = torch.arange(b, device=x.device).view(b, 1, 1).expand(b, h, w)
    return padded[bi, iy, ix].permute(0, 3, 1, 2)  # NHWC in memory, what the convolutions prefer


def cutout(x: torch.Tensor, ratio: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    oy = _randint(0, h + (1 - ch % 2), (b, 1, 1), x, generator)
    ox = _randint(0, w + (1 - cw % 2), (b, 1, 1), x, generator)
    gy = torch.arange(h, device=x.device).view(1, h, 1)
    gx = torch.arange(w, device=x.device).view(1, 1, w)
    inside_y = (gy >= oy - ch // 2) & (gy < oy - ch // 2 + ch)
    inside_x = (gx >= ox - cw // 2) & (gx < ox - cw // 2 + cw)
    mask = ~(inside_y & inside_x)
    return x * mask.unsqueeze(1).to(x.dtype)


_FUNCS = {"color": color, "translation": translation, "cutout": cutout}


class DiffAugment:
    """Callable applying a parsed policy; validates the policy when built."""

    def __init__(self, policy: str):
        self.names = parse_policy(policy)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for name in self.names:
            x = _FUNCS[name](x, generator=generator)
        return x

    def __bool__(self) -> bool:
        return bool(self.names)
