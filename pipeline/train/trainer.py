"""Ray Train edge of training: one `TorchTrainer` per run, several runs (one per sketch set) at once.

Inputs are validated on the driver before any worker starts; data streams to the workers as Ray Data
shards (real images split across workers, the small sketch set given whole to each); the loop itself is
`pipeline.train.loop.run_worker`, shared with Tune trials and benchmarks.
"""

from __future__ import annotations

import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from pipeline import layout, storage
from pipeline.config import Config, SketchSetSpec
from pipeline.models import factory
from pipeline.train.loop import RunSpec

log = logging.getLogger("sketchgan.train")


class TrainingInputError(ValueError):
    """A training input that is missing or unusable; raised before any worker starts."""


# -- inputs -------------------------------------------------------------------------------------------------
def pairs_uri(dataset_uri: str) -> str:
    return storage.join(dataset_uri, "pairs")


def dataset_manifest(dataset_uri: str) -> dict:
    uri = storage.join(dataset_uri, "manifest.json")
    if not storage.exists(uri):
        raise TrainingInputError(f"dataset {dataset_uri} is missing or incomplete (no manifest.json): "
                                 "run `sketchgan preprocess` first")
    return storage.read_json(uri)


def sketch_set_uri(cfg: Config, spec: SketchSetSpec) -> str:
    return spec.uri or layout.sketchset_uri(cfg, spec.name)


def sketch_set_manifest(cfg: Config, spec: SketchSetSpec) -> dict:
    uri = sketch_set_uri(cfg, spec)
    man_uri = storage.join(uri, "manifest.json")
    if not storage.exists(man_uri) or not storage.exists(storage.join(uri, "sketches.parquet")):
        raise TrainingInputError(f"sketch set {spec.name!r} not found at {uri}: create it with "
                                 "`sketchgan sketchset create`")
    man = storage.read_json(man_uri)
    if int(man.get("count", 0)) == 0:
        raise TrainingInputError(f"sketch set {spec.name!r} at {uri} is empty")
    return man


def check_base_checkpoints(cfg: Config) -> None:
    """Load the base G/D once on the driver so that a bad file fails before any worker starts."""
    from pipeline.models.checkpoints import load_into, load_state_dict

    arch = factory.generator_kwargs(cfg.model)
    if not cfg.model.base_g:
        raise TrainingInputError("model.base_g is not set: point it at the base generator (netG.pth), e.g. "
                                 "the published StyleGAN2 checkpoint or the output of `sketchgan pretrain`")
    load_into(factory.build_generator(arch), load_state_dict(cfg.model.base_g), source=cfg.model.base_g)
    if cfg.model.base_d:
        load_into(factory.build_discriminator(arch), load_state_dict(cfg.model.base_d), source=cfg.model.base_d)
    elif cfg.train.dsketch_init == "base" or cfg.train.lambda_image > 0:
        raise TrainingInputError("model.base_d is not set: the discriminators start from the base netD.pth "
                                 "(set model.base_d, or train.dsketch_init=random with train.lambda_image=0)")


def read_sketches(uri: str, size: int):
    """The whole sketch set as a float tensor in [-1, 1] (N×1×size×size)."""
    import pyarrow.parquet as pq

    from pipeline.train.loop import decode_png_batch

    fs, path = storage.filesystem(storage.join(uri, "sketches.parquet"))
    table = pq.read_table(path, filesystem=fs, columns=["sketch"])
    return decode_png_batch(table.column("sketch").to_pylist(), 1, size)


# -- Ray Train ---------------------------------------------------------------------------------------------
def _train_loop_per_worker(config: dict) -> None:
    import ray.train

    from pipeline.train.loop import run_worker

    spec = RunSpec(**config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    shard = ray.train.get_dataset_shard("images") if config["has_images"] else None
    per_worker = (spec.cfg.pretrain if spec.kind == "pretrain" else spec.cfg.train).batch_size // world
    seed = spec.cfg.train.seed if spec.kind == "train" else spec.cfg.pretrain.seed

    def image_batches(epoch: int):
        return shard.iter_batches(batch_size=per_worker, batch_format="numpy", drop_last=True,
                                  local_shuffle_buffer_size=config["shuffle_buffer"],
                                  local_shuffle_seed=seed * 100_003 + epoch * 101 + rank)

    sketches = None
    if spec.kind == "train":
        from pipeline.train.loop import decode_png_batch

        blobs = [b for batch in ray.train.get_dataset_shard("sketches").iter_batches(batch_format="numpy")
                 for b in batch["sketch"]]
        sketches = decode_png_batch(blobs, 1, spec.cfg.model.size)
    run_worker(spec, image_batches if shard is not None else None, sketches,
               report=lambda m: ray.train.report(m), rank=rank, world_size=world)


def _read_parquet(uri: str, columns: list[str]):
    import ray.data

    fs, path = storage.filesystem(uri)
    return ray.data.read_parquet(path, filesystem=fs, columns=columns)


def fit_run(spec: RunSpec, dataset_uri: str | None, sketchset_uri: str | None) -> dict[str, Any]:
    """Run one training run to completion with Ray Train; returns its final metrics."""
    import ray
    import ray.data
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = spec.cfg
    t = cfg.train
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # reproducible streams
    datasets = {}
    if dataset_uri is not None:
        datasets["images"] = _read_parquet(pairs_uri(dataset_uri), ["image"])
    if sketchset_uri is not None:
        datasets["sketches"] = _read_parquet(storage.join(sketchset_uri, "sketches.parquet"), ["sketch"])
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker or 1
    scaling = ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources)
    storage_path = storage.join(cfg.storage.root, "ray-train") if storage.is_s3(cfg.storage.root) else \
        tempfile.mkdtemp(prefix="sketchgan-ray-train-")
    run_kwargs: dict[str, Any] = {"name": spec.run_name,
                                  "failure_config": FailureConfig(max_failures=t.max_failures)}
    if storage.is_s3(storage_path):
        fs, path = storage.filesystem(storage_path)
        run_kwargs.update(storage_path=path, storage_filesystem=fs)
    else:
        run_kwargs["storage_path"] = storage_path
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"spec": asdict(spec), "has_images": "images" in datasets, "shuffle_buffer": 64},
        scaling_config=scaling,
        run_config=RunConfig(**run_kwargs),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["images"] if "images" in datasets else []),
    )
    result = trainer.fit()
    return dict(result.metrics or {})


