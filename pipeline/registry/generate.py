"""Images from a registered model, a finished run, a base folder or a checkpoint: a grid of seeds, a latent
interpolation strip, GANSpace edits (with a before/after comparison) or a projected latent.

Samples use the registered pyfunc's seeding (`pipeline.models.sampling.render`): image i of a grid is seed
``S + i``, so a grid matches what ``predict`` returns for those seeds. An interpolation walks in W from seed S to
seed S+1 in ``n`` steps. Edits shift W+ before truncation (`pipeline.edit.ganspace`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from pipeline import storage
from pipeline.config import Config
from pipeline.data.images import grid_png, png_bytes

log = logging.getLogger("sketchgan.generate")

MAX_SAMPLES = 1024


@dataclass
class GenerateRequest:
    """What `sketchgan generate` draws (the CLI's flags)."""

    model: str
    n: int = 16
    truncation: float = 1.0
    seed: int = 0
    interpolate: bool = False
    edits: list[str] = field(default_factory=list)  # COMP:SCALAR:FIRST-LAST
    ganspace: str | None = None  # a components npz; default: the one beside the model's base
    compare: bool = False  # edits: a row without them above the row with them, same latents
    latent: str | None = None  # a latent written by `sketchgan project`, rendered instead of seeds


def _check(req: GenerateRequest) -> None:
    if not 1 <= req.n <= MAX_SAMPLES:
        raise ValueError(f"--n must be between 1 and {MAX_SAMPLES}, got {req.n}")
    if req.interpolate and req.n < 2:
        raise ValueError("--interpolate needs --n of at least 2 (the two end points)")
    if req.seed < 0:
        raise ValueError(f"--seed must be non-negative, got {req.seed}")
    if req.compare and not req.edits:
        raise ValueError("--compare shows a model before and after --edit: give at least one --edit")
    if req.latent and (req.interpolate or req.edits):
        raise ValueError("--latent renders a projected latent as it is: it cannot be combined with "
                         "--interpolate or --edit")


def generate_images(cfg: Config, req: GenerateRequest, device=None) -> tuple[np.ndarray, int | None]:
    """The images (uint8 N x H x W x 3) and the grid's columns (None: as square as possible)."""
    from pipeline.edit import bases, ganspace
    from pipeline.models import factory, sampling
    from pipeline.registry.mlflow_registry import resolve_model

    _check(req)
    psi = sampling.check_truncation(req.truncation, "--truncation")
    edits = [ganspace.parse_edit(e) for e in req.edits]
    resolved = resolve_model(req.model, cfg)
    if resolved.arch is None:
        log.info("%s has no recorded architecture: using the model section of the config", req.model)
    device = device or factory.device_default()
    G = resolved.load_generator(cfg, device)
    if req.latent:
        from pipeline.edit.projection import load_latent, render_latent

        return render_latent(G, load_latent(req.latent, G), device), None
    if req.interpolate:
        return sampling.interpolate(G, req.seed, req.seed + 1, req.n, psi, device), req.n
    seeds = list(range(req.seed, req.seed + req.n))
    if not edits:
        return sampling.render(G, seeds, [psi] * req.n, device), None
    comps = bases.components_for(resolved, req.ganspace)
    after = ganspace.render_edited(G, seeds, [psi] * req.n, edits, comps, device)
    if not req.compare:
        return after, None
    return np.concatenate([sampling.render(G, seeds, [psi] * req.n, device), after]), req.n


def write_images(cfg: Config, req: GenerateRequest, out: str) -> str:
    """Write `generate_images` as one PNG at ``out``; returns a summary line."""
    images, ncol = generate_images(cfg, req)
    save_images(images, ncol, out)
    kind = ("interpolation strip" if req.interpolate else "projected latent" if req.latent else
            "before/after comparison" if req.compare else "edited grid" if req.edits else "grid")
    return f"{out}: {kind} of {len(images)} image(s) from {req.model}"


def save_images(images: np.ndarray, ncol: int | None, out: str) -> None:
    """One image without a frame, several as a grid with white separators."""
    from PIL import Image

    storage.write_bytes(out, png_bytes(Image.fromarray(images[0])) if len(images) == 1 else grid_png(images, ncol))
