"""Drawings and photos sent by the page: data URLs checked for size, then decoded by the pipeline's guarded
decoder (`pipeline.data.images`), so a bomb, a truncated file or a non-image is refused with its reason."""

from __future__ import annotations

import base64
import binascii

import numpy as np

from pipeline.data.images import BadRecord, encode_png, load_image


class UploadError(ValueError):
    """An upload the studio refuses; the message is shown on the page."""


def decode_data_url(text: str, max_bytes: int, what: str = "image") -> bytes:
    """The bytes of a ``data:<type>;base64,<payload>`` URL, refused when malformed or over ``max_bytes``."""
    if not isinstance(text, str) or not text.startswith("data:") or ";base64," not in text[:100]:
        raise UploadError(f"{what}: expected a data URL (data:image/...;base64,...)")
    payload = text.split(",", 1)[1]
    if len(payload) > (max_bytes * 4) // 3 + 4:  # refuse before decoding a large payload
        raise UploadError(f"{what}: too large ({len(payload) * 3 // 4:,} bytes; the limit is {max_bytes:,})")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise UploadError(f"{what}: not valid base64") from None
    if len(data) > max_bytes:
        raise UploadError(f"{what}: too large ({len(data):,} bytes; the limit is {max_bytes:,})")
    return data


def sketch_as_trained(data: bytes, size: int, max_pixels: int, what: str = "sketch") -> np.ndarray:
    """The drawing as training sees it: one channel (transparent areas white), centre-cropped, ``size`` px —
    the very function `sketchset create` applies."""
    try:
        return load_image(data, size, "L", max_pixels)
    except BadRecord as exc:
        raise UploadError(f"{what}: {exc.reason}") from None


def to_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def preview_png(data: bytes, size: int, max_pixels: int) -> bytes:
    return encode_png(sketch_as_trained(data, size, max_pixels, "drawing"))
