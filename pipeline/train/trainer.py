"""Ray Train edge of training: one `TorchTrainer` per run, several runs (one per sketch set) at once.

Every input is validated on the driver before any worker starts (sketch sets, dataset, base checkpoints,
evaluation sets, resumable state). Real images stream to the workers as Ray Data shards (split across
workers); the small sketch set goes whole to every worker. The loop is `pipeline.train.loop.run_worker`,
shared with Tune trials and the benchmarks.

Storage is the source of truth: checkpoints live in ``<run>/checkpoints``; Ray Train only tracks a pointer to
the latest one, which ``ray.train.get_checkpoint()`` hands back to a restarted worker group after a failure.
A run that has checkpoints but did not finish continues from the latest one when launched again (same
settings required); ``train.resume=<run>`` continues a named run, also past its end with more iterations.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline import layout, storage
from pipeline.config import Config, SketchSetSpec
from pipeline.models import factory
from pipeline.raysession import ensure_ray
from pipeline.train.loop import RunSpec, TestHooks

log = logging.getLogger("sketchgan.train")

CRASH_ENV = "SKETCHGAN_TEST_CRASH_AT"  # tests only: "ITER:MARKER_FILE" -> one worker dies once at ITER
POINTER_FILE = "sketchgan_checkpoint.json"

# Settings a continued run must share with the run it continues (others, e.g. iterations, may change).
MUST_MATCH = {
    "model": None,  # every key
    "data": ("sketcher", "sketcher_weights", "category"),
    "train": ("batch_size", "lr", "beta1", "beta2", "lambda_image", "lambda_weight", "r1_gamma", "r1_every",
              "gan_loss", "mixing", "trained", "augment", "transform_fake", "transform_real", "dsketch_init",
              "ema_half_life_kimg", "precision", "seed", "num_workers"),
    "pretrain": ("batch_size", "lr", "r1_gamma", "r1_every", "ema_half_life_kimg", "mixing", "augment",
                 "precision", "seed"),
}


class TrainingInputError(ValueError):
    """A training input that is missing or unusable; raised before any worker starts."""


class TrainingRunError(RuntimeError):
    """One or more training runs failed while running (after validation)."""


@dataclass
class RunPlan:
    """A validated run: its spec and the data it reads."""

    spec: RunSpec
    dataset_uri: str | None  # preprocessed dataset (real images), when the run needs them
    sketchset_uri: str | None

    @property
    def run_name(self) -> str:
        return self.spec.run_name


# -- input validation (driver) ---------------------------------------------------------------------------
def pairs_uri(dataset_uri: str) -> str:
    return storage.join(dataset_uri, "pairs")


def dataset_manifest(dataset_uri: str) -> dict:
    uri = storage.join(dataset_uri, "manifest.json")
    if not storage.exists(uri):
        raise TrainingInputError(f"dataset {dataset_uri} is missing or incomplete (no manifest.json): "
                                 "run `sketchgan preprocess` first")
    if not storage.list_files(pairs_uri(dataset_uri), suffix=".parquet"):
        raise TrainingInputError(f"dataset {dataset_uri} has no image/sketch pairs under {pairs_uri(dataset_uri)}")
    return storage.read_json(uri)


def manifest_id(manifest: dict) -> str | None:
    return manifest.get("id") or manifest.get("fingerprint")


def sketch_set_uri(cfg: Config, spec: SketchSetSpec) -> str:
    return spec.uri or layout.sketchset_uri(cfg, spec.name)


def sketch_set_manifest(cfg: Config, spec: SketchSetSpec) -> dict:
    """The sketch set's manifest; a missing or empty set is refused, naming it."""
    uri = sketch_set_uri(cfg, spec)
    man_uri = storage.join(uri, "manifest.json")
    if not storage.exists(man_uri) or not storage.exists(storage.join(uri, "sketches.parquet")):
        raise TrainingInputError(f"sketch set {spec.name!r} not found at {uri} (no manifest.json or "
                                 "sketches.parquet): create it with `sketchgan sketchset create`")
    man = storage.read_json(man_uri)
    if int(man.get("count", 0) or 0) <= 0:
        raise TrainingInputError(f"sketch set {spec.name!r} at {uri} is empty (manifest count 0)")
    return man


