"""clean-fid's "clean" resize, in memory: uint8 RGB -> float32 299x299 by PIL bicubic, one channel at a time.

clean-fid resizes each channel as a 32-bit float PIL image (mode "F") so that nothing is quantised after
the filter, then clips to [0, 255]. We apply the same PIL operation to the same uint8 input, so the output
is bit-identical to ``cleanfid.resize.make_resizer("PIL", False, "bicubic", (299, 299))``; what we save is
the PNG round trip and the per-file data loader. Pillow releases the GIL while resampling, so a thread pool
resizes a batch on all cores.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

PROTOCOL = "clean-fid:clean:pil-bicubic-f32:299"  # part of every statistics cache key
SIZE = 299


def _check_image(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape HxWx3, got shape {tuple(image.shape)}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels (clean-fid resizes uint8 images), got {image.dtype}")
    return image


def clean_resize(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    """One uint8 HxWx3 image -> float32 ``size``x``size``x3 in [0, 255], as clean-fid's clean mode does."""
    image = _check_image(image)
    channels = []
    for c in range(3):
        plane = Image.fromarray(np.ascontiguousarray(image[:, :, c], dtype=np.float32))
        plane = plane.resize((size, size), resample=Image.BICUBIC)
        channels.append(np.asarray(plane).clip(0, 255).reshape(size, size, 1))
    return np.concatenate(channels, axis=2).astype(np.float32)


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def resize_batch(images: np.ndarray, size: int = SIZE, threads: int | None = None,
                 pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """uint8 NxHxWx3 -> float32 Nx3x``size``x``size`` (NCHW, [0, 255]), images resized in parallel threads."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected a batch of images NxHxWx3, got shape {tuple(images.shape)}")
    _check_image(images[0] if len(images) else np.zeros((1, 1, 3), np.uint8))
    out = np.empty((len(images), 3, size, size), dtype=np.float32)

    def one(i: int) -> None:
        out[i] = clean_resize(images[i], size).transpose(2, 0, 1)

    n_threads = min(threads or default_threads(), max(1, len(images)))
    if n_threads == 1 and pool is None:
        for i in range(len(images)):
            one(i)
    elif pool is not None:
        list(pool.map(one, range(len(images))))
    else:
        with ThreadPoolExecutor(n_threads) as ex:
            list(ex.map(one, range(len(images))))
    return out
