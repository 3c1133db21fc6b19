"""Load and save network weights safely: plain state dicts only, checked strictly, published atomically."""

from __future__ import annotations

import hashlib
import io
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

# Wrappers other StyleGAN2 tools save around the generator's state dict (rosinality: "g_ema").
WRAPPER_KEYS = ("g_ema", "state_dict", "G")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


class CheckpointMismatchError(CheckpointError):
    """Keys or shapes that do not match the network; lists every difference at once."""


def _read(uri: str | Path) -> bytes:
    from pipeline import storage

    try:
        return storage.read_bytes(str(uri))
    except OSError as exc:
        raise CheckpointError(f"checkpoint {uri}: cannot be read ({exc})") from exc


def load_state_dict(uri: str | Path, map_location: str | torch.device = "cpu", key: str | None = None) -> dict:
    """A plain ``{name: Tensor}`` state dict from a local path or URI.

    Loading uses ``weights_only=True``, so a file holding arbitrary pickled objects is refused without
    running any of its code. A dict wrapping the state dict under ``key`` (or, when ``key`` is None, a single
    one of ``g_ema``/``state_dict``/``G``) is unwrapped.
    """
    data = _read(uri)
    if not data:
        raise CheckpointError(f"checkpoint {uri}: file is empty")
    if not (data.startswith(b"PK") or data[:1] == b"\x80"):  # zip (torch.save) or legacy pickle
        raise CheckpointError(f"checkpoint {uri}: not a readable PyTorch file (neither zip nor pickle)")
    try:
        obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        culprit = next((ln.strip() for ln in str(exc).splitlines() if "Unsupported global" in ln), "")
        raise CheckpointError(f"checkpoint {uri}: refused, it holds objects other than tensors "
                              f"(only plain state dicts are loaded) {culprit}".rstrip()) from None
    except Exception as exc:  # zip/format errors come as RuntimeError and friends
        raise CheckpointError(f"checkpoint {uri}: not a readable PyTorch file ({exc})") from None
    if isinstance(obj, Mapping) and key is not None:
        if key not in obj:
            raise CheckpointError(f"checkpoint {uri}: no entry {key!r} (has {sorted(map(str, obj))[:10]})")
        obj = obj[key]
    elif isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        wrapped = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if len(wrapped) == 1:
            obj = obj[wrapped[0]]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {uri}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {uri}: not a plain state dict; non-tensor entries: {bad[:10]}")
    return dict(obj)


def load_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load strictly; on any mismatch raise one error listing missing, unexpected and mis-shaped keys."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [f"{k}: expected {tuple(expected[k].shape)}, got {tuple(state_dict[k].shape)}"
                 for k in expected if k in state_dict and tuple(expected[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or misshaped:
        parts = [f"{source} does not match {type(module).__name__}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("mis-shaped keys", misshaped)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
                parts.append(f"  {title}: {shown}")
        raise CheckpointMismatchError("\n".join(parts))
    module.load_state_dict(state_dict, strict=True)


def to_bytes(obj: nn.Module | Mapping[str, torch.Tensor]) -> bytes:
    sd = obj.state_dict() if isinstance(obj, nn.Module) else dict(obj)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in sd.items()}, buf)
    return buf.getvalue()


def save_state_dict(obj: nn.Module | Mapping[str, torch.Tensor], uri: str | Path) -> str:
    """Write a plain state dict atomically (local or S3); returns its sha256."""
    from pipeline import storage

    data = to_bytes(obj)
    storage.write_bytes(str(uri), data)
    return hashlib.sha256(data).hexdigest()


def sha256_of(uri_or_bytes: str | Path | bytes) -> str:
    data = uri_or_bytes if isinstance(uri_or_bytes, bytes) else _read(uri_or_bytes)
    return hashlib.sha256(data).hexdigest()
