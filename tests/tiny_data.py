"""Tiny datasets in the stage contracts (for training tests that must not depend on preprocessing)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipeline import storage


def shape_image(rng: np.random.RandomState, size: int, shape: str) -> Image.Image:
    bg = tuple(int(v) for v in rng.randint(0, 256, 3))
    fg = tuple(int(v) for v in rng.randint(0, 256, 3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    return im


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _write_table(uri: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def write_pairs_dataset(uri: str, n: int = 32, size: int = 32, category: str = "shapes", seed: int = 0) -> str:
    rng = np.random.RandomState(seed)
    shapes = ["circle", "square", "triangle"]
    rows = {"id": [], "category": [], "source_key": [], "image": [], "sketch": [], "size": [], "sketcher": []}
    for i in range(n):
        im = shape_image(rng, size, shapes[i % 3])
        rows["id"].append(f"{i:06d}")
        rows["category"].append(category)
        rows["source_key"].append(f"key{i}")
        rows["image"].append(png(im))
        rows["sketch"].append(png(im.convert("L")))
        rows["size"].append(size)
        rows["sketcher"].append("edges:none")
    _write_table(storage.join(uri, "pairs", f"category={category}", "part-0.parquet"), pa.table(rows))
    storage.write_json(storage.join(uri, "manifest.json"), {"rows": n, "fingerprint": f"tiny-{seed}-{n}"})
    return uri


def write_sketch_set(uri: str, n: int = 4, size: int = 32, name: str = "tri", seed: int = 1) -> str:
    rng = np.random.RandomState(seed)
    sketches = []
    for _ in range(n):
        im = Image.new("L", (size, size), 255)
        r = rng.randint(size // 5, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        ImageDraw.Draw(im).polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], outline=0)
        sketches.append(png(im))
    _write_table(storage.join(uri, "sketches.parquet"),
                 pa.table({"id": [f"s{i}" for i in range(n)], "sketch": sketches, "size": [size] * n}))
    storage.write_json(storage.join(uri, "manifest.json"), {"name": name, "id": f"sk-{seed}-{n}", "count": n,
                                                            "size": size})
    return uri


def write_random_base(root, model_cfg, seed: int = 7) -> tuple[str, str]:
    """Random tiny G and D saved in the published layout under ``root/base`` (stand-ins for netG.pth / netD.pth)."""
    import torch

    from pipeline.models import factory
    from pipeline.models.checkpoints import save_state_dict

    arch = factory.generator_kwargs(model_cfg)
    torch.manual_seed(seed)
    g, d = storage.join(str(root), "base", "netG.pth"), storage.join(str(root), "base", "netD.pth")
    save_state_dict(factory.build_generator(arch), g)
    save_state_dict(factory.build_discriminator(arch), d)
    return g, d
