"""GANSpace directions (Härkönen et al. 2020) in a generator's W space, stored in GANSpace's npz layout.

The layout is the one of GANSketching's published ``weights/ganspace_{cat,horse,church}.npz``: ``lat_comp``
(components x 1 x style_dim, orthonormal rows, by decreasing variance), ``lat_mean`` (1 x style_dim, the mean
of W) and ``lat_stdev`` (the standard deviation of W along each component). An edit ``COMP:SCALAR:FIRST-LAST``
adds ``SCALAR`` standard deviations of component ``COMP`` to the W+ latents of layers ``FIRST`` to ``LAST``
(inclusive) before truncation, as GANSketching's ``ganspace.py`` does; the same components serve every model
customised from the base, whose synthesis network they index.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import storage

KEYS = ("lat_comp", "lat_mean", "lat_stdev")
DEFAULT_SAMPLES = 100_000
DEFAULT_SEED = 0x6A5
MAX_COMPONENTS = 80  # GANSpace's default for StyleGAN2


class ComponentsError(ValueError):
    """A components file that cannot be used (missing keys, wrong shapes, not finite)."""


@dataclass(frozen=True)
class Components:
    comp: torch.Tensor  # K x D, orthonormal rows
    mean: torch.Tensor  # D
    stdev: torch.Tensor  # K

    @property
    def style_dim(self) -> int:
        return self.comp.shape[1]


@dataclass(frozen=True)
class Edit:
    component: int
    scalar: float
    first: int
    last: int

    def __str__(self) -> str:
        return f"{self.component}:{self.scalar:g}:{self.first}-{self.last}"


_EDIT = re.compile(r"^\s*(\d+)\s*:\s*([-+]?[0-9.eE+-]+)\s*:\s*(\d+)\s*-\s*(\d+)\s*$")


def parse_edit(text: str) -> Edit:
    """``COMP:SCALAR:FIRST-LAST`` (e.g. ``27:50:2-4``, GANSketching's "add fur") -> `Edit`."""
    m = _EDIT.match(text)
    if not m:
        raise ValueError(f"--edit {text!r}: expected COMP:SCALAR:FIRST-LAST, e.g. 27:50:2-4")
    comp, first, last = int(m.group(1)), int(m.group(3)), int(m.group(4))
    try:
        scalar = float(m.group(2))
    except ValueError:
        raise ValueError(f"--edit {text!r}: the scalar {m.group(2)!r} is not a number") from None
    if not math.isfinite(scalar):
        raise ValueError(f"--edit {text!r}: the scalar must be finite")
    if first > last:
        raise ValueError(f"--edit {text!r}: layer range {first}-{last} is empty (FIRST must be <= LAST)")
    return Edit(comp, scalar, first, last)


@torch.no_grad()
def compute(G: torch.nn.Module, n_samples: int = DEFAULT_SAMPLES, n_components: int | None = None,
            seed: int = DEFAULT_SEED, batch: int = 8192) -> Components:
    """PCA of W = mapping(z) over ``n_samples`` seeded z: the top components (signs fixed so each one's largest
    entry is positive), the mean and the standard deviation along each component."""
    d = G.style_dim
    k = min(n_components or MAX_COMPONENTS, d)
    if n_samples < 2 * d:
        raise ValueError(f"GANSpace needs at least {2 * d} samples for style_dim {d}, got {n_samples}")
    gen = torch.Generator().manual_seed(seed)
    device = next(G.parameters()).device
    total = torch.zeros(d, dtype=torch.float64)
    gram = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, n_samples, batch):
        z = torch.randn(min(batch, n_samples - start), d, generator=gen)
        w = G.get_latent(z.to(device)).double().cpu()
        total += w.sum(0)
        gram += w.T @ w
    mean = total / n_samples
    cov = (gram - n_samples * torch.outer(mean, mean)) / (n_samples - 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(evals, descending=True)[:k]
    comp = evecs[:, order].T.contiguous()  # K x D
    sign = torch.sign(comp.gather(1, comp.abs().argmax(1, keepdim=True)))
    comp = comp * sign
    stdev = evals[order].clamp_min(0).sqrt()
    return Components(comp.float(), mean.float(), stdev.float())


def to_npz(c: Components, info: dict | None = None) -> bytes:
    """GANSpace's layout (float32); ``info`` (how it was computed) rides along as a JSON string."""
    buf = io.BytesIO()
    extra = {"sketchgan_info": np.array(json.dumps(info or {}, sort_keys=True))}
    np.savez_compressed(buf, lat_comp=c.comp.numpy()[:, None, :].astype(np.float32),
                        lat_mean=c.mean.numpy()[None, :].astype(np.float32),
                        lat_stdev=c.stdev.numpy().astype(np.float32), **extra)
    return buf.getvalue()


def load(uri: str) -> Components:
    """A components npz (ours or GANSpace's/GANSketching's published files), shapes and values checked."""
    try:
        data = np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ComponentsError(f"{uri}: not a readable npz file ({exc})") from None
    missing = [k for k in KEYS if k not in data.files]
    if missing:
        raise ComponentsError(f"{uri}: missing key(s) {missing} (a GANSpace file holds {list(KEYS)})")
    comp, mean, stdev = (np.asarray(data[k], dtype=np.float64) for k in KEYS)
    if comp.ndim == 3 and comp.shape[1] == 1:
        comp = comp[:, 0, :]
    if comp.ndim != 2:
        raise ComponentsError(f"{uri}: lat_comp has shape {data['lat_comp'].shape}, expected K x 1 x D or K x D")
    k, d = comp.shape
    mean = mean.reshape(-1)
    if mean.shape != (d,):
        raise ComponentsError(f"{uri}: lat_mean has shape {data['lat_mean'].shape}, expected 1 x {d}")
    stdev = stdev.reshape(-1)
    if stdev.shape != (k,):
        raise ComponentsError(f"{uri}: lat_stdev has shape {data['lat_stdev'].shape}, expected ({k},)")
    for name, arr in zip(KEYS, (comp, mean, stdev)):
        if not np.isfinite(arr).all():
            raise ComponentsError(f"{uri}: {name} holds non-finite values")
    return Components(torch.from_numpy(comp).float(), torch.from_numpy(mean).float(),
                      torch.from_numpy(stdev).float())


def check_edits(edits: list[Edit], c: Components, n_latent: int, style_dim: int) -> None:
    """Every edit names an existing component and layers of this generator."""
    if c.style_dim != style_dim:
        raise ComponentsError(f"components are for style_dim {c.style_dim}, the generator has {style_dim}: "
                              "compute them for this model's base")
    for e in edits:
        if e.component >= c.comp.shape[0]:
            raise ValueError(f"--edit {e}: component {e.component} does not exist ({c.comp.shape[0]} components)")
        if e.last >= n_latent:
            raise ValueError(f"--edit {e}: layer {e.last} does not exist (this generator has W+ layers "
                             f"0-{n_latent - 1})")


def apply(w_plus: torch.Tensor, edits: list[Edit], c: Components) -> torch.Tensor:
    """W+ latents (N x L x D) with each edit's shift added to its layers (a new tensor)."""
    out = w_plus.clone()
    for e in edits:
        shift = c.comp[e.component].to(out) * (e.scalar * float(c.stdev[e.component]))
        out[:, e.first:e.last + 1, :] += shift
    return out


@torch.no_grad()
def render_edited(G: torch.nn.Module, seeds: list[int], psi: list[float], edits: list[Edit], c: Components, device,
                  centre: torch.Tensor | None = None) -> np.ndarray:
    """`sampling.render` with ``edits`` applied to each seed's W+ before its truncation (uint8 N x H x W x 3)."""
    from pipeline.models import sampling

    check_edits(edits, c, G.n_latent, G.style_dim)
    w = G.get_latent(sampling.latents_for_seeds(seeds, G.style_dim).to(device))
    w_plus = apply(w[:, None, :].repeat(1, G.n_latent, 1), edits, c)
    if any(p < 1 for p in psi):
        centre = (sampling.mean_w(G, device) if centre is None else centre)[:, None, :]
        p = torch.tensor(psi, dtype=w_plus.dtype, device=device)[:, None, None]
        w_plus = centre + p * (w_plus - centre)
    return sampling.synthesize(G, w_plus)
