"""GAN losses, R1, the weight regulariser, and the transform chains before the sketch discriminator (pure PyTorch)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

GAN_LOSSES = ("softplus", "hinge", "lsgan")


# -- losses --------------------------------------------------------------------------------------------
def d_loss(real_pred: torch.Tensor, fake_pred: torch.Tensor, kind: str = "softplus") -> torch.Tensor:
    if kind == "softplus":
        return F.softplus(-real_pred).mean() + F.softplus(fake_pred).mean()
    if kind == "hinge":
        return F.relu(1 - real_pred).mean() + F.relu(1 + fake_pred).mean()
    if kind == "lsgan":  # GANSketching's "ls": mean squared error to the labels 1 and 0
        return (real_pred - 1).square().mean() + fake_pred.square().mean()
    raise ValueError(f"unknown GAN loss {kind!r} (known: {', '.join(GAN_LOSSES)})")


def g_loss(fake_pred: torch.Tensor, kind: str = "softplus") -> torch.Tensor:
    if kind == "softplus":
        return F.softplus(-fake_pred).mean()
    if kind == "hinge":
        return -fake_pred.mean()
    if kind == "lsgan":
        return (fake_pred - 1).square().mean()
    raise ValueError(f"unknown GAN loss {kind!r} (known: {', '.join(GAN_LOSSES)})")


def r1_penalty(real_pred: torch.Tensor, real_input: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ‖∇_x D(x)‖² (``real_input`` must be a leaf that requires grad)."""
    # backward(inputs=...) rather than autograd.grad: same graph, and FLOP counters can follow it
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        # patch outputs are averaged per sample first, as GANSketching's RegularizeD does
        real_pred.float().reshape(real_pred.shape[0], -1).mean(1).sum().backward(inputs=[real_input],
                                                                                 create_graph=True)
    grad, real_input.grad = real_input.grad, None  # drop the reference cycle backward() creates
    return grad.float().square().reshape(grad.shape[0], -1).sum(1).mean()


def weight_loss(params: list[torch.Tensor], originals: list[torch.Tensor]) -> torch.Tensor:
    """Average over the trained tensors of each tensor's mean |θ − θ₀|."""
    terms = [(p - p0).abs().mean() for p, p0 in zip(params, originals)]
    return torch.stack(terms).mean()


# -- transforms before the sketch discriminator --------------------------------------------------------
def parse_transform(chain: str) -> list[tuple[str, int]]:
    """``"down2,toSketch,up2,to3ch"`` -> [(down, 2), (toSketch, 0), (up, 2), (to3ch, 0)]; unknown tokens refused."""
    out = []
    for token in (t.strip() for t in chain.split(",") if t.strip()):
        if token in ("toSketch", "to3ch"):
            out.append((token, 0))
        elif token[:4] in ("down",) and token[4:].isdigit():
            out.append(("down", int(token[4:])))
        elif token[:2] == "up" and token[2:].isdigit():
            out.append(("up", int(token[2:])))
        else:
            raise ValueError(f"unknown transform {token!r} in {chain!r} (known: toSketch, to3ch, downN, upN)")
    return out


def apply_transform(x: torch.Tensor, steps: list[tuple[str, int]], sketcher: nn.Module | None) -> torch.Tensor:
    for name, n in steps:
        if name == "toSketch":
            if sketcher is None:
                raise ValueError("transform toSketch needs a sketcher")
            x = sketcher(x)
        elif name == "to3ch":
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        elif name == "down":
            x = F.interpolate(x, scale_factor=0.5**n, mode="bicubic", align_corners=False)
        elif name == "up":
            x = F.interpolate(x, scale_factor=2**n, mode="bicubic", align_corners=False)
    return x