def check_sketches(cfg: Config, spec: SketchSetSpec) -> None:
    """Decode every sketch on the driver (a sketch set is small), so an unreadable one fails before any worker
    starts, naming the set and the sketch. Sketches of another size are resized to ``model.size`` by the
    workers: say so, naming the set."""
    import pyarrow.parquet as pq

    from pipeline.data.images import BadRecord, open_image

    uri = storage.join(sketch_set_uri(cfg, spec), "sketches.parquet")
    fs, path = storage.filesystem(uri)
    try:
        table = pq.read_table(path, filesystem=fs)
        ids, blobs = table.column("id").to_pylist(), table.column("sketch").to_pylist()
    except (OSError, KeyError, ValueError) as exc:
        raise TrainingInputError(f"sketch set {spec.name!r}: cannot read columns 'id' and 'sketch' of {uri} "
                                 f"({exc})") from None
    if not blobs:
        raise TrainingInputError(f"sketch set {spec.name!r} at {uri} is empty (no rows)")
    sizes = set()
    for rid, blob in zip(ids, blobs):
        try:
            with open_image(blob or b"", cfg.data.max_image_pixels) as im:
                sizes.add(im.size)
        except BadRecord as exc:
            raise TrainingInputError(f"sketch set {spec.name!r}: sketch {rid!r} in {uri} is unusable "
                                     f"({exc.reason})") from None
    other = sorted(s for s in sizes if s != (cfg.model.size, cfg.model.size))
    if other:
        log.warning("sketch set %r holds sketches of %s px, not model.size %d: they are resized to %dx%d",
                    spec.name, ", ".join(f"{w}x{h}" for w, h in other), cfg.model.size, cfg.model.size,
                    cfg.model.size)


def check_base_checkpoints(cfg: Config) -> str:
    """Load the base G/D on the driver so a missing, unreadable or mismatched file fails before any worker
    starts (the error names the file and lists mismatched keys). Returns the base G's sha256."""
    from pipeline.models.checkpoints import load_into, load_state_dict, sha256_of

    arch = factory.generator_kwargs(cfg.model)
    if not cfg.model.base_g:
        raise TrainingInputError("model.base_g is not set: point it at the base generator (netG.pth), e.g. the "
                                 "published StyleGAN2 checkpoint or final/G.pth of `sketchgan pretrain`")
    for key, uri, build in (("model.base_g", cfg.model.base_g, factory.build_generator),
                            ("model.base_d", cfg.model.base_d, factory.build_discriminator)):
        if not uri:
            continue
        if not storage.exists(uri):
            raise TrainingInputError(f"{key}: checkpoint {uri} does not exist")
        try:
            load_into(build(arch), load_state_dict(uri), source=f"{key} {uri}")
        except ValueError as exc:
            raise TrainingInputError(f"{key}: {exc}\n(the model section describes {arch})") from None
    if not cfg.model.base_d and (cfg.train.dsketch_init == "base" or cfg.train.lambda_image > 0):
        raise TrainingInputError("model.base_d is not set: the discriminators start from the base netD.pth "
                                 "(set model.base_d, or train.dsketch_init=random with train.lambda_image=0)")
    return sha256_of(cfg.model.base_g)


def evalset_for(cfg: Config, spec: SketchSetSpec) -> str | None:
    """The evaluation set URI for FID at intervals, or None when none is configured / FID is off."""
    if not spec.evalset or not cfg.train.eval_every:
        return None
    uri = spec.evalset if ("/" in spec.evalset or ":" in spec.evalset) else layout.evalset_uri(cfg, spec.evalset)
    if not storage.exists(storage.join(uri, "manifest.json")):
        raise TrainingInputError(f"sketch set {spec.name!r}: evaluation set {uri} not found (no manifest.json)")
    return uri


def config_differences(old: dict, new: dict, kind: str) -> list[str]:
    sections = ["model", "data", kind]
    diffs = []
    for section in sections:
        keys = MUST_MATCH[section]
        o, n = old.get(section, {}), new.get(section, {})
        for key in keys if keys is not None else sorted(set(o) | set(n)):
            if o.get(key) != n.get(key):
                diffs.append(f"{section}.{key}: {o.get(key)!r} -> {n.get(key)!r}")
    return diffs


