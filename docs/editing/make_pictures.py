"""The README's editing pictures, from the committed toy base and two customisations of it made by the shape
benchmark (benchmarks/shape_customisation.py, `trained: all`):

    python docs/editing/make_pictures.py --circle RUN --triangle RUN

Writes docs/editing/{edits,blend,projection}.png, tiles upscaled 3x (nearest) so that 32 px samples can be seen.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pipeline.config import Config  # noqa: E402
from pipeline.data.images import tile  # noqa: E402
from pipeline.edit import blend, projection  # noqa: E402
from pipeline.models import sampling  # noqa: E402
from pipeline.registry.generate import GenerateRequest, generate_images  # noqa: E402
from pipeline.registry.mlflow_registry import resolve_model  # noqa: E402

BASE = str(REPO / "benchmarks" / "assets" / "shapes_base")
OUT = REPO / "docs" / "editing"


def save(images: np.ndarray, ncol: int, name: str, scale: int = 3) -> None:
    big = np.repeat(np.repeat(images, scale, axis=1), scale, axis=2)
    tile(big, ncol, pad=4).save(OUT / name)
    print(OUT / name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--circle", required=True, help="a circle customisation run of the toy base")
    parser.add_argument("--triangle", required=True, help="a triangle customisation run of the toy base")
    args = parser.parse_args()
    cfg = Config()
    seeds = dict(model=BASE, n=6, seed=10, truncation=0.7)
    rows = [generate_images(cfg, GenerateRequest(**seeds))[0]]
    for comp in (0, 1, 2):  # the base's first three principal directions, +3 standard deviations, every layer
        rows.append(generate_images(cfg, GenerateRequest(**seeds, edits=[f"{comp}:3:0-7"]))[0])
    save(np.concatenate(rows), 6, "edits.png")

    pa, pb = blend.load_parents(cfg, args.circle, args.triangle, "cpu")
    strip = blend.render_blend(pa, pb, "weights", blend.alphas_for(6), [0, 1, 2, 3], 1.0, "cpu")
    save(strip, 6, "blend.png")

    # each row: a base sample, its projection (W+), that latent through the circle and the triangle models
    base_G = resolve_model(BASE, cfg).load_generator(cfg, "cpu")
    tiles = []
    for seed in (3, 21, 40):
        target = sampling.render(base_G, [seed], [1.0], "cpu")
        t = torch.from_numpy(target).permute(0, 3, 1, 2).float() / 127.5 - 1
        record = projection.project(base_G, t, projection.ProjectSettings(steps=600, space="w+"))
        tiles += [target[0], projection.render_latent(base_G, record, "cpu")[0],
                  projection.render_latent(pa.G, record, "cpu")[0], projection.render_latent(pb.G, record, "cpu")[0]]
    save(np.stack(tiles), 4, "projection.png")


if __name__ == "__main__":
    main()