def run_is_finished(run_uri: str) -> bool:
    return storage.exists(storage.join(run_uri, "final", "metadata.json"))


def make_train_spec(cfg: Config, sketch: SketchSetSpec, run_name: str | None = None) -> tuple[RunSpec, str, str]:
    """Validate inputs for one sketch set and describe its run; returns (spec, dataset_uri, sketchset_uri)."""
    man = sketch_set_manifest(cfg, sketch)
    needs_images = cfg.train.lambda_image > 0
    dataset_uri = layout.dataset_uri(cfg)
    ds_man = dataset_manifest(dataset_uri) if needs_images else {}
    run_name = run_name or f"{cfg.train.run_prefix}-{sketch.name}"
    resume_from = layout.run_uri(cfg, cfg.train.resume) if cfg.train.resume else None
    if resume_from and cfg.train.resume != run_name and not storage.exists(
            storage.join(resume_from, "checkpoints", "latest.json")):
        raise TrainingInputError(f"cannot resume from run {cfg.train.resume!r}: no checkpoint at {resume_from}")
    spec = RunSpec(kind="train", run_name=run_name, run_uri=layout.run_uri(cfg, run_name),
                   config=cfg.model_dump(mode="json"),
                   sketch_set={"name": sketch.name, "uri": sketch_set_uri(cfg, sketch), "id": man.get("id")},
                   dataset_manifest_id=ds_man.get("fingerprint") or ds_man.get("id"),
                   resume_from=resume_from if cfg.train.resume != run_name else None)
    return spec, (dataset_uri if needs_images else None), sketch_set_uri(cfg, sketch)


def train_all(cfg: Config) -> list[dict[str, Any]]:
    """Customise the base model once per configured sketch set, concurrently; returns one summary per run."""
    import ray

    if not cfg.train.sketch_sets:
        raise TrainingInputError("train.sketch_sets is empty: list at least one sketch set to customise from")
    storage.ensure_writable(cfg.storage.root)
    check_base_checkpoints(cfg)
    plans = [make_train_spec(cfg, s) for s in cfg.train.sketch_sets]  # every input checked before any start
    if not ray.is_initialized():
        ray.init()
    summaries: list[dict[str, Any]] = []

    def one(plan):
        spec, ds_uri, sk_uri = plan
        if run_is_finished(spec.run_uri):
            print(f"train: {spec.run_name} already finished at {spec.run_uri}: reusing it", flush=True)
            return {"run_name": spec.run_name, "run_uri": spec.run_uri, "reused": True}
        t0 = time.time()
        print(f"train: {spec.run_name} starting ({cfg.train.iterations} iterations, sketch set "
              f"{spec.sketch_set['name']})", flush=True)
        metrics = fit_run(spec, ds_uri, sk_uri)
        print(f"train: {spec.run_name} finished in {time.time() - t0:.0f}s -> {spec.run_uri}", flush=True)
        return {"run_name": spec.run_name, "run_uri": spec.run_uri, "reused": False, "metrics": metrics}

    with ThreadPoolExecutor(max_workers=max(1, min(cfg.train.max_concurrent_runs, len(plans)))) as pool:
        for summary in pool.map(one, plans):
            summaries.append(summary)
    return summaries


def pretrain(cfg: Config) -> dict[str, Any]:
    """Train a base StyleGAN2 from scratch on the configured dataset's images."""
    import ray

    storage.ensure_writable(cfg.storage.root)
    dataset_uri = layout.dataset_uri(cfg)
    man = dataset_manifest(dataset_uri)
    run_name = cfg.pretrain.run_name
    spec = RunSpec(kind="pretrain", run_name=run_name, run_uri=layout.run_uri(cfg, run_name),
                   config=cfg.model_dump(mode="json"),
                   dataset_manifest_id=man.get("fingerprint") or man.get("id"))
    if run_is_finished(spec.run_uri):
        print(f"pretrain: {run_name} already finished at {spec.run_uri}: reusing it", flush=True)
        return {"run_name": run_name, "run_uri": spec.run_uri, "reused": True}
    if not ray.is_initialized():
        ray.init()
    t0 = time.time()
    print(f"pretrain: {run_name} starting ({cfg.pretrain.iterations} iterations)", flush=True)
    metrics = fit_run(spec, dataset_uri, None)
    print(f"pretrain: {run_name} finished in {time.time() - t0:.0f}s -> {spec.run_uri}", flush=True)
    return {"run_name": run_name, "run_uri": spec.run_uri, "reused": False, "metrics": metrics}


def train_cli(cfg: Config, args) -> int:
    for s in train_all(cfg):
        print(f"{s['run_name']}: {s['run_uri']}{' (reused)' if s['reused'] else ''}")
    return 0


def pretrain_cli(cfg: Config, args) -> int:
    s = pretrain(cfg)
    final = storage.join(s["run_uri"], "final")
    print(f"base model: {storage.join(final, 'G.pth')} and {storage.join(final, 'D.pth')}")
    return 0
