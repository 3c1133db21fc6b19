"""`sketchgan preprocess`: LSUN LMDB / image folder / Parquet -> image + sketch pairs in Parquet, on Ray Data.

read (parallel key ranges / files) -> decode -> RGB -> centre crop -> antialiased resize -> sketch -> PNG
-> Parquet. The sketch network runs in an actor pool sized to the cluster: one actor per GPU, or on CPU-only
clusters one actor per node whose torch threads use the node's cores. Each actor takes two batches at once:
while one batch is in the network (under a lock, so the cores are not oversubscribed), the other is decoded,
resized or PNG-encoded. On GPU clusters decoding runs in separate CPU tasks instead, spread over every node.
PhotoSketch runs in bf16 where the hardware multiplies bf16 in matrix units (``data.sketch_precision: auto``;
GPUs, CPUs with AMX or AVX-512 BF16), in fp32 elsewhere; the manifest records which.

Bad records become rows of the dataset's error table (source key + reason) and the run fails, publishing nothing,
when more than ``data.max_error_rate`` of the records are bad. Everything is written below a hidden staging
location next to the output and published whole (`storage.staged_publish`, the manifest last); a dataset without
a manifest is incomplete and readers refuse it. Ids derive from the category and source key, so a re-run yields
the same rows and replaces the dataset (no duplicates).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import layout, storage
from pipeline.config import Config
from pipeline.data.images import BadRecord, encode_png, load_image
from pipeline.raysession import ensure_ray

log = logging.getLogger("sketchgan.data")

FORMAT_VERSION = 1  # bump when the rows' content changes for the same input and settings
ERROR_SCHEMA = pa.schema([("source_key", pa.string()), ("reason", pa.string())])
PAIR_COLUMNS = ("id", "category", "source_key", "image", "sketch", "size", "sketcher")


class PreprocessError(ValueError):
    """The preprocess stage cannot produce a usable dataset; the message says why."""


def record_id(category: str, source_key: str) -> str:
    """The deterministic row id: the same image of the same category always gets the same id."""
    return hashlib.sha256(f"{category}/{source_key}".encode()).hexdigest()[:24]


def decode_batch(batch: dict[str, Any], size: int, max_pixels: int) -> dict[str, Any]:
    """Encoded bytes -> uint8 pixels (zeros for bad records) and a reason per row ('' when fine)."""
    keys = [str(k) for k in batch["source_key"]]
    pixels = np.zeros((len(keys), size, size, 3), dtype=np.uint8)
    reasons = []
    for i, data in enumerate(batch["data"]):
        try:
            pixels[i] = load_image(bytes(data) if data is not None else b"", size, "RGB", max_pixels)
            reasons.append("")
        except BadRecord as exc:
            reasons.append(exc.reason)
    return {"source_key": np.array(keys, dtype=object), "pixels": pixels, "reason": np.array(reasons, dtype=object)}


def sketch_pixels(net, pixels: np.ndarray, device, chunk: int, dtype=None) -> np.ndarray:
    """uint8 N×H×W×3 images -> uint8 N×H×W sketches, ``chunk`` images per network call in ``dtype``
    (the network's own dtype; default float32)."""
    import torch

    dtype = dtype or torch.float32
    out = np.empty(pixels.shape[:3], dtype=np.uint8)
    with torch.inference_mode():
        for lo in range(0, len(pixels), chunk):
            # NHWC memory viewed as NCHW is channels-last already: no copy before the network
            x = torch.from_numpy(pixels[lo:lo + chunk]).to(device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
            s = net(x.to(dtype))[:, 0].float()
            out[lo:lo + chunk] = s.clamp_(-1, 1).add_(1).mul_(127.5).add_(0.5).to(torch.uint8).cpu().numpy()
    return out


class SketchWorker:
    """Actor: holds one sketcher (on the actor's GPU when it has one) and turns records into pair rows."""

    def __init__(self, sketcher: str, weights: str | None, fingerprint: str, category: str, size: int,
                 max_pixels: int, threads: int | None = None, chunk: int = 8, precision: str = "fp32"):
        import torch

        from pipeline.models.factory import device_default
        from pipeline.models.sketchers import build_sketcher, has_fast_bf16

        if threads:
            torch.set_num_threads(threads)
        self.device = device_default()
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        self.net = build_sketcher(sketcher, weights, norm="per_image", device=self.device).to(self.dtype)
        if precision == "bf16" and not has_fast_bf16(self.device):
            log.warning("sketching in bf16 on %s, which has no bf16 matrix units: expect it to be slower than fp32 "
                        "(set data.sketch_precision: fp32)", self.device)
        self.fingerprint, self.category, self.size, self.max_pixels = fingerprint, category, size, max_pixels
        self.chunk = chunk
        self.lock = threading.Lock()  # one batch in the network at a time; the others decode or encode

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if "pixels" not in batch:
            batch = decode_batch(batch, self.size, self.max_pixels)
        keys = [str(k) for k in batch["source_key"]]
        reasons = [str(r) for r in batch["reason"]]
        ok = [i for i, r in enumerate(reasons) if not r]
        images, sketches = [b""] * len(keys), [b""] * len(keys)
        if ok:
            pixels = np.ascontiguousarray(batch["pixels"][ok])
            with self.lock:
                s8 = sketch_pixels(self.net, pixels, self.device, self.chunk, self.dtype)
            for j, i in enumerate(ok):
                images[i], sketches[i] = encode_png(pixels[j]), encode_png(s8[j])
        return {
            "id": [record_id(self.category, k) for k in keys],
            "category": [self.category] * len(keys),
            "source_key": keys,
            "image": images,
            "sketch": sketches,
            "size": np.full(len(keys), self.size, dtype=np.int64),
            "sketcher": [self.fingerprint] * len(keys),
            "reason": reasons,
        }


def _pairs_datasink_class():
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from ray.data import Datasink

    class PairsDatasink(Datasink):
        """Writes each task's rows below the staging location: pairs to the category's partition, bad records to
        the error table, one ``part-N`` file each (a retried task rewrites the same names: no duplicates)."""

        def __init__(self, staging: str, category: str, rows_per_file: int):
            self.staging, self.category, self.rows_per_file = staging, category, rows_per_file
            self.result: dict[str, Any] | None = None

        @property
        def min_rows_per_write(self) -> int:
            return self.rows_per_file

        def get_name(self) -> str:
            return "PairsParquet"

        def write(self, blocks, ctx) -> dict[str, Any]:
            tables = [pa.Table.from_pydict(b) if isinstance(b, dict) else
                      (b if isinstance(b, pa.Table) else pa.Table.from_pandas(b, preserve_index=False))
                      for b in blocks]
            tables = [t for t in tables if t.num_rows]
            if not tables:
                return {"rows": 0, "good": 0, "bad": 0, "examples": [], "files": []}
            table = pa.concat_tables(tables, promote_options="default")
            bad_mask = pc.not_equal(table["reason"], "")
            good = table.filter(pc.invert(bad_mask)).select(list(PAIR_COLUMNS))
            bad = table.filter(bad_mask).select(["source_key", "reason"]).cast(ERROR_SCHEMA)
            name = f"part-{ctx.task_idx:06d}.parquet"
            files = []
            for rel, part in ((layout.pairs_part(self.category, name), good), (layout.errors_part(name), bad)):
                if part.num_rows:
                    fs, path = storage.filesystem(storage.join(self.staging, rel))
                    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
                    pq.write_table(part, path, filesystem=fs)
                    files.append(rel)
            examples = list(zip(bad["source_key"].to_pylist()[:10], bad["reason"].to_pylist()[:10]))
            return {"rows": table.num_rows, "good": good.num_rows, "bad": bad.num_rows,
                    "examples": examples, "files": files}

        def on_write_complete(self, write_result) -> None:
            returns = [r for r in write_result.write_returns if r]
            self.result = {
                "rows": sum(r["rows"] for r in returns), "good": sum(r["good"] for r in returns),
                "bad": sum(r["bad"] for r in returns),
                "examples": [e for r in returns for e in r["examples"]][:20],
                "files": sorted(f for r in returns for f in r["files"]),
            }

    return PairsDatasink


def node_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def actor_plan(cfg: Config) -> dict[str, Any]:
    """How many sketch actors, with which resources: one per GPU; on CPU-only clusters one per node, holding
    all but one of its CPUs (the last one keeps read and write tasks moving) and using all of them."""
    import ray

    d = cfg.data
    gpus = int(ray.cluster_resources().get("GPU", 0))
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    if gpus:
        return {"actors": d.num_actors or gpus, "num_cpus": 1.0, "num_gpus": 1.0, "threads": d.actor_threads or 2,
                "separate_decode": True}
    per_node = int(min(n["Resources"]["CPU"] for n in nodes)) if nodes else node_cpus()
    # A one-CPU node: the actor reserves nothing, or it would hold the only CPU and starve the reads it waits for.
    return {"actors": d.num_actors or max(1, len(nodes)), "num_cpus": float(max(0, per_node - 1)),
            "num_gpus": 0.0, "threads": d.actor_threads or per_node, "separate_decode": False}


def dataset_id(category: str, size: int, sketcher: str, input_fingerprint: str, precision: str = "fp32") -> str:
    """The dataset's id: the same input, settings and code give the same id (and the same rows)."""
    # fp32 keeps the ids that datasets had before the precision setting existed
    sketcher = sketcher if precision == "fp32" else f"{sketcher}@{precision}"
    blob = f"{FORMAT_VERSION}|{category}|{size}|{sketcher}|{input_fingerprint}"
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def build_pipeline(cfg: Config, staging: str):
    """(dataset to write, datasink, input fingerprint, sketcher fingerprint, actor plan) for ``cfg.data``; the
    plan holds the sketch precision that ``data.sketch_precision`` resolved to."""
    import ray.data

    from pipeline.data.lsun import read_source
    from pipeline.models.sketchers import resolve_sketch_precision, sketcher_fingerprint

    d = cfg.data
    fingerprint = sketcher_fingerprint(d.sketcher, d.sketcher_weights)
    ds, input_fp = read_source(d.source, d.limit)
    plan = actor_plan(cfg)
    plan["precision"] = resolve_sketch_precision(d.sketcher, d.sketch_precision, gpus=plan["num_gpus"] > 0)
    if plan["separate_decode"]:
        ds = ds.map_batches(decode_batch, fn_kwargs={"size": d.size, "max_pixels": d.max_image_pixels},
                            batch_format="numpy", batch_size=d.batch_size, num_cpus=1)
    compute = ray.data.ActorPoolStrategy(min_size=1, max_size=plan["actors"], max_concurrent_calls_per_actor=2,
                                         enable_true_multi_threading=True)
    ds = ds.map_batches(
        SketchWorker,
        fn_constructor_kwargs={"sketcher": d.sketcher, "weights": d.sketcher_weights, "fingerprint": fingerprint,
                               "category": d.category, "size": d.size, "max_pixels": d.max_image_pixels,
                               "threads": plan["threads"], "chunk": d.network_batch,
                               "precision": plan["precision"]},
        batch_size=d.batch_size, batch_format="numpy", compute=compute, num_cpus=plan["num_cpus"],
        num_gpus=plan["num_gpus"])
    sink = _pairs_datasink_class()(staging, d.category, d.rows_per_file)
    return ds, sink, input_fp, fingerprint, plan


def preprocess(cfg: Config) -> str:
    """Run the stage for ``cfg.data`` and publish the dataset; returns the summary line."""
    from pipeline.models.sketchers import build_sketcher

    d = cfg.data
    if not d.source:
        raise PreprocessError("data.source is not set (--source): an LSUN LMDB folder, image folder or Parquet URI")
    out = layout.dataset_uri(cfg)
    build_sketcher(d.sketcher, d.sketcher_weights)  # a bad name or unusable weights fail here, before any work
    storage.ensure_writable(out.rstrip("/").rsplit("/", 1)[0])
    ensure_ray()
    t0 = time.time()
    with storage.staged_publish(out, marker=layout.MANIFEST) as staging:
        counts, rate = _run(cfg, d, out, staging, t0)
    elapsed = time.time() - t0
    return (f"{counts['rows_in']} records in, {counts['rows_out']} pairs out, {counts['errors']} errors "
            f"({rate:.2%}), {counts['rows_in'] / max(elapsed, 1e-9):.1f} images/s over {elapsed:.1f}s -> {out}")


def _run(cfg: Config, d, out: str, staging: str, t0: float) -> tuple[dict, float]:
    """Build and run the dataset into ``staging`` and write its manifest (the body of `preprocess`)."""
    import ray.data

    # Rows leave in the source's order and fill the part files in that order: the same input gives the same
    # files, byte for byte, so a training run that reads them sees the same stream whenever it was preprocessed.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds, sink, input_fp, fingerprint, plan = build_pipeline(cfg, staging)
    log.info("preprocess %s -> %s: %d sketch actor(s), %d torch threads each, sketching in %s", d.source, out,
             plan["actors"], plan["threads"], plan["precision"])
    ds.write_datasink(sink)
    result = sink.result or {"rows": 0, "good": 0, "bad": 0, "examples": [], "files": []}
    counts = {"rows_in": result["rows"], "rows_out": result["good"], "errors": result["bad"]}
    if counts["rows_in"] == 0:
        raise PreprocessError(f"the source {d.source} yielded no records")
    rate = counts["errors"] / counts["rows_in"]
    for key, reason in result["examples"][:10]:
        log.warning("bad record %s: %s", key, reason)
    if rate > d.max_error_rate:
        examples = "; ".join(f"{k}: {r}" for k, r in result["examples"][:5])
        raise PreprocessError(
            f"{counts['errors']} of {counts['rows_in']} records from {d.source} are bad ({rate:.2%} > "
            f"data.max_error_rate {d.max_error_rate:.2%}); nothing was published. First ones: {examples}")
    files = result["files"]
    if not any(f.startswith(layout.errors_part("")) for f in files):  # keep errors/ readable with its schema
        empty = layout.errors_part("part-none.parquet")
        storage.write_parquet(storage.join(staging, empty), ERROR_SCHEMA.empty_table())
        files = [*files, empty]
    manifest = {
        "id": dataset_id(d.category, d.size, fingerprint, input_fp, plan["precision"]),
        "format_version": FORMAT_VERSION, "category": d.category, "size": d.size, "sketcher": fingerprint,
        "sketch_precision": plan["precision"], "source": d.source, "limit": d.limit,
        "input_fingerprint": input_fp, "counts": counts, "rows": counts["rows_out"],
        "config": d.model_dump(mode="json"), "files": files, "seconds": round(time.time() - t0, 2),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    storage.write_json(storage.join(staging, layout.MANIFEST), manifest)
    return counts, rate