def check_continuation(spec: RunSpec) -> int | None:
    """If the run already has state, check it may continue with this config; returns its checkpoint iteration."""
    info_uri = storage.join(spec.run_uri, "run.json")
    pointer = storage.join(spec.run_uri, "checkpoints", "latest.json")
    if not storage.exists(pointer):
        return None
    iteration = int(storage.read_json(pointer).get("iteration", 0))
    if storage.exists(info_uri):
        diffs = config_differences(storage.read_json(info_uri).get("config", {}), spec.config, spec.kind)
        if diffs:
            raise TrainingInputError(
                f"run {spec.run_name!r} at {spec.run_uri} has checkpoints made with other settings; continuing it "
                "would mix them:\n  " + "\n  ".join(diffs) +
                "\nchoose another run name (train.run_prefix / pretrain.run_name) or delete the run")
    return iteration


def finished_iterations(run_uri: str) -> int | None:
    meta = storage.join(run_uri, "final", "metadata.json")
    return int(storage.read_json(meta).get("iterations", 0)) if storage.exists(meta) else None


def _plan_state(spec: RunSpec, resume_requested: bool) -> str:
    """``new`` | ``continue`` | ``finished`` for a run, refusing unsafe combinations."""
    done = finished_iterations(spec.run_uri)
    at = check_continuation(spec)
    total = spec.section.iterations
    if done is not None:
        if done == total and (at is None or at >= total):
            return "finished"
        if not resume_requested:
            raise TrainingInputError(f"run {spec.run_name!r} already finished with {done} iterations (asked "
                                     f"for {total}): pass --resume {spec.run_name} to continue it, or choose "
                                     "another run name")
        if at is None or at > total:
            raise TrainingInputError(f"run {spec.run_name!r}: cannot continue to {total} iterations from "
                                     f"checkpoint iteration {at}")
        return "continue"
    if resume_requested and at is None:
        raise TrainingInputError(f"cannot resume run {spec.run_name!r}: no checkpoint at {spec.run_uri}")
    return "continue" if at is not None else "new"


def plan_train_run(cfg: Config, sketch: SketchSetSpec, run_name: str | None = None,
                   base_g_sha: str | None = None) -> tuple[RunPlan, str]:
    """Validate one sketch set's run (inputs and resumable state); returns (plan, state)."""
    man = sketch_set_manifest(cfg, sketch)
    check_sketches(cfg, sketch)
    dataset_uri = layout.dataset_uri(cfg)
    needs_images = cfg.train.lambda_image > 0
    ds_man = dataset_manifest(dataset_uri) if needs_images else {}
    run_name = run_name or f"{cfg.train.run_prefix}-{sketch.name}"
    spec = RunSpec(kind="train", run_name=run_name, run_uri=layout.run_uri(cfg, run_name),
                   config=cfg.model_dump(mode="json"),
                   sketch_set={"name": sketch.name, "uri": sketch_set_uri(cfg, sketch), "id": man.get("id"),
                               "count": man.get("count")},
                   dataset_manifest_id=manifest_id(ds_man) if needs_images else None,
                   base_g_sha256=base_g_sha, evalset_uri=evalset_for(cfg, sketch))
    state = _plan_state(spec, resume_requested=cfg.train.resume == run_name)
    plan = RunPlan(spec, dataset_uri if needs_images else None, sketch_set_uri(cfg, sketch))
    return plan, state


def _check_workers(cfg: Config, batch_size: int, what: str) -> None:
    t = cfg.train
    if batch_size % t.num_workers:
        raise TrainingInputError(f"{what}.batch_size {batch_size} is not divisible by train.num_workers "
                                 f"{t.num_workers} (the global batch is split across the workers)")
    if t.use_gpu and t.gpus_per_worker == 0:
        log.info("train.use_gpu is set without train.gpus_per_worker: each worker takes one whole GPU")


def sketch_sets_to_train(cfg: Config) -> list[SketchSetSpec]:
    """The configured sketch sets, or the one of the run named by ``train.resume`` when none is listed."""
    sets = list(cfg.train.sketch_sets)
    if cfg.train.resume:
        names = [f"{cfg.train.run_prefix}-{s.name}" for s in sets]
        if sets and cfg.train.resume not in names:
            raise TrainingInputError(f"train.resume={cfg.train.resume!r} is not one of this config's runs "
                                     f"({', '.join(names)})")
        if not sets:
            info_uri = storage.join(layout.run_uri(cfg, cfg.train.resume), "run.json")
            if not storage.exists(info_uri):
                raise TrainingInputError(f"cannot resume run {cfg.train.resume!r}: {info_uri} does not exist")
            info = storage.read_json(info_uri)
            sk = info.get("sketch_set") or {}
            if info.get("kind") != "train" or not sk.get("name"):
                raise TrainingInputError(f"run {cfg.train.resume!r} is not a GANSketching training run")
            prefix = cfg.train.run_prefix
            if cfg.train.resume != f"{prefix}-{sk['name']}":
                raise TrainingInputError(f"run {cfg.train.resume!r} does not follow train.run_prefix={prefix!r}: "
                                         "set train.run_prefix to the prefix it was made with")
            sets = [SketchSetSpec(name=sk["name"], uri=sk.get("uri"))]
    if not sets:
        raise TrainingInputError("train.sketch_sets is empty: list at least one sketch set to customise from")
    return sets


