"""A training run's storage: its start record, metrics, sample grids, rotating checkpoints and final output.

Everything lives below the run's URI (names in `pipeline.layout`). Checkpoints hold everything a bit-exact
continuation needs; a pointer names the newest complete one. The final output is published whole, its metadata
last: a run with final metadata has finished.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

import torch

from pipeline import layout, storage
from pipeline.data.images import grid_png
from pipeline.models import factory
from pipeline.models.checkpoints import save_state_dict, sha256_of
from pipeline.models.sampling import sample_grid_images
from pipeline.train.spec import RunSpec

CHECKPOINT_FORMAT = 1


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_run_info(spec: RunSpec) -> None:
    """The run's start record: what it is and was started with (read back when it is continued or logged)."""
    storage.write_json(layout.run_info_uri(spec.run_uri),
                       {"run_name": spec.run_name, "kind": spec.kind, "sketch_set": spec.sketch_set,
                        "config": spec.config, "started_at": utc_now()})


def write_metrics(run_uri: str, history: list[dict]) -> None:
    storage.write_text(layout.metrics_uri(run_uri), "".join(json.dumps(m) + "\n" for m in history))


def write_samples(run_uri: str, G: torch.nn.Module, z: torch.Tensor, iteration: int, device) -> str:
    """A 4×4 grid of G's images for fixed latents and fixed noise, as the run's sample for ``iteration``."""
    uri = layout.sample_uri(run_uri, iteration)
    storage.write_bytes(uri, grid_png(sample_grid_images(G, z, device), ncol=4))
    return uri


# -- checkpoints ----------------------------------------------------------------------------------------------
def latest_checkpoint(run_uri: str) -> str | None:
    """The URI of a run's latest complete checkpoint, or None."""
    pointer = layout.checkpoint_pointer_uri(run_uri)
    if not storage.exists(pointer):
        return None
    uri = storage.read_json(pointer)["uri"]
    return uri if storage.exists(uri) else None


def resumable_iteration(run_uri: str) -> int:
    """The iteration a run would continue from: its latest checkpoint's, 0 when it has none (or it is gone)."""
    pointer = layout.checkpoint_pointer_uri(run_uri)
    if not storage.exists(pointer):
        return 0
    latest = storage.read_json(pointer)  # read once: its checkpoint and its iteration
    return int(latest.get("iteration", 0)) if storage.exists(latest["uri"]) else 0


def checkpoint_iteration(run_uri: str) -> int | None:
    """The iteration of the run's latest checkpoint (from its pointer), or None when it has none."""
    pointer = layout.checkpoint_pointer_uri(run_uri)
    return int(storage.read_json(pointer).get("iteration", 0)) if storage.exists(pointer) else None


def save_checkpoint(run_uri: str, iteration: int, state: dict, keep: int, name: str | None = None,
                    rotate: bool = True) -> str:
    """Write the iteration's checkpoint atomically, move the latest pointer to it, then drop all but the last
    ``keep`` rotated ones (unless ``rotate`` is off: `rotate_checkpoints` later). ``name`` (e.g. ``best``)
    writes a named checkpoint and pointer, outside the rotation.
    """
    uri = layout.checkpoint_uri(run_uri, iteration, name)
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(uri, buf.getvalue())
    storage.write_json(layout.checkpoint_pointer_uri(run_uri, name), {"uri": uri, "iteration": iteration})
    if name is None and rotate:
        rotate_checkpoints(run_uri, keep)
    return uri


def rotate_checkpoints(run_uri: str, keep: int) -> None:
    """Drop all but the run's last ``keep`` rotated checkpoints."""
    rotated = [u for u in storage.list_files(layout.checkpoints_uri(run_uri), suffix=".pt")
               if layout.is_rotated_checkpoint(u)]
    for old in rotated[:-keep]:
        storage.delete(old)


def save_best_generator(run_uri: str, iteration: int, published_g: torch.nn.Module) -> None:
    """The generator of a new best checkpoint, ready to publish beside the last one (written before best.pt;
    named by its iteration, so a run resumed from before it never publishes a best it rolled back)."""
    uri = layout.best_generator_uri(run_uri, iteration)
    save_state_dict(published_g, uri)
    for old in storage.list_files(layout.checkpoints_uri(run_uri), suffix=".pth"):
        if old != uri:
            storage.delete(old)


def load_checkpoint(uri: str) -> dict:
    """A checkpoint written by `save_checkpoint` (tensors and plain containers only)."""
    try:
        return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except (OSError, ValueError):
        raise
    except Exception as exc:
        raise ValueError(f"checkpoint {uri}: not readable ({exc})") from None


# -- the final output -----------------------------------------------------------------------------------------
def write_final(spec: RunSpec, published_g: torch.nn.Module, discriminators: dict[str, torch.nn.Module],
                final_metrics: dict, resumed_at: list[int], best: dict | None) -> None:
    """Publish the run's final output whole: the generator, the discriminators (file name -> module) and the
    metadata, which goes last and means "this run finished"."""
    cfg = spec.cfg
    run_final = layout.final_uri(spec.run_uri)
    with storage.staged_publish(run_final, marker=layout.FINAL_METADATA) as staging:
        g_sha = save_state_dict(published_g, storage.join(staging, layout.G_FILE))
        best_g = layout.best_generator_uri(spec.run_uri, best["iteration"]) if best else None
        if best_g is not None and storage.exists(best_g):  # registration may take it instead (registry.checkpoint)
            data = storage.read_bytes(best_g)
            storage.write_bytes(storage.join(staging, layout.G_BEST_FILE), data)
            best = {**best, "g_sha256": sha256_of(data)}
        for name, module in discriminators.items():
            save_state_dict(module, storage.join(staging, name))
        base_sha = spec.base_g_sha256
        if base_sha is None and spec.kind == "train" and cfg.model.base_g:
            base_sha = sha256_of(cfg.model.base_g)
        metadata: dict[str, Any] = {
            "run_name": spec.run_name, "run_uri": spec.run_uri, "kind": spec.kind,
            "arch": factory.generator_kwargs(cfg.model), "config": spec.config, "category": cfg.data.category,
            "sketch_set": spec.sketch_set or None, "base_g": cfg.model.base_g if spec.kind == "train" else None,
            "base_g_sha256": base_sha, "g_sha256": g_sha, "dataset_manifest_id": spec.dataset_manifest_id,
            "evalset": spec.evalset_uri, "iterations": spec.section.iterations, "final_metrics": final_metrics,
            "fid": final_metrics.get("fid"), "best": best, "resumed_at": resumed_at, "finished_at": utc_now(),
        }
        storage.write_json(storage.join(staging, layout.FINAL_METADATA), metadata)


def mark_unfinished(run_uri: str) -> None:
    """A finished run being continued past its end is not finished until it finishes again."""
    storage.delete(layout.final_metadata_uri(run_uri))
