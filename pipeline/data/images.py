"""Image helpers: decoding dataset and user images safely (any mode to RGB or L, centre crop, antialiased resize),
PNG encoding, and tiling images into a grid.

Undecodable, truncated and empty values raise `BadRecord` with a reason. An image whose header declares more
pixels than allowed is refused from its header alone, before any pixel is decoded (decompression bombs).
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default limit
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class BadRecord(ValueError):
    """A value that is not a usable image; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image, refusing empty, undecodable, truncated and oversized values."""
    if not data:
        raise BadRecord("empty value")
    try:
        with warnings.catch_warnings():
            # PIL warns above its limit and raises above twice it; our own limit decides below, from the header.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise BadRecord(f"decompression bomb refused: {exc}") from None
    except UnidentifiedImageError:
        raise BadRecord("undecodable: not a known image format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadRecord(f"undecodable: {exc}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise BadRecord(f"decompression bomb refused: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    if w < 1 or h < 1:
        raise BadRecord(f"undecodable: image of size {w}x{h}")
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadRecord(f"truncated or corrupt image data: {exc}") from None
    return im


def to_mode(im: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL mode (L, LA, P, CMYK, RGBA, 16-bit, 32-bit, float) to ``mode`` (RGB or L).

    Transparent areas become white (drawings and cut-outs are drawn on white); 16-bit values are scaled
    to 8 bits rather than clipped.
    """
    if im.mode in _SIXTEEN_BIT:
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im if im.mode == mode else im.convert(mode)


def center_crop_resize(im: Image.Image, size: int) -> Image.Image:
    """Centre square crop, then an antialiased bicubic resize to size×size (tiny images are upscaled)."""
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    if (w, h) != (side, side):
        im = im.crop((left, top, left + side, top + side))
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    return im


def load_image(data: bytes, size: int, mode: str = "RGB", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> uint8 array size×size×3 (RGB) or size×size (L); raises `BadRecord`."""
    return np.asarray(center_crop_resize(to_mode(open_image(data, max_pixels), mode), size), dtype=np.uint8)


def encode_png(arr: np.ndarray) -> bytes:
    """uint8 H×W×3 (RGB) or H×W (L) -> PNG bytes (fast zlib level: the data is written once, read often)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG (or any image) bytes -> uint8 array in the stored mode."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


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


def png_bytes(img: Image.Image) -> bytes:
    """A PIL image as PNG bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def grid_png(images: np.ndarray, ncol: int | None = None) -> bytes:
    """uint8 N x H x W x 3 -> a PNG grid, ``ncol`` per row (default: as square as possible)."""
    return png_bytes(tile(images, ncol or math.ceil(math.sqrt(len(images)))))