def plan_train(cfg: Config) -> list[tuple[RunPlan, str]]:
    """Validate everything every run needs, before any worker starts."""
    sets = sketch_sets_to_train(cfg)
    names = [s.name for s in sets]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TrainingInputError(f"train.sketch_sets lists {', '.join(dupes)} more than once")
    _check_workers(cfg, cfg.train.batch_size, "train")
    storage.ensure_writable(cfg.storage.root)
    base_sha = check_base_checkpoints(cfg)
    return [plan_train_run(cfg, s, base_g_sha=base_sha) for s in sets]


def plan_pretrain(cfg: Config) -> tuple[RunPlan, str]:
    _check_workers(cfg, cfg.pretrain.batch_size, "pretrain")
    storage.ensure_writable(cfg.storage.root)
    dataset_uri = layout.dataset_uri(cfg)
    man = dataset_manifest(dataset_uri)
    run_name = cfg.pretrain.run_name
    spec = RunSpec(kind="pretrain", run_name=run_name, run_uri=layout.run_uri(cfg, run_name),
                   config=cfg.model_dump(mode="json"), dataset_manifest_id=manifest_id(man))
    # no --resume for pretraining: an unfinished run continues, a finished one may be extended
    state = _plan_state(spec, resume_requested=finished_iterations(spec.run_uri) is not None)
    return RunPlan(spec, dataset_uri, None), state


# -- Ray Train ------------------------------------------------------------------------------------------------
def train_loop_per_worker(config: dict) -> None:
    """Ray Train's per-worker function: ``config`` is `train_loop_config` (see `trainer_for`)."""
    import ray
    import ray.train

    from pipeline.train.loop import decode_png_batch, run_worker

    spec = RunSpec(**config["spec"])
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

    sketches = None
    if spec.kind == "train":
        blobs = config["sketches"]
        if isinstance(blobs, ray.ObjectRef):
            blobs = ray.get(blobs)
        sketches = decode_png_batch(blobs, 1, spec.cfg.model.size)

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

    hooks = TestHooks(**config["test_hooks"]) if config.get("test_hooks") else None
    run_worker(spec, make_epoch, sketches, report=report, rank=rank, world_size=world,
               resume_checkpoint=resume, hooks=hooks)


def _test_hooks_from_env() -> dict | None:
    raw = os.environ.get(CRASH_ENV)
    if not raw:
        return None
    at, marker = raw.split(":", 1)
    return {"crash_at": int(at), "crash_marker": marker}


MATERIALIZE_MAX_BYTES = 512 * 2**20


def parquet_bytes(uri: str) -> int:
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(uri)
    top = fs.get_file_info(path)
    if top.type == pafs.FileType.File:
        return top.size or 0
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def read_parquet(uri: str, columns: list[str], cache_small: bool = False):
    """A Ray Dataset of the Parquet files at ``uri``. With ``cache_small``, a small one is materialised in the
    object store once: re-reading the files costs seconds per epoch, and an epoch of a small set is a few steps."""
    import ray.data

    fs, path = storage.filesystem(uri)
    ds = ray.data.read_parquet(path, filesystem=fs, columns=columns)
    return ds.materialize() if cache_small and parquet_bytes(uri) <= MATERIALIZE_MAX_BYTES else ds


def ray_storage(cfg: Config) -> dict[str, Any]:
    """RunConfig storage arguments: Ray Train's own (small) state below the storage root."""
    root = storage.join(cfg.storage.root, "ray-train")
    if storage.is_s3(root):
        fs, path = storage.filesystem(root)
        return {"storage_path": path, "storage_filesystem": fs}
    return {"storage_path": str(Path(root).resolve())}


