"""Generated LSUN-format data for the demo, tests and benchmarks.

Each image holds one object of a few distinct shapes (circle, square, triangle; also star and cross on
request) with varied colours, sizes, positions, rotations and backgrounds, so that a sketch set of one shape
is meaningful. `write_lsun_lmdb` stores them as LSUN ships its categories: one LMDB folder per category
(``data.mdb``, ``lock.mdb``), key = a 40-hex image id, value = encoded WebP / JPEG / PNG (mixed). The shape of
every key is kept in ``labels.json`` beside the LMDB files; `generate_shape_images` gives arrays + labels
directly. Bad records (corrupt, truncated, empty, decompression bomb) and odd ones that must be converted
(CMYK, RGBA, P, 16-bit, grey, tiny) can be planted.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
ALL_SHAPES = (*SHAPES, "star", "cross")
FORMATS = ("WEBP", "JPEG", "PNG")
BACKGROUNDS = ("flat", "gradient", "stripes", "texture")  # background kinds, in `_background`'s order
LABELS_FILE = "labels.json"
_SUPERSAMPLE = 2  # shapes are drawn at twice the size and reduced, for antialiased edges


def _background(rng: np.random.RandomState, size: int, kinds: tuple[str, ...] | None = None) -> np.ndarray:
    if kinds is None:  # every kind (the default draw, kept as it was so existing seeds give the same images)
        kind = rng.randint(4)
    else:
        unknown = [k for k in kinds if k not in BACKGROUNDS]
        if unknown or not kinds:
            raise ValueError(f"unknown background kinds {unknown or kinds!r} (known: {', '.join(BACKGROUNDS)})")
        kind = BACKGROUNDS.index(kinds[rng.randint(len(kinds))])
    c1 = rng.randint(0, 256, 3).astype(np.float64)
    if kind == 0:  # flat
        return np.broadcast_to(c1, (size, size, 3)).copy()
    c2 = rng.randint(0, 256, 3).astype(np.float64)
    t = np.linspace(0.0, 1.0, size)
    if kind == 1:  # gradient at a random angle
        a = rng.uniform(0, 2 * math.pi)
        ramp = (np.cos(a) * t[None, :] + np.sin(a) * t[:, None])
        ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-9)
        return (1 - ramp)[..., None] * c1 + ramp[..., None] * c2
    if kind == 2:  # stripes
        period = rng.uniform(0.15, 0.5)
        stripes = (np.sin(2 * math.pi * t / period + rng.uniform(0, 6.3)) > 0)[None, :, None]
        return np.where(stripes, c1, c2) * np.ones((size, 1, 1))
    noise = rng.uniform(-40, 40, (size, size, 1))  # textured
    return np.clip(c1 + noise, 0, 255)


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    n = len(radii)
    return [(cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
            for k, r in enumerate(radii)]


def render_shape(rng: np.random.RandomState, size: int, shape: str,
                 backgrounds: tuple[str, ...] | None = None) -> Image.Image:
    """One RGB image size×size of ``shape`` (see `ALL_SHAPES`) on a random background, drawn from
    ``backgrounds`` (kinds of `BACKGROUNDS`; default all of them)."""
    if shape not in ALL_SHAPES:
        raise ValueError(f"unknown shape {shape!r} (known: {', '.join(ALL_SHAPES)})")
    big = size * _SUPERSAMPLE
    bg = _background(rng, big, backgrounds)
    im = Image.fromarray(bg.clip(0, 255).astype(np.uint8), "RGB")
    fg = rng.randint(0, 256, 3)
    while np.abs(fg - bg.reshape(-1, 3).mean(0)).sum() < 200:  # keep the object visible against its background
        fg = rng.randint(0, 256, 3)
    colour = tuple(int(v) for v in fg)
    r = rng.uniform(0.18, 0.36) * big
    cx, cy = rng.uniform(r, big - r), rng.uniform(r, big - r)
    a = rng.uniform(0, 2 * math.pi)
    draw = ImageDraw.Draw(im)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, [r] * 4, a), fill=colour)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, [r] * 3, a), fill=colour)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, [r, 0.45 * r] * 5, a), fill=colour)
    else:  # cross: two bars
        w = 0.32 * r
        for t in (a, a + math.pi / 2):
            c, s = math.cos(t), math.sin(t)
            draw.polygon([(cx + c * r - s * w, cy + s * r + c * w), (cx + c * r + s * w, cy + s * r - c * w),
                          (cx - c * r + s * w, cy - s * r - c * w), (cx - c * r - s * w, cy - s * r + c * w)],
                         fill=colour)
    return im.resize((size, size), Image.BOX)


def generate_shape_images(n: int, size: int, seed: int = 0, shapes: tuple[str, ...] = SHAPES,
                          backgrounds: tuple[str, ...] | None = None) -> tuple[np.ndarray, list[str]]:
    """``n`` images (uint8 n×size×size×3) cycling through ``shapes`` in equal shares, and their labels;
    ``backgrounds`` restricts the background kinds (see `render_shape`)."""
    rng = np.random.RandomState(seed)
    labels = [shapes[i % len(shapes)] for i in range(n)]
    images = np.stack([np.asarray(render_shape(rng, size, s, backgrounds)) for s in labels]) if n else \
        np.zeros((0, size, size, 3), np.uint8)
    return images, labels


def encode(im: Image.Image, fmt: str) -> bytes:
    """Encode as LSUN-style bytes (WEBP, JPEG or PNG)."""
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


def bomb_png(side: int = 20_000) -> bytes:
    """A few-hundred-byte PNG whose header declares side×side pixels: it must be refused, never decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    idat = zlib.compress(row * 64, 9)  # only the first rows: nothing reads further than the header anyway
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def planted_records(size: int, seed: int = 99) -> dict[str, tuple[bytes, str | None]]:
    """Records to plant: key -> (value, expected shape or None). Keys starting ``bad-`` must be skipped;
    keys starting ``odd-`` must be converted and kept."""
    rng = np.random.RandomState(seed)
    good = render_shape(rng, max(size, 16), "circle")
    jpeg = encode(good, "JPEG")
    return {
        "bad-corrupt": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, None),
        "bad-truncated": (jpeg[: len(jpeg) // 2], None),
        "bad-empty": (b"", None),
        "bad-bomb": (bomb_png(), None),
        "odd-cmyk": (encode(good.convert("CMYK"), "JPEG"), "circle"),
        "odd-rgba": (encode(good.convert("RGBA"), "PNG"), "circle"),
        "odd-palette": (encode(good.convert("P"), "PNG"), "circle"),
        "odd-16bit": (encode(Image.fromarray(np.asarray(good.convert("L"), np.uint16) * 257), "PNG"), "circle"),
        "odd-grey": (encode(good.convert("L"), "PNG"), "circle"),
        "odd-tiny": (encode(good.resize((5, 4)), "PNG"), "circle"),
    }


def image_key(name: str, seed: int, index: int) -> str:
    """A 40-hex id like LSUN's keys (stable for the same name, seed and index)."""
    return hashlib.sha1(f"{name}/{seed}/{index}".encode()).hexdigest()


def write_shapes_lmdb(path: str, n: int, size: int = 64, seed: int = 0, shapes: tuple[str, ...] = SHAPES,
                      bad: bool = False, name: str | None = None,
                      backgrounds: tuple[str, ...] | None = None) -> dict[str, str]:
    """Write one LSUN-format LMDB folder at ``path`` (replacing an existing one); returns {key: shape}, also
    saved as ``labels.json`` beside the LMDB files. With ``bad``, `planted_records` are added (labels of
    the bad ones are omitted, the odd ones are labelled). ``backgrounds`` restricts the background kinds."""
    import lmdb

    images, labels = generate_shape_images(n, size, seed, shapes, backgrounds)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("data.mdb", "lock.mdb", LABELS_FILE):
        (out / stale).unlink(missing_ok=True)
    name = name or out.name
    keyed: dict[str, str] = {}
    env = lmdb.open(str(out), map_size=max(1 << 26, 4 * int(images.nbytes) + (1 << 24)), subdir=True)
    try:
        with env.begin(write=True) as txn:
            for i, (arr, label) in enumerate(zip(images, labels)):
                key = image_key(name, seed, i)
                txn.put(key.encode(), encode(Image.fromarray(arr), FORMATS[i % len(FORMATS)]))
                keyed[key] = label
            if bad:
                for key, (value, label) in planted_records(size).items():
                    txn.put(key.encode(), value)
                    if label:
                        keyed[key] = label
    finally:
        env.close()
    (out / LABELS_FILE).write_text(json.dumps(keyed, indent=0, sort_keys=True))
    return keyed


def write_lsun_lmdb(root: str, categories: tuple[str, ...] = ("cat", "horse", "church"), n_per_category: int = 100,
                    size: int = 64, seed: int = 0, bad_records: bool = False,
                    shapes: tuple[str, ...] = SHAPES) -> dict[str, dict[str, str]]:
    """One LMDB folder per category below ``root`` (``root/cat/``, ... as LSUN ships them); returns
    {category: {key: shape}}. Categories differ in their seeds, so their images differ."""
    return {c: write_shapes_lmdb(str(Path(root) / c), n_per_category, size, seed + 1000 * i, shapes,
                                 bad=bad_records, name=c)
            for i, c in enumerate(categories)}


def read_labels(lmdb_path: str) -> dict[str, str]:
    """The {key: shape} labels written beside a generated LMDB."""
    return json.loads((Path(lmdb_path) / LABELS_FILE).read_text())
