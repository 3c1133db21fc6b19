"""The studio's pictures, each made by the library's own functions: samples and edits (`registry.generate`), the
before/after comparison (`eval.compare`'s rows), blends (`edit.blend`) and projections (`edit.projection`)."""

from __future__ import annotations

from pipeline import layout, storage
from pipeline.config import Config
from pipeline.data.images import decode_png, grid_png


def generate_png(cfg: Config, model: str, n: int, seed: int, truncation: float = 1.0, interpolate: bool = False,
                 edits: list[str] | None = None, compare: bool = False) -> bytes:
    from pipeline.registry.generate import GenerateRequest, generate_images

    req = GenerateRequest(model=model, n=n, seed=seed, truncation=truncation, interpolate=interpolate,
                          edits=list(edits or []), compare=compare)
    images, ncol = generate_images(cfg, req)
    return grid_png(images, ncol)


def compare_png(cfg: Config, run: dict, n: int = 8, seed: int = 0) -> bytes:
    """The run's sketches, then the base and the customised model on the same latents (seeds seed..seed+n-1)."""
    from pipeline.eval.compare import COUNT, first_sketches, labelled_row, stacked_png, tile_size
    from pipeline.registry.generate import GenerateRequest, generate_images

    n = max(1, min(n, COUNT))
    before, _ = generate_images(cfg, GenerateRequest(model=cfg.model.base_g, n=n, seed=seed))
    after, _ = generate_images(cfg, GenerateRequest(model=run["model"], n=n, seed=seed))
    tile = tile_size(before.shape[1])
    rows = [labelled_row(f"sketches: {run['sketch_set']}", first_sketches(run["sketchset_uri"]), tile),
            labelled_row("base, before", before, tile),
            labelled_row(f"customised, after ({run['iterations']} it.)", after, tile)]
    return stacked_png(rows)


def blend_png(cfg: Config, a: str, b: str, space: str, steps: int, n: int, seed: int, work: str) -> bytes:
    from pipeline.edit.blend import run_blend

    if not 2 <= steps <= 16:
        raise ValueError(f"steps must be between 2 and 16, got {steps}")
    out = storage.join(work, "blend.png")
    run_blend(cfg, a, b, space, steps, out, n, seed, 1.0, None, False)
    return storage.read_bytes(out)


def project_png(cfg: Config, image: bytes, model: str, steps: int, work: str) -> tuple[bytes, float, list[str]]:
    """Project ``image`` into ``model``'s W+; returns (target | mean latent | reconstruction, PSNR, summary)."""
    from pipeline.edit.projection import ProjectSettings, load_target, psnr, run_project
    from pipeline.models.sampling import to_uint8

    if not 1 <= steps <= 2000:
        raise ValueError(f"steps must be between 1 and 2000, got {steps}")
    target_uri = storage.join(work, "target.png")
    storage.write_bytes(target_uri, image)
    lines = run_project(cfg, target_uri, model, work, ProjectSettings(steps=steps, space="w+"))
    recon = decode_png(storage.read_bytes(storage.join(work, layout.RECONSTRUCTION)))
    want = to_uint8(load_target(target_uri, recon.shape[0]))[0]
    return storage.read_bytes(storage.join(work, layout.PROJECTION_COMPARE)), psnr(recon, want), lines

