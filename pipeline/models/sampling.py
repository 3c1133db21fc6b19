"""Seeded sampling from a generator, shared by training (sample grids, FID at intervals), the benchmark, the
registered pyfunc and `sketchgan generate`.

An image of `render` is a pure function of (weights, seed, ψ): a seed's latent comes from its own RNG, the
per-layer noise is the generator's fixed noise buffers, and the truncation centre is the mean of W over a
fixed set of latents; so the same seed gives the same image in any batch, process or machine (up to float
rounding). `generate_batches` is the benchmark's protocol instead: one RNG seeded once for a whole sample set.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

MEAN_LATENT_SEED = 0x5EED
MEAN_LATENT_SAMPLES = 4096
BATCH = 16


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Model output in [-1, 1] (N x 3 x H x W) -> uint8 N x H x W x 3, rounded as when saving a PNG."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected generated images N x 3 x H x W, got shape {tuple(images.shape)}")
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).add_(0.5).floor_().clamp_(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def latents_for_seeds(seeds: list[int], style_dim: int) -> torch.Tensor:
    """One z per seed, each from its own RNG (so a seed's latent does not depend on its batch)."""
    return torch.stack([torch.randn(style_dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def mean_w(G: torch.nn.Module, device) -> torch.Tensor:
    """The truncation centre: mean of W over a fixed set of latents (1 x style_dim)."""
    z = torch.randn(MEAN_LATENT_SAMPLES, G.style_dim, generator=torch.Generator().manual_seed(MEAN_LATENT_SEED))
    return G.get_latent(z.to(device)).mean(0, keepdim=True)


@torch.no_grad()
def synthesize(G: torch.nn.Module, w: torch.Tensor) -> np.ndarray:
    """W latents (N x style_dim) -> uint8 N x H x W x 3 with the generator's fixed noise."""
    out = [to_uint8(G([w[i:i + BATCH]], input_is_latent=True, randomize_noise=False)[0])
           for i in range(0, w.shape[0], BATCH)]
    return np.concatenate(out) if out else np.zeros((0, G.size, G.size, 3), np.uint8)


@torch.no_grad()
def truncated_w(G: torch.nn.Module, seeds: list[int], psi: list[float], device, centre=None) -> torch.Tensor:
    w = G.get_latent(latents_for_seeds(seeds, G.style_dim).to(device))
    if any(p < 1 for p in psi):
        centre = mean_w(G, device) if centre is None else centre
        p = torch.tensor(psi, dtype=w.dtype, device=device)[:, None]
        w = centre + p * (w - centre)
    return w


def render(G: torch.nn.Module, seeds: list[int], psi: list[float], device, centre=None) -> np.ndarray:
    """Images for seeds (uint8 N x H x W x 3), each with its own truncation ψ."""
    return synthesize(G, truncated_w(G, seeds, psi, device, centre))


def interpolate(G: torch.nn.Module, seed_a: int, seed_b: int, steps: int, psi: float, device) -> np.ndarray:
    """``steps`` images along the straight line in W between two seeds' (truncated) latents."""
    w = truncated_w(G, [seed_a, seed_b], [psi, psi], device)
    t = torch.linspace(0, 1, steps, device=device, dtype=w.dtype)[:, None]
    return synthesize(G, w[0:1] * (1 - t) + w[1:2] * t)


def check_truncation(psi: float, where: str = "truncation") -> float:
    psi = float(psi)
    if not (math.isfinite(psi) and 0 < psi <= 1):
        raise ValueError(f"{where}: truncation ψ must be in (0, 1], got {psi}")
    return psi


def generate_batches(generator, n: int, seed: int, truncation: float, batch_size: int, device,
                     style_dim: int | None = None) -> Iterator[np.ndarray]:
    """Yield ``n`` samples as uint8 N x H x W x 3 batches (same seed, same latents on any device)."""
    style_dim = style_dim or getattr(generator, "style_dim", None) or 512
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the generator's per-layer noise
    with torch.no_grad():
        mean = generator.mean_latent(4096) if truncation < 1 else None
        for start in range(0, n, batch_size):
            z = torch.randn(min(batch_size, n - start), style_dim, generator=gen).to(device)
            out = generator([z], truncation=truncation, truncation_latent=mean)
            images = out[0] if isinstance(out, tuple | list) else out
            yield to_uint8(images)


@torch.no_grad()
def sample_grid_images(G: torch.nn.Module, z: torch.Tensor, device) -> np.ndarray:
    """G's images for fixed latents and its fixed noise (uint8), leaving G's train/eval mode as it was."""
    was_training = G.training
    G.eval()
    try:
        return to_uint8(G([z.to(device)], randomize_noise=False)[0])
    finally:
        G.train(was_training)
