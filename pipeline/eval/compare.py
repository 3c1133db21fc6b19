"""The benchmark's comparison figure: for each sketch set, a row of its sketches, then the base and every model
customised from it, each on the same latents (the benchmark's first samples), so a change of shape or content
shows tile by tile."""

from __future__ import annotations

import io
import math

import numpy as np

from pipeline import layout
from pipeline.config import Config
from pipeline.eval.models import ModelSpec

COUNT = 8  # tiles per row
MIN_TILE = 96  # small models are upscaled (nearest neighbour) to at least this many pixels per tile
MAX_TILE = 256
LABEL_WIDTH = 200
GAP = 4


def tile_size(image_size: int) -> int:
    """The tile edge for images of ``image_size`` px: an integer upscale to at least MIN_TILE, at most MAX_TILE."""
    if image_size < MIN_TILE:
        return image_size * math.ceil(MIN_TILE / image_size)
    return min(image_size, MAX_TILE)


def _samples(spec: ModelSpec, cfg: Config) -> np.ndarray:
    import torch

    from pipeline.eval.benchmark import load_source
    from pipeline.models.sampling import generate_batches

    device = torch.device("cpu")
    generator = load_source(spec.source, device, cfg)
    style_dim = (spec.source.get("arch") or {}).get("style_dim")
    ev = cfg.eval
    return np.concatenate(list(generate_batches(generator, COUNT, ev.seed, ev.truncation, COUNT, device, style_dim)))


def first_sketches(uri: str) -> np.ndarray:
    """The set's first sketches as RGB, decoded with the pipeline's guarded decoder (size limits, clear errors)."""
    from pipeline.data.images import BadRecord, center_crop_resize, open_image, to_mode

    stored = layout.read_sketch_set(uri)
    pictures = []
    for sketch_id, blob in zip(stored.ids[:COUNT], stored.blobs[:COUNT]):
        try:
            pictures.append(to_mode(open_image(blob), "RGB"))
        except BadRecord as exc:
            raise ValueError(f"sketch set {uri}: sketch {sketch_id!r}: {exc.reason}") from None
    size = max(p.height for p in pictures)
    return np.stack([np.asarray(center_crop_resize(p, size)) for p in pictures])


def labelled_row(label: str, images: np.ndarray, tile: int):
    from PIL import Image, ImageDraw, ImageFont

    row = Image.new("RGB", (LABEL_WIDTH + COUNT * (tile + GAP), tile + GAP), "white")
    draw = ImageDraw.Draw(row)
    font = ImageFont.load_default(size=15)
    words, lines = label.split(" "), [""]
    for word in words:  # wrap the label to the label column
        if lines[-1] and draw.textlength(f"{lines[-1]} {word}", font=font) > LABEL_WIDTH - 12:
            lines.append(word)
        else:
            lines[-1] = f"{lines[-1]} {word}".strip()
    draw.multiline_text((6, tile // 2), "\n".join(lines), fill="black", font=font, anchor="lm")
    for i, image in enumerate(images[:COUNT]):
        im = Image.fromarray(image)
        resample = Image.NEAREST if im.width < tile else Image.LANCZOS
        row.paste(im.resize((tile, tile), resample), (LABEL_WIDTH + i * (tile + GAP), 0))
    return row


def compare_figure(cfg: Config, specs: list[ModelSpec]) -> bytes | None:
    """The figure as PNG bytes, or None when no customised model's sketch set is known."""

    customised = [s for s in specs if not s.baseline and s.sketches_uri]
    if not customised:
        return None
    base_of = {s.evalset: s for s in specs if s.baseline}
    drawn: dict[str, np.ndarray] = {}  # the base is the same model in every group: draw it once

    def samples(spec: ModelSpec) -> np.ndarray:
        key = spec.source.get("uri") or spec.source.get("model_uri")
        if key not in drawn:
            drawn[key] = _samples(spec, cfg)
        return drawn[key]

    rows = []
    for sketches_uri in dict.fromkeys(s.sketches_uri for s in customised):
        members = [s for s in customised if s.sketches_uri == sketches_uri]
        sketches = first_sketches(sketches_uri)
        pictures = [(f"sketches: {members[0].sketch_set or sketches_uri.rsplit('/', 1)[-1]}", sketches)]
        base = base_of.get(members[0].evalset)
        if base is not None:
            pictures.append(("base, before", samples(base)))
        for spec in members:
            version = f" v{spec.version}" if spec.version else ""
            pictures.append((f"{spec.label}{version}, after", samples(spec)))
        tile = tile_size(max(p.shape[1] for _, p in pictures))
        rows += [labelled_row(label, images, tile) for label, images in pictures]
        rows.append(None)  # a gap between sketch sets
    return stacked_png(rows[:-1])


def stacked_png(rows: list) -> bytes:
    """Rows (PIL images; None for a gap) one under another, as PNG bytes."""
    from PIL import Image

    width = max(r.width for r in rows if r is not None)
    height = sum(r.height if r is not None else 3 * GAP for r in rows)
    figure = Image.new("RGB", (width, height), "white")
    y = 0
    for r in rows:
        if r is None:
            y += 3 * GAP
            continue
        figure.paste(r, (0, y))
        y += r.height
    buf = io.BytesIO()
    figure.save(buf, format="PNG")
    return buf.getvalue()
