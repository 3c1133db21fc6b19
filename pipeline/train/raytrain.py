"""The Ray Train edge of training: one `TorchTrainer` per planned run or packed group of runs (`plan.pack_groups`),
several at once.

Real images stream to the workers as Ray Data (a small dataset materialised once and split one part per rank;
a large one as a streaming split); the small sketch set goes whole to every worker through the object store.
The per-worker function runs `pipeline.train.loop.run_worker` (shared with Tune trials and the benchmarks), or
`pipeline.train.packed_loop.run_packed_worker` for a packed group.

Storage is the source of truth: checkpoints live in the run's folder; Ray Train only tracks a pointer to the
latest one, which ``ray.train.get_checkpoint()`` hands back to a restarted worker group after a failure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline import layout, storage
from pipeline.config import Config, SketchSetSpec
from pipeline.progress import Poller, Progress
from pipeline.raysession import ensure_ray
from pipeline.train import plan as planning
from pipeline.train import run_store
from pipeline.train.plan import RunPlan
from pipeline.train.spec import RunSpec, TestHooks

log = logging.getLogger("sketchgan.train")

CRASH_ENV = "SKETCHGAN_TEST_CRASH_AT"  # tests only: "ITER:MARKER_FILE" -> one worker dies once at ITER
POINTER_FILE = "sketchgan_checkpoint.json"  # inside Ray Train's checkpoint: which of our checkpoints it means
MATERIALIZE_MAX_BYTES = 512 * 2**20


class TrainingRunError(RuntimeError):
    """One or more training runs failed while running (after validation)."""


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's per-worker function: ``config`` is `train_loop_config` (see `trainer_for`)."""
    import ray
    import ray.train

    from pipeline.train.loop import run_worker
    from pipeline.train.streams import decode_png_batch

    _quiet_worker_logs()
    specs: list[RunSpec] = config["specs"]
    spec = specs[0]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    per_worker = spec.section.batch_size // world
    seed = spec.section.seed

    make_epoch = None
    if config.get("has_images"):
        # a small (materialised) dataset comes as one ready part per rank, else as a streaming split shard
        shard = ray.train.get_dataset_shard(f"images_{rank}" if config.get("images_per_rank") else "images")

        def make_epoch(epoch: int):
            return shard.iter_batches(batch_size=per_worker, batch_format="numpy", drop_last=True,
                                      local_shuffle_buffer_size=config.get("shuffle_buffer") or None,
                                      local_shuffle_seed=(seed * 100_003 + epoch * 101 + rank) % 2**31)

    sketches = [None] * len(specs)
    if spec.kind == "train":
        sketches = [decode_png_batch(ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref, 1,
                                     spec.cfg.model.size) for ref in config["sketches"]]
    hooks = TestHooks(**config["test_hooks"]) if config.get("test_hooks") else None
    if len(specs) > 1:  # a packed group: each set resumes from its own folder (`packed_loop.group_start`)
        from pipeline.train.packed_loop import run_packed_worker

        def report_group(rows: dict[str, dict]) -> None:
            first = next(iter(rows.values()))
            ray.train.report({"iteration": first["iteration"], "sets": len(rows),
                              **{f"{name}/{k}": v for name, row in rows.items() for k, v in row.items()
                                 if k != "iteration"}})

        run_packed_worker(specs, make_epoch, sketches, report=report_group, hooks=hooks)
        return

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker group: continue from what the failed attempt saved
        with checkpoint.as_directory() as d:
            resume = json.loads((Path(d) / POINTER_FILE).read_text())["uri"]
        if not storage.exists(resume):
            log.warning("%s: Ray Train's checkpoint points at %s, which is gone; using the run's latest",
                        spec.run_name, resume)
            resume = None

    def report(metrics: dict, checkpoint_uri: str | None) -> None:
        if checkpoint_uri is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / POINTER_FILE).write_text(json.dumps({"uri": checkpoint_uri,
                                                            "iteration": metrics.get("iteration")}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    run_worker(spec, make_epoch, sketches[0], report=report, rank=rank, world_size=world,
               resume_checkpoint=resume, hooks=hooks)


def _quiet_worker_logs() -> None:
    """Ray's INFO lines on a training worker (each report, each epoch's dataset) repeat what the driver's
    progress shows: raise those loggers to WARNING (and Ray Data's note that its bars are off, to ERROR)."""
    try:  # Ray Train v2 names this logger after its file
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


@contextlib.contextmanager
def follow(plans: list[RunPlan]) -> Iterator[None]:
    """Show each run's progress (iteration, loss, ETA) from the metrics it writes to storage."""
    bars = {p.run_name: Progress(p.run_name, p.spec.section.iterations, position=i,
                                 initial=run_store.checkpoint_iteration(p.spec.run_uri) or 0)
            for i, p in enumerate(plans)}

    def poll() -> None:
        for p in plans:
            rows = layout.read_metrics(p.spec.run_uri)
            if rows:
                last = rows[-1]
                loss = last.get("loss_sketch", last.get("loss_g"))
                bars[p.run_name].update_to(last["iteration"], f"loss {loss:.3f}" if loss is not None else "",
                                           last.get("it_per_s"))

    try:
        with Poller(poll):
            yield
    finally:
        for bar in bars.values():
            bar.close()


def _test_hooks_from_env() -> dict | None:
    raw = os.environ.get(CRASH_ENV)
    if not raw:
        return None
    at, marker = raw.split(":", 1)
    return {"crash_at": int(at), "crash_marker": marker}


def image_dataset(dataset_uri: str):
    """A preprocessed dataset's images: a small one as Arrow tables read here, on the driver (one per part file,
    in order); a large one as a lazy Ray Dataset that streams from storage."""
    import pyarrow.parquet as pq
    import ray.data

    pairs = layout.pairs_uri(dataset_uri)
    entries = storage.list_entries(pairs, suffix=".parquet")
    fs, path = storage.filesystem(pairs)
    if sum(e.size for e in entries) > MATERIALIZE_MAX_BYTES:
        return ray.data.read_parquet(path, filesystem=fs, columns=["image"])
    return [pq.read_table(e.path, filesystem=fs, columns=["image"]) for e in entries]


def ray_storage(cfg: Config) -> dict[str, Any]:
    """RunConfig storage arguments: Ray Train's own (small) state below the storage root."""
    root = layout.ray_train_uri(cfg)
    if storage.is_s3(root):
        fs, path = storage.filesystem(root)
        return {"storage_path": path, "storage_filesystem": fs}
    return {"storage_path": str(Path(root).resolve())}


def prepare_run_inputs(plans: list[RunPlan]) -> dict[str, dict[str, Any]]:
    """Each run's inputs, prepared on the driver before any trainer starts: read tasks then cannot starve behind
    training workers that hold every CPU. Runs on the same dataset share one read of it."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the same stream on every attempt: bit-exact resume
    ctx.enable_progress_bars = False
    images: dict[str, Any] = {}
    parts: dict[tuple[str, int], tuple[dict[str, Any], bool]] = {}
    out = {}
    for plan in plans:
        data: dict[str, Any] = {}
        if plan.dataset_uri is not None:
            if plan.dataset_uri not in images:
                images[plan.dataset_uri] = image_dataset(plan.dataset_uri)
            key = (plan.dataset_uri, plan.spec.section.num_workers)
            if key not in parts:
                parts[key] = image_datasets(images[plan.dataset_uri], key[1])
            data["images"] = parts[key]
        if plan.sketch_set is not None:
            data["sketches"] = ray.put(plan.sketch_set.blobs)
        out[plan.run_name] = data
    return out


def image_datasets(images, num_workers: int) -> tuple[dict[str, Any], bool]:
    """Ray Train's ``datasets`` for a run's real images, and whether they come one part per rank.

    A lazy dataset goes as a streaming split: each epoch re-reads storage, driven by a coordinator actor (one
    more process beside training). Small ones (`image_dataset`'s tables) are instead cut here into equal
    contiguous parts, one per rank (``images_<r>``, the remainder dropped), and put into the object store by
    this driver: their only copy then lives on the driver's node, so losing another node loses no images
    (blocks made by tasks there would be lost with it, and a restarted worker would wait for them forever).
    """
    import pyarrow as pa
    import ray.data

    if images is None:
        return {}, False
    if isinstance(images, ray.data.Dataset):
        return {"images": images}, False
    whole = pa.concat_tables(images)
    n = whole.num_rows // num_workers
    if n == 0:
        raise ValueError(f"{whole.num_rows} real images cannot be split among {num_workers} workers")
    parts = {}
    for rank in range(num_workers):
        # keep the part files' chunks as blocks: the same batches, shuffled the same way, as a streamed read
        blocks = [pa.Table.from_batches([b]) for b in whole.slice(rank * n, n).to_batches() if b.num_rows]
        parts[f"images_{rank}"] = ray.data.from_arrow(blocks)
    return parts, True


def trainer_for(group: list[RunPlan], data: dict[str, dict[str, Any]], callbacks: list | None = None):
    """The `TorchTrainer` for one run, or for a packed group of runs (one worker), given `prepare_run_inputs`
    (``callbacks`` go to `RunConfig`, e.g. Tune's report callback)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train.backend import torch_config_for

    spec = group[0].spec
    run = spec.section
    if len(group) > 1 and run.num_workers != 1:
        raise ValueError(f"a packed group trains on one worker, not train.num_workers={run.num_workers}")
    datasets, per_rank = data[spec.run_name].get("images") or ({}, False)
    resources: dict[str, float] = {"CPU": run.cpus_per_worker}
    if run.use_gpu:
        resources["GPU"] = run.gpus_per_worker or 1.0  # fractional: several small fine-tunes share one GPU
    config = {"specs": [p.spec for p in group], "has_images": bool(datasets), "images_per_rank": per_rank,
              "shuffle_buffer": 64, "sketches": [data[p.run_name].get("sketches") for p in group],
              "test_hooks": _test_hooks_from_env()}
    name = spec.run_name if len(group) == 1 else f"{spec.run_name}-and-{len(group) - 1}"
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=run.num_workers, use_gpu=run.use_gpu,
                                     resources_per_worker=resources, placement_strategy=run.placement_strategy),
        torch_config=torch_config_for(run.num_workers),
        run_config=RunConfig(
            # a fresh Ray Train run per launch: our checkpoints, not Ray's, carry state across launches
            name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            failure_config=FailureConfig(max_failures=run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints),
            # Ray Train's INFO lines (resources requested, worker group started) say nothing a user acts on
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=callbacks, **ray_storage(spec.cfg)),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[] if per_rank else list(datasets)),
    )


def fit_plan(plan: RunPlan, data: dict[str, Any] | None = None, callbacks: list | None = None) -> dict[str, Any]:
    """Run (or reuse) one planned run to completion; returns a summary with its final metadata."""
    return fit_group([plan], {plan.run_name: data} if data is not None else None, callbacks)[0]


def fit_group(group: list[RunPlan], data: dict[str, dict[str, Any]] | None = None,
              callbacks: list | None = None) -> list[dict[str, Any]]:
    """Run (or reuse) planned runs to completion, several in one packed step when the group holds several;
    returns a summary per run with its final metadata."""
    summaries = [{"run_name": p.run_name, "run_uri": p.spec.run_uri} for p in group]
    if all(p.state == "finished" for p in group):
        for p in group:
            log.info("%s already finished at %s: reusing it", p.run_name, p.spec.run_uri)
        return [{**s, "reused": True, "metadata": layout.open_finished_run(p.spec.run_uri).metadata}
                for s, p in zip(summaries, group)]
    if any(p.state == "finished" for p in group):
        raise ValueError("a packed group mixes finished and unfinished runs")  # pack_groups never makes one
    ensure_ray()
    if data is None:
        data = prepare_run_inputs(group)
    t0 = time.time()
    for p in group:
        spec = p.spec
        if p.state == "continue":
            run_store.mark_unfinished(spec.run_uri)
        run_store.write_run_info(spec)
        log.info("%s: %s (%d iterations)%s", spec.run_name, "continuing" if p.state == "continue" else "starting",
                 spec.section.iterations, f", sketch set {spec.sketch_set['name']}" if spec.sketch_set else "")
    if len(group) > 1:
        log.info("%s: trained together in one step", ", ".join(p.run_name for p in group))
    fit_restoring_sigint(trainer_for(group, data, callbacks))
    finished = [layout.finished_run(p.spec.run_uri) for p in group]
    missing = [layout.final_metadata_uri(p.spec.run_uri) for p, f in zip(group, finished) if f is None]
    if missing:
        raise TrainingRunError("training ended without writing " + ", ".join(missing))
    out = []
    for s, p, f in zip(summaries, group, finished):
        log.info("%s finished in %.0fs -> %s", p.run_name, time.time() - t0, p.spec.run_uri)
        out.append({**s, "reused": False, "seconds": round(time.time() - t0, 1), "metadata": f.metadata})
    return out


def fit_restoring_sigint(trainer) -> None:
    """``trainer.fit()``; on the main thread Ray Train installs a Ctrl-C handler that aborts this run's controller,
    put back afterwards: left in place it keeps the finished controller's process alive and swallows the next
    Ctrl-C (e.g. while a chained command registers or benchmarks)."""
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if on_main else None
    try:
        trainer.fit()
    finally:
        if on_main and previous is not None:
            signal.signal(signal.SIGINT, previous)


def run_training(cfg: Config, sketch: SketchSetSpec, run_name: str | None = None,
                 callbacks: list | None = None) -> dict[str, Any]:
    """Validate and fit one GANSketching run (what a Tune trial calls); returns its summary."""
    planning.check_workers(cfg.train, "train")
    base_sha = planning.check_base_checkpoints(cfg)
    return fit_plan(planning.plan_train_run(cfg, sketch, run_name, base_g_sha=base_sha), callbacks=callbacks)


def train_all(cfg: Config) -> list[dict[str, Any]]:
    """Customise the base model once per sketch set, several runs at once; one summary per run."""
    plans = planning.plan_train(cfg)  # every input of every run checked before any worker starts
    todo = [plan for plan in plans if plan.state != "finished"]
    pack = planning.pack_size(cfg) if todo else 1  # refused settings are refused before Ray starts
    if todo:
        ensure_ray()
    data = prepare_run_inputs(todo) if todo else {}
    groups = [[plan] for plan in plans if plan.state == "finished"]
    groups += planning.pack_groups(todo, pack)
    workers = max(1, min(cfg.train.max_concurrent_runs, len(groups)))
    with follow(todo), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="train-run") as pool:
        by_name, failures = {}, {}
        for group, exc in _fit_groups(pool, groups, data, by_name):
            if len(group) == 1:
                failures[group[0].run_name] = exc
                continue
            # one set's failure fails its whole group: train the group's sets one by one, so that only the
            # failing one fails (each continues from its own latest checkpoint)
            log.warning("packed group %s failed (%s): training its sets separately",
                        ", ".join(p.run_name for p in group), exc)
            for single, single_exc in _fit_groups(pool, [[p] for p in group], data, by_name):
                failures[single[0].run_name] = single_exc
        results = [by_name[plan.run_name] for plan in plans if plan.run_name in by_name]
    if failures:
        raise TrainingRunError(f"{len(failures)} of {len(plans)} training runs failed:\n  " +
                               "\n  ".join(f"{name}: {exc}" for name, exc in failures.items()))
    return results


def _fit_groups(pool: ThreadPoolExecutor, groups: list[list[RunPlan]], data: dict, by_name: dict
                ) -> list[tuple[list[RunPlan], Exception]]:
    """Fit the groups in the pool, each summary into ``by_name``; returns the groups that failed, with why."""
    futures = [(group, pool.submit(fit_group, group, data)) for group in groups]
    failed = []
    for group, fut in futures:
        try:
            by_name.update((s["run_name"], s) for s in fut.result())
        except Exception as exc:  # keep the other runs going; report every failure at the end
            failed.append((group, exc))
    return failed


def pretrain(cfg: Config) -> dict[str, Any]:
    """Train a base StyleGAN2 from scratch on the configured dataset's images."""
    plan = planning.plan_pretrain(cfg)
    with follow([plan] if plan.state != "finished" else []):
        return fit_plan(plan)
