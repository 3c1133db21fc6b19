"""Planning a sweep on the driver: which sketch set, which metric, which values, every input checked before Tune
starts any trial."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline import layout, storage
from pipeline.config import Config, ConfigError, SketchSetSpec, updated

# Keys a sweep may not vary: they name or place runs, or are set from the tune section (resources).
FIXED_KEYS = {"sketch_sets", "resume", "run_prefix", "use_gpu", "cpus_per_worker", "gpus_per_worker",
              "max_concurrent_runs", "num_workers"}


class SweepError(ValueError):
    """A sweep that cannot start or finish as configured; the message names the setting."""


@dataclass
class SweepPlan:
    cfg: Config  # the base configuration of every trial (resources set from the tune section)
    sketch: SketchSetSpec
    metric: str
    space: dict[str, list[Any]]
    tune_uri: str  # Tune's experiment folder


def _sketch_set(cfg: Config) -> SketchSetSpec:
    sets = list(cfg.train.sketch_sets)
    if cfg.tune.sketch_set:
        chosen = [s for s in sets if s.name == cfg.tune.sketch_set]
        if not chosen:
            raise SweepError(f"tune.sketch_set={cfg.tune.sketch_set!r} is not one of train.sketch_sets "
                             f"({', '.join(s.name for s in sets) or 'none'})")
        return chosen[0]
    if len(sets) != 1:
        raise SweepError(f"a sweep customises one sketch set: list exactly one in train.sketch_sets or choose one "
                         f"with tune.sketch_set (got {len(sets)})")
    return sets[0]


def _metric(cfg: Config, sketch: SketchSetSpec) -> str:
    has_fid = bool(sketch.evalset and cfg.train.eval_every)
    metric = cfg.tune.metric or ("fid" if has_fid else "loss_sketch")
    if metric == "fid" and not has_fid:
        raise SweepError(f"tune.metric=fid needs an evaluation set for sketch set {sketch.name!r} "
                         "(train.sketch_sets[].evalset) and train.eval_every")
    return metric


def trial_changes(params: dict[str, Any]) -> dict[str, Any]:
    """One trial's config changes (training ``w_shift`` needs a generator with one)."""
    changes = dict(sorted(params.items()))
    if params.get("train.trained") == "w_shift":
        changes["model.w_shift"] = True
    return changes


def _check_space(cfg: Config) -> dict[str, list[Any]]:
    space = dict(cfg.tune.param_space)
    for key, values in space.items():
        field = key.split(".", 1)[1]
        if field not in type(cfg.train).model_fields:
            raise SweepError(f"tune.param_space.{key}: train has no field {field!r}")
        if field in FIXED_KEYS:
            raise SweepError(f"tune.param_space.{key}: cannot be swept (it names or places runs, or is set from "
                             "the tune section)")
        for value in values:
            try:
                updated(cfg, trial_changes({key: value}))
            except ConfigError as exc:
                raise SweepError(f"tune.param_space.{key}: value {value!r} is not valid: {exc}") from None
    return space


def plan_sweep(cfg: Config) -> SweepPlan:
    """Check the sweep's settings and inputs once, before Tune starts any trial."""
    from pipeline.train import plan as planning

    t = cfg.tune
    sketch = _sketch_set(cfg)
    metric = _metric(cfg, sketch)
    workers = cfg.train.num_workers
    base = updated(cfg, {"train.sketch_sets": [sketch.model_dump()], "train.resume": None,
                         "train.cpus_per_worker": t.cpus_per_trial / workers,
                         "train.gpus_per_worker": t.gpus_per_trial / workers,
                         "train.use_gpu": t.gpus_per_trial > 0 or cfg.train.use_gpu})
    space = _check_space(base)
    storage.ensure_writable(cfg.storage.root)
    planning.read_sketches(base, sketch)
    lambdas = space.get("train.lambda_image", [base.train.lambda_image])
    if any(float(v) > 0 for v in lambdas):
        planning.training_dataset(base)
    planning.check_base_checkpoints(base)
    if "w_shift" in space.get("train.trained", []) and not base.model.w_shift:
        try:
            planning.check_base_checkpoints(updated(base, {"model.w_shift": True}))
        except planning.TrainingInputError as exc:
            raise SweepError(f"tune.param_space.train.trained lists w_shift, which trains a generator with a "
                             f"w_shift layer, but the base checkpoints do not fit one:\n{exc}") from None
    planning.evalset_for(base, sketch)
    return SweepPlan(base, sketch, metric, space, layout.tune_uri(cfg))


def trial_run_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"
