"""The metrics GANSketching reports beside FID, and one it does not.

- `precision_recall`: improved precision and recall (Kynkäänniemi et al. 2019). Each point's radius is the
  distance to its k-th nearest neighbour in its own set (itself excluded); precision is the share of fake points
  inside some real point's radius, recall the share of real points inside some fake point's radius. Distances
  are computed block by block, so 50,000 x 50,000 features need a few hundred MB, not 10 GB.
- `path_length`: perceptual path length in W with end points (StyleGAN; GANSketching's ``eval/ppl.py``): for
  pairs of latents, the distance between the images at w0 and at w0 + ε (w1 - w0), divided by ε², values
  outside the 1st-99th percentiles dropped, then averaged.
- `sketch_fidelity`: how close the sketches of generated images are to the user's: for each generated sketch,
  the symmetric chamfer distance between its lines and those of its nearest user sketch (mean distance from
  each line pixel to the other drawing's nearest line pixel, in units of the image width, both ways averaged);
  the mean over samples. Lower is closer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

PPL_EPSILON = 1e-4


def _kth_neighbour_radii(x: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row."""
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, got {n}")
    radii = torch.empty(n, dtype=x.dtype)
    for i in range(0, n, block):
        rows = x[i:i + block]
        best = torch.full((rows.shape[0], k + 1), float("inf"), dtype=x.dtype)
        for j in range(0, n, block):
            d = torch.cdist(rows, x[j:j + block])
            best = torch.topk(torch.cat([best, d], 1), k + 1, dim=1, largest=False).values
        radii[i:i + block] = best[:, k]  # column 0 is the point itself (distance 0)
    return radii


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> torch.Tensor:
    """For each point: inside the ball of at least one centre."""
    out = torch.zeros(points.shape[0], dtype=torch.bool)
    for i in range(0, points.shape[0], block):
        rows = points[i:i + block]
        hit = torch.zeros(rows.shape[0], dtype=torch.bool)
        for j in range(0, centres.shape[0], block):
            hit |= (torch.cdist(rows, centres[j:j + block]) <= radii[j:j + block][None, :]).any(1)
        out[i:i + block] = hit
    return out


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3,
                     block: int = 2048) -> tuple[float, float]:
    """Improved precision and recall of fake against real features (N x D each)."""
    # float64 copies: the inputs may be read-only views (of cached statistics), which torch warns about
    real = torch.tensor(np.asarray(real_features, dtype=np.float64))
    fake = torch.tensor(np.asarray(fake_features, dtype=np.float64))
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision/recall needs N x D features of one width, got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}")
    real_r = _kth_neighbour_radii(real, k, block)
    fake_r = _kth_neighbour_radii(fake, k, block)
    precision = _covered(fake, real, real_r, block).double().mean().item()
    recall = _covered(real, fake, fake_r, block).double().mean().item()
    return precision, recall


@torch.no_grad()
def path_length(mapping: Callable[[torch.Tensor], torch.Tensor], synthesis: Callable[[torch.Tensor], torch.Tensor],
                distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], style_dim: int, n: int = 1000,
                batch: int = 50, seed: int = 0, epsilon: float = PPL_EPSILON, device="cpu") -> float:
    """PPL in W with end points: mean of the filtered d(G(w0), G(w0 + ε(w1 - w0))) / ε² over ``n`` pairs.
    ``distance`` maps two image batches to one value per pair (LPIPS in the paper)."""
    gen = torch.Generator().manual_seed(seed)
    values = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        z = torch.randn(2 * m, style_dim, generator=gen).to(device)
        w = mapping(z)
        w0, w1 = w[:m], w[m:]
        images = synthesis(torch.cat([w0, w0 + epsilon * (w1 - w0)]))
        values.append((distance(images[:m], images[m:]) / epsilon**2).double().cpu())
    dist = torch.cat(values).numpy()
    lo, hi = np.percentile(dist, 1, method="lower"), np.percentile(dist, 99, method="higher")
    return float(dist[(dist >= lo) & (dist <= hi)].mean())


def _line_maps(sketches: np.ndarray) -> np.ndarray:
    return np.asarray(sketches) < 128  # dark lines on white, as every sketcher draws them


def _distance_maps(lines: np.ndarray) -> np.ndarray:
    from scipy.ndimage import distance_transform_edt

    size = lines.shape[-1]
    out = np.empty(lines.shape, np.float64)
    for i, m in enumerate(lines):
        out[i] = distance_transform_edt(~m) / size if m.any() else np.full(m.shape, np.sqrt(2.0))
    return out


def chamfer(lines_a: np.ndarray, dt_a: np.ndarray, lines_b: np.ndarray, dt_b: np.ndarray) -> float:
    """Symmetric chamfer distance of two line maps (with their distance transforms), in image widths; a drawing
    without lines is √2 (the image's diagonal) from any other."""
    if not lines_a.any() or not lines_b.any():
        return 0.0 if not lines_a.any() and not lines_b.any() else float(np.sqrt(2.0))
    return 0.5 * (dt_b[lines_a].mean() + dt_a[lines_b].mean())


def sketch_fidelity(generated: np.ndarray, user: np.ndarray) -> float:
    """Mean over generated sketches (uint8 N x H x W) of the chamfer distance to the nearest user sketch (same
    size)."""
    if generated.shape[1:] != user.shape[1:]:
        raise ValueError(f"sketch fidelity needs sketches of one size, got {generated.shape[1:]} and "
                         f"{user.shape[1:]}")
    g_lines, u_lines = _line_maps(generated), _line_maps(user)
    g_dt, u_dt = _distance_maps(g_lines), _distance_maps(u_lines)
    return float(np.mean([min(chamfer(g_lines[i], g_dt[i], u_lines[j], u_dt[j]) for j in range(len(user)))
                          for i in range(len(generated))]))
