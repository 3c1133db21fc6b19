"""Deterministic weights and reference vectors from tests/fixtures (see tests/fixtures/README.md)."""

from __future__ import annotations

import functools
import json
import zlib
from pathlib import Path

import numpy as np
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@functools.lru_cache(maxsize=1)
def manifest() -> dict:
    return json.loads((FIXTURES / "state_dict_manifest.json").read_text())


@functools.lru_cache(maxsize=1)
def vectors() -> dict:
    return torch.load(FIXTURES / "upstream_vectors.pt", weights_only=True)


def deterministic_state_dict(net: str) -> dict[str, torch.Tensor]:
    """The reference implementation's deterministic weights for one manifest entry."""
    out = {}
    for entry in manifest()[net]:
        key, shape = entry["key"], entry["shape"]
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(0, dtype=torch.int64)
            continue
        rng = np.random.RandomState(zlib.crc32(key.encode()) % 2**32)
        value = rng.standard_normal(int(np.prod(shape))).reshape(shape) * entry["scale"]
        if key.endswith("running_var"):
            value = np.abs(value) + 0.5
        out[key] = torch.from_numpy(np.asarray(value, dtype=np.float32)).reshape(shape)
    return out


def rel_l2(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()
