"""Images from a registered model, a finished run or a checkpoint: a grid of seeds or a latent interpolation strip.

Samples use the registered pyfunc's seeding (`pipeline.models.sampling.render`): image i of a grid is seed
``S + i``, so a grid matches what ``predict`` returns for those seeds. An interpolation walks in W from seed S to
seed S+1 in ``n`` steps.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline import storage
from pipeline.config import Config
from pipeline.data.images import grid_png

log = logging.getLogger("sketchgan.generate")

MAX_SAMPLES = 1024


def generate_images(cfg: Config, model: str, n: int, truncation: float = 1.0, seed: int = 0,
                    interpolate: bool = False, device=None) -> np.ndarray:
    """N seeds from ``seed`` (uint8 N x H x W x 3), or an N-step strip from seed to seed+1."""
    from pipeline.models import factory, sampling
    from pipeline.registry.mlflow_registry import resolve_model

    if not 1 <= n <= MAX_SAMPLES:
        raise ValueError(f"--n must be between 1 and {MAX_SAMPLES}, got {n}")
    if interpolate and n < 2:
        raise ValueError("--interpolate needs --n of at least 2 (the two end points)")
    if seed < 0:
        raise ValueError(f"--seed must be non-negative, got {seed}")
    psi = sampling.check_truncation(truncation, "--truncation")
    resolved = resolve_model(model, cfg)
    if resolved.arch is None:
        log.info("%s has no recorded architecture: using the model section of the config", model)
    device = device or factory.device_default()
    G = resolved.load_generator(cfg, device)
    if interpolate:
        return sampling.interpolate(G, seed, seed + 1, n, psi, device)
    return sampling.render(G, list(range(seed, seed + n)), [psi] * n, device)


def write_images(cfg: Config, model: str, out: str, n: int = 16, truncation: float = 1.0, seed: int = 0,
                 interpolate: bool = False) -> str:
    """Write `generate_images` as one PNG at ``out`` (a strip for an interpolation); returns a summary line."""
    images = generate_images(cfg, model, n, truncation, seed, interpolate)
    storage.write_bytes(out, grid_png(images, len(images) if interpolate else None))
    kind = "interpolation strip" if interpolate else "grid"
    return f"{out}: {kind} of {len(images)} sample(s) from {model}"
