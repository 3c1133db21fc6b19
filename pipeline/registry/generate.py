"""`sketchgan generate`: a grid of samples, or a latent interpolation strip, from a model or checkpoint.

Samples use the registered pyfunc's seeding (`pyfunc_model.render`): image i of a grid is seed ``S + i``, so a
grid matches what ``predict`` returns for those seeds. ``--interpolate`` walks in W from seed S to seed S+1 in
``--n`` steps.
"""

from __future__ import annotations

import io
import logging
import math

import numpy as np
from PIL import Image

from pipeline import storage
from pipeline.config import Config

log = logging.getLogger("sketchgan.generate")

MAX_SAMPLES = 1024


def tile(images: np.ndarray, ncol: int, pad: int = 2) -> Image.Image:
    """uint8 N x H x W x 3 -> one RGB image, ``ncol`` per row, with white padding."""
    n, h, w, _ = images.shape
    rows = math.ceil(n / ncol)
    canvas = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y:y + h, x:x + w] = img
    return Image.fromarray(canvas)


def generate_images(cfg: Config, model: str, n: int, truncation: float = 1.0, seed: int = 0,
                    interpolate: bool = False, device=None) -> np.ndarray:
    """The images `sketchgan generate` tiles: N seeds from ``seed``, or an N-step strip from seed to seed+1."""
    from pipeline.models import factory
    from pipeline.registry.mlflow_registry import resolve_model
    from pipeline.registry.pyfunc_model import check_truncation, render
    from pipeline.registry.pyfunc_model import interpolate as lerp

    if not 1 <= n <= MAX_SAMPLES:
        raise ValueError(f"--n must be between 1 and {MAX_SAMPLES}, got {n}")
    if interpolate and n < 2:
        raise ValueError("--interpolate needs --n of at least 2 (the two end points)")
    if seed < 0:
        raise ValueError(f"--seed must be non-negative, got {seed}")
    psi = check_truncation(truncation, "--truncation")
    resolved = resolve_model(model, cfg)
    arch = resolved.arch or factory.generator_kwargs(cfg.model)
    if resolved.arch is None:
        log.info("%s has no recorded architecture: using the model section of the config", model)
    device = device or factory.device_default()
    G = factory.load_generator(resolved.g_uri, arch, device)
    if interpolate:
        return lerp(G, seed, seed + 1, n, psi, device)
    return render(G, list(range(seed, seed + n)), [psi] * n, device)


def cli_main(cfg: Config, args) -> int:
    images = generate_images(cfg, args.model, args.n, args.truncation, args.seed, args.interpolate)
    ncol = len(images) if args.interpolate else math.ceil(math.sqrt(len(images)))
    buf = io.BytesIO()
    tile(images, ncol).save(buf, format="PNG")
    storage.write_bytes(args.out, buf.getvalue())
    kind = "interpolation strip" if args.interpolate else "grid"
    print(f"{args.out}: {kind} of {len(images)} sample(s) from {args.model}")
    return 0