def read_sketch_blobs(sketchset_uri: str) -> list[bytes]:
    """The sketch set's PNGs, read once on the driver (a handful of images: every worker gets them all)."""
    import pyarrow.parquet as pq

    uri = storage.join(sketchset_uri, "sketches.parquet")
    fs, path = storage.filesystem(uri)
    try:
        column = pq.read_table(path, filesystem=fs, columns=["sketch"]).column("sketch").to_pylist()
    except (OSError, KeyError, ValueError) as exc:
        raise TrainingInputError(f"sketch set {sketchset_uri}: cannot read column 'sketch' of {uri} ({exc})") from None
    if not column:
        raise TrainingInputError(f"sketch set {sketchset_uri}: {uri} has no rows")
    return column


def prepare_data(plans: list[RunPlan]) -> dict[str, dict[str, Any]]:
    """Each run's inputs, prepared on the driver before any trainer starts: read tasks then cannot starve
    behind training workers that hold every CPU. Runs on the same dataset share one (cached) Ray Dataset."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the same stream on every attempt: bit-exact resume
    ctx.enable_progress_bars = False
    images: dict[str, Any] = {}
    out = {}
    for plan in plans:
        data: dict[str, Any] = {}
        if plan.dataset_uri is not None:
            if plan.dataset_uri not in images:
                images[plan.dataset_uri] = read_parquet(pairs_uri(plan.dataset_uri), ["image"], cache_small=True)
            data["images"] = images[plan.dataset_uri]
        if plan.sketchset_uri is not None:
            data["sketches"] = ray.put(read_sketch_blobs(plan.sketchset_uri))
        out[plan.run_name] = data
    return out


def image_datasets(images, num_workers: int) -> tuple[dict[str, Any], bool]:
    """Ray Train's ``datasets`` for a run's real images, and whether they come one part per rank.

    A streaming split starts a new execution of the dataset at every epoch, driven by a coordinator actor (one
    more process beside training). A dataset small enough to be materialised (`read_parquet` with
    ``cache_small``) is instead split once, on the driver, into equal parts: rank r reads ``images_<r>``
    straight from the object store, with no coordinator. (Not measurably faster on a two-core CPU machine:
    see benchmarks/README.md.)
    """
    from ray.data.dataset import MaterializedDataset

    if images is None:
        return {}, False
    if not isinstance(images, MaterializedDataset):
        return {"images": images}, False
    parts = images.split(num_workers, equal=True) if num_workers > 1 else [images]
    return {f"images_{rank}": part for rank, part in enumerate(parts)}, True


def trainer_for(plan: RunPlan, data: dict[str, Any], callbacks: list | None = None,
                loop_config: dict | None = None):
    """The `TorchTrainer` for one run, given its `prepare_data` entry (``callbacks`` go to `RunConfig`, e.g.
    Tune's report callback; ``loop_config`` adds entries to `train_loop_config`)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train.backend import torch_config_for

    spec = plan.spec
    t = spec.cfg.train
    datasets, per_rank = image_datasets(data.get("images"), t.num_workers)
    resources: dict[str, float] = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker or 1.0  # fractional: several small fine-tunes share one GPU
    config = {"spec": asdict(spec), "has_images": bool(datasets), "images_per_rank": per_rank,
              "shuffle_buffer": 64,
              "sketches": data.get("sketches"),
              "test_hooks": _test_hooks_from_env(), **(loop_config or {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        torch_config=torch_config_for(t.num_workers),
        run_config=RunConfig(
            # a fresh Ray Train run per launch: our checkpoints, not Ray's, carry state across launches
            name=f"{spec.run_name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=callbacks, **ray_storage(spec.cfg)),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[] if per_rank else list(datasets)),
    )


def fit_plan(plan: RunPlan, state: str = "new", data: dict[str, Any] | None = None,
             callbacks: list | None = None) -> dict[str, Any]:
    """Run (or reuse) one planned run to completion; returns a summary with its final metadata."""
    spec = plan.spec
    if state == "finished":
        log.info("%s already finished at %s: reusing it", spec.run_name, spec.run_uri)
        return {"run_name": spec.run_name, "run_uri": spec.run_uri, "reused": True,
                "metadata": storage.read_json(storage.join(spec.run_uri, "final", "metadata.json"))}
    ensure_ray()
    if data is None:
        data = prepare_data([plan])[plan.run_name]
    meta_uri = storage.join(spec.run_uri, "final", "metadata.json")
    if state == "continue" and storage.exists(meta_uri):
        storage.delete(meta_uri)  # continued past its end: not finished until it finishes again
    storage.write_json(storage.join(spec.run_uri, "run.json"),
                       {"run_name": spec.run_name, "kind": spec.kind, "sketch_set": spec.sketch_set,
                        "config": spec.config, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    t0 = time.time()
    log.info("%s: %s (%d iterations)%s", spec.run_name, "continuing" if state == "continue" else "starting",
             spec.section.iterations, f", sketch set {spec.sketch_set['name']}" if spec.sketch_set else "")
    trainer_for(plan, data, callbacks).fit()
    if not storage.exists(meta_uri):
        raise TrainingRunError(f"run {spec.run_name}: training ended without writing {meta_uri}")
    log.info("%s finished in %.0fs -> %s", spec.run_name, time.time() - t0, spec.run_uri)
    return {"run_name": spec.run_name, "run_uri": spec.run_uri, "reused": False,
            "seconds": round(time.time() - t0, 1), "metadata": storage.read_json(meta_uri)}


def run_training(cfg: Config, sketch: SketchSetSpec, run_name: str | None = None,
                 callbacks: list | None = None) -> dict[str, Any]:
    """Validate and fit one GANSketching run (what a Tune trial calls); returns its summary."""
    _check_workers(cfg, cfg.train.batch_size, "train")
    base_sha = check_base_checkpoints(cfg)
    plan, state = plan_train_run(cfg, sketch, run_name, base_g_sha=base_sha)
    return fit_plan(plan, state, callbacks=callbacks)


def train_all(cfg: Config) -> list[dict[str, Any]]:
    """Customise the base model once per sketch set, several runs at once; one summary per run."""
    plans = plan_train(cfg)  # every input of every run checked before any worker starts
    todo = [plan for plan, state in plans if state != "finished"]
    if todo:
        ensure_ray()
    data = prepare_data(todo) if todo else {}
    workers = max(1, min(cfg.train.max_concurrent_runs, len(plans)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="train-run") as pool:
        futures = [(plan.run_name, pool.submit(fit_plan, plan, state, data.get(plan.run_name)))
                   for plan, state in plans]
        results, failures = [], []
        for name, fut in futures:
            try:
                results.append(fut.result())
            except Exception as exc:  # keep the other runs going; report every failure at the end
                failures.append(f"{name}: {exc}")
    if failures:
        raise TrainingRunError(f"{len(failures)} of {len(plans)} training runs failed:\n  " + "\n  ".join(failures))
    return results


def pretrain(cfg: Config) -> dict[str, Any]:
    """Train a base StyleGAN2 from scratch on the configured dataset's images."""
    plan, state = plan_pretrain(cfg)
    return fit_plan(plan, state)


def _metrics_line(summary: dict) -> str:
    m = (summary.get("metadata") or {}).get("final_metrics") or {}
    keys = [k for k in ("loss_sketch", "loss_g", "loss_d", "fid", "it_per_s") if k in m]
    return " ".join(f"{k}={m[k]}" for k in keys)


def train_cli(cfg: Config, args) -> int:
    try:
        summaries = train_all(cfg)
    except TrainingRunError as exc:
        print(f"sketchgan train: error: {exc}", flush=True)
        return 1
    for s in summaries:
        tag = " (already finished)" if s["reused"] else ""
        print(f"{s['run_name']}: {storage.join(s['run_uri'], 'final', 'G.pth')}{tag} {_metrics_line(s)}".rstrip())
    _track([s["run_uri"] for s in summaries], cfg)
    return 0


def _track(run_uris: list[str], cfg: Config) -> None:
    """Log finished runs to MLflow and register customisations (idempotent: a re-run of the command after an
    MLflow outage registers what is missing and duplicates nothing)."""
    from pipeline.registry.mlflow_registry import track_runs

    for line in track_runs(cfg, run_uris):
        print(line, flush=True)


def pretrain_cli(cfg: Config, args) -> int:
    s = pretrain(cfg)
    final = storage.join(s["run_uri"], "final")
    tag = " (already finished)" if s["reused"] else ""
    print(f"base model{tag}: model.base_g={storage.join(final, 'G.pth')} model.base_d={storage.join(final, 'D.pth')}")
    _track([s["run_uri"]], cfg)
    return 0
