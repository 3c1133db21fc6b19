"""The training inputs a worker holds: real images streamed with a resumable position, and the user's sketches.

Real images arrive through ``make_epoch(epoch)``: an iterator of numpy batches with an ``image`` column of PNG
bytes (a Ray Data shard inside Ray Train, a plain Parquet reader in benchmarks and tests).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("sketchgan.train")

MakeEpoch = Callable[[int], Iterator[dict]]


def decode_png_batch(blobs, channels: int, size: int) -> torch.Tensor:
    """PNG bytes -> float tensor in [-1, 1], B×C×size×size (resized when the stored size differs)."""
    mode = "RGB" if channels == 3 else "L"
    arrays = []
    for blob in blobs:
        with Image.open(io.BytesIO(blob)) as im:
            im = im.convert(mode)
            if im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
        arrays.append(arr if arr.ndim == 3 else arr[:, :, None])
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


class ImageStream:
    """Endless batches of real images from ``make_epoch(epoch)``, with a resumable position.

    The position is (epoch, batches served in that epoch); resuming re-opens that epoch (same shuffle seed)
    and skips the served batches without decoding them.
    """

    def __init__(self, make_epoch: MakeEpoch, size: int, batch: int, epoch: int = 0, index: int = 0):
        self.make_epoch, self.size, self.batch = make_epoch, size, batch
        self.epoch, self.index = epoch, index
        self._it: Iterator[dict] | None = None

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def _open_epoch(self) -> None:
        self._it = iter(self.make_epoch(self.epoch))
        for _ in range(self.index):
            if next(self._it, None) is None:
                raise ValueError(f"the image stream has fewer than {self.index} batches per epoch: it cannot be "
                                 "resumed at this position (was the dataset changed?)")

    def __next__(self) -> torch.Tensor:
        empty_epochs = 0
        while True:
            if self._it is None:
                self._open_epoch()
            b = next(self._it, None)
            if b is not None:
                self.index += 1
                return decode_png_batch(b["image"], 3, self.size)
            if self.index == 0:
                empty_epochs += 1
                if empty_epochs > 1:
                    raise ValueError(f"the image dataset has fewer rows per worker than one batch ({self.batch})")
            self.epoch, self.index, self._it = self.epoch + 1, 0, None

    def __iter__(self):
        return self


class SketchSampler:
    """The user's sketches, held in memory; each batch is drawn by the step's RNG (part of its checkpoint)."""

    def __init__(self, sketches: torch.Tensor, name: str, batch: int):
        if sketches is None or sketches.shape[0] == 0:
            raise ValueError(f"sketch set {name!r} is empty")
        self.replace = sketches.shape[0] < batch
        if self.replace:
            log.warning("sketch set %r has %d sketch(es), fewer than the per-worker batch of %d: sampling with "
                        "replacement", name, sketches.shape[0], batch)
        self.sketches, self.batch = sketches, batch

    def sample(self, rng: torch.Generator) -> torch.Tensor:
        n = self.sketches.shape[0]
        if self.replace:
            idx = torch.randint(0, n, (self.batch,), generator=rng)
        else:
            idx = torch.randperm(n, generator=rng)[: self.batch]
        return self.sketches[idx]
