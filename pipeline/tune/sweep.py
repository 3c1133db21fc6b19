"""`sketchgan tune`: a Ray Tune sweep of GANSketching training settings for one sketch set.

Each trial is one ordinary training run, `pipeline.train.raytrain.run_training` (the code `sketchgan train` runs):
a Tune function trainable that launches the run's `TorchTrainer` (Ray Train v2) and forwards its reports to
Tune with a `TuneReportCallback`. Trials write the run contract to ``<root>/runs/<sweep>-<trial id>``; Tune's
own state lives in ``<root>/tune/<sweep>``, from which an interrupted sweep is restored (``--resume``): trial
ids, and so run names, are kept, and every unfinished trial continues from its latest storage checkpoint.

ASHA stops poor trials early on ``tune.metric`` (``fid`` when the sketch set has an evaluation set and
``train.eval_every`` is set, else the sketch loss ``loss_sketch``), measured in training iterations.

MLflow (driver side, from storage): the sweep is a parent run; each trial is logged as a child run when it ends
(a logging failure is a warning: the results are safe in storage, and the end of the sweep logs again,
idempotently); the best finished trial is registered in the model registry.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import layout, storage
from pipeline.config import Config, ConfigError, SketchSetSpec, updated
from pipeline.raysession import ensure_ray

log = logging.getLogger("sketchgan.tune")

# Keys a sweep may not vary: they name or place runs, or are set from the tune section (resources).
FIXED_KEYS = {"sketch_sets", "resume", "run_prefix", "use_gpu", "cpus_per_worker", "gpus_per_worker",
              "max_concurrent_runs", "num_workers"}
TAG_SWEEP = "sketchgan.sweep_uri"


class SweepError(ValueError):
    """A sweep that cannot start or finish as configured; the message names the setting."""


@dataclass
class SweepPlan:
    cfg: Config  # the base configuration of every trial (resources set from the tune section)
    sketch: SketchSetSpec
    metric: str
    space: dict[str, list[Any]]
    tune_uri: str  # Tune's experiment folder


# -- planning (driver, before anything starts) ------------------------------------------------------------
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


# -- the trial (runs in a Tune actor) ------------------------------------------------------------------------
def _report_callback(metric: str, run_uri: str):
    from ray.tune.integration.ray_train import TuneReportCallback

    class MetricReportCallback(TuneReportCallback):
        """Forward Ray Train reports that carry the sweep metric (FID comes only at evaluation iterations)."""

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metric in metrics[0]:
                metrics = [{**metrics[0], "run_uri": run_uri}, *metrics[1:]]
                super().after_report(run_context, metrics, checkpoint)

    return MetricReportCallback()


def run_trial(config: dict, base: Config, sketch: SketchSetSpec, metric: str) -> None:
    """One trial: the ordinary training run with this trial's settings, reporting to Tune."""
    from ray import tune

    from pipeline.train.raytrain import run_training

    cfg = updated(base, trial_changes(config.get("params") or {}))
    run_name = trial_run_name(cfg.tune.name, tune.get_context().get_trial_id())
    run_uri = layout.run_uri(cfg, run_name)
    summary = run_training(cfg, sketch, run_name, callbacks=[_report_callback(metric, run_uri)])
    if summary.get("reused"):  # finished before an interruption: report its final metrics once more
        final = dict((summary.get("metadata") or {}).get("final_metrics") or {})
        tune.report({**final, "run_uri": run_uri})


# -- MLflow (driver) ------------------------------------------------------------------------------------------
def _parent_run(cfg: Config, plan: SweepPlan) -> str | None:
    """The sweep's MLflow parent run (reused when the sweep is resumed); None when MLflow is unreachable."""
    from pipeline.redact import scrub, scrub_text
    from pipeline.registry import tracking

    try:
        mlf = tracking.client(cfg)
        exp = tracking.ensure_experiment(mlf, cfg)
        found = mlf.search_runs([exp], f"tags.`{TAG_SWEEP}` = '{plan.tune_uri}'", max_results=1)
        if found:
            return found[0].info.run_id
        run = mlf.create_run(exp, run_name=f"sweep-{cfg.tune.name}",
                             tags={TAG_SWEEP: plan.tune_uri, tracking.TAG_KIND: "sweep",
                                   "sketchgan.sketch_set": plan.sketch.name})
        params = {"search": cfg.tune.search, "num_samples": cfg.tune.num_samples, "metric": plan.metric,
                  "mode": cfg.tune.mode, "sketch_set": plan.sketch.name,
                  "max_concurrent_trials": cfg.tune.max_concurrent_trials, "grace_period": cfg.tune.grace_period,
                  "reduction_factor": cfg.tune.reduction_factor,
                  "param_space": json.dumps(scrub(plan.space), sort_keys=True)}
        for key, value in params.items():
            mlf.log_param(run.info.run_id, key, scrub_text(str(value))[:tracking.PARAM_MAX])
        return run.info.run_id
    except Exception as exc:  # noqa: BLE001 - training must not depend on MLflow being up
        log.warning("MLflow is unavailable (%s): the sweep runs without tracking; log it later", exc)
        return None


def _trial_logger(cfg: Config, parent_id: str | None):
    from ray import tune

    from pipeline.registry import tracking

    class TrialLogger(tune.Callback):
        """Log each trial to MLflow as a child run when it ends (from its storage outputs)."""

        def _log(self, trial) -> None:
            run_uri = layout.run_uri(cfg, trial_run_name(cfg.tune.name, trial.trial_id))
            if parent_id is None or layout.read_run_info(run_uri) is None:
                return
            try:
                tracking.log_run(cfg, run_uri, parent_run_id=parent_id)
            except Exception as exc:  # noqa: BLE001 - retried at the end of the sweep
                log.warning("could not log trial %s to MLflow yet: %s", trial.trial_id, exc)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._log(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._log(trial)

    return TrialLogger()


# -- the sweep ------------------------------------------------------------------------------------------------
def _search_space(plan: SweepPlan) -> dict[str, Any]:
    from ray import tune

    pick = tune.grid_search if plan.cfg.tune.search == "grid" else tune.choice
    return {"params": {key: pick(values) for key, values in plan.space.items()}}


def _storage_args(uri: str) -> tuple[str, dict[str, Any]]:
    """(storage_path, extra RunConfig kwargs) for Tune's folder ``<root>/tune``."""
    parent = uri.rsplit("/", 1)[0]
    if storage.is_s3(parent):
        fs, path = storage.filesystem(parent)
        return path, {"storage_filesystem": fs}
    return str(Path(parent).expanduser().resolve()), {}


def _tuner(plan: SweepPlan, callbacks: list):
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    cfg, t = plan.cfg, plan.cfg.tune
    trainable = tune.with_parameters(run_trial, base=cfg, sketch=plan.sketch, metric=plan.metric)
    trainable = tune.with_resources(trainable, {"CPU": t.driver_cpus})
    storage_path, extra = _storage_args(plan.tune_uri)
    fs = extra.get("storage_filesystem")
    restore_path = plan.tune_uri if fs is None else storage.filesystem(plan.tune_uri)[1]
    exists = tune.Tuner.can_restore(restore_path, storage_filesystem=fs)
    if t.resume:
        if not exists:
            raise SweepError(f"cannot resume sweep {t.name!r}: no Tune experiment at {plan.tune_uri}")
        log.info("resuming sweep %s from %s", t.name, plan.tune_uri)
        return tune.Tuner.restore(restore_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=_search_space(plan), storage_filesystem=fs)
    if exists:
        raise SweepError(f"sweep {t.name!r} already exists at {plan.tune_uri}: pass --resume to continue it, or "
                         "choose another tune.name")
    max_t = max([cfg.train.iterations, *plan.space.get("train.iterations", [])])
    scheduler = ASHAScheduler(time_attr="iteration", max_t=max_t, grace_period=t.grace_period,
                              reduction_factor=t.reduction_factor)
    return tune.Tuner(
        trainable,
        param_space=_search_space(plan),
        tune_config=tune.TuneConfig(metric=plan.metric, mode=t.mode, scheduler=scheduler,
                                    num_samples=t.num_samples, max_concurrent_trials=t.max_concurrent_trials),
        run_config=ray.tune.RunConfig(name=t.name, storage_path=storage_path, callbacks=callbacks,
                                      failure_config=ray.tune.FailureConfig(max_failures=0), **extra),
    )


def _value(x) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) else None


def collect_trials(plan: SweepPlan, results) -> list[dict[str, Any]]:
    """One row per trial: run URI, parameters, last reported metric, finished or not, error."""
    rows = []
    for r in results:
        metrics = r.metrics or {}
        run_uri = metrics.get("run_uri")  # absent only when a trial failed before its first report
        trial_id = metrics.get("trial_id")
        rows.append({
            "trial_id": trial_id, "run_uri": run_uri, "params": (r.config or {}).get("params", {}),
            "metric": _value(metrics.get(plan.metric)), "iteration": metrics.get("iteration"),
            "finished": bool(run_uri) and layout.finished_run(run_uri) is not None,
            "error": str(r.error).splitlines()[0] if r.error else None,
        })
    return rows


def best_trial(plan: SweepPlan, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The finished trial with the best last-reported metric (early-stopped trials are not candidates)."""
    candidates = [r for r in rows if r["finished"] and r["metric"] is not None]
    if not candidates:
        return None
    sign = 1 if plan.cfg.tune.mode == "min" else -1
    return min(candidates, key=lambda r: (sign * r["metric"], r["run_uri"]))


def _finish_mlflow(cfg: Config, plan: SweepPlan, parent_id: str | None, rows: list[dict], best: dict | None,
                   summary: dict[str, Any]) -> None:
    from pipeline.registry import tracking

    if parent_id is None:
        try:
            parent_id = _parent_run(cfg, plan)
        except Exception:  # noqa: BLE001
            parent_id = None
    if parent_id is None:
        return
    mlf = tracking.client(cfg)
    for row in rows:
        if row["run_uri"] and layout.read_run_info(row["run_uri"]) is not None:
            row["mlflow_run_id"] = tracking.log_run(cfg, row["run_uri"], parent_run_id=parent_id)
    mlf.log_metric(parent_id, "trials", len(rows))
    mlf.log_metric(parent_id, "trials_finished", sum(1 for r in rows if r["finished"]))
    if best is not None:
        mlf.log_metric(parent_id, f"best_{plan.metric}", best["metric"])
        mlf.set_tag(parent_id, "sketchgan.best_run_uri", best["run_uri"])
        mlf.set_tag(parent_id, "sketchgan.best_params", json.dumps(best["params"], sort_keys=True)[:5000])
        if best.get("mlflow_run_id"):
            mlf.set_tag(parent_id, "sketchgan.best_mlflow_run", best["mlflow_run_id"])
    if summary.get("registered"):
        mlf.set_tag(parent_id, "sketchgan.registered", "{}/{}".format(*summary["registered"]))
    mlf.set_terminated(parent_id, status="FINISHED")
    summary["mlflow_parent_run"] = parent_id


def run_sweep(cfg: Config) -> dict[str, Any]:
    """Run (or resume) the configured sweep; returns a summary with one row per trial and the best trial."""
    plan = plan_sweep(cfg)
    ensure_ray()
    parent_id = _parent_run(cfg, plan)
    tuner = _tuner(plan, [_trial_logger(plan.cfg, parent_id)])
    results = tuner.fit()
    rows = collect_trials(plan, results)
    best = best_trial(plan, rows)
    summary: dict[str, Any] = {"sweep": cfg.tune.name, "tune_uri": plan.tune_uri, "metric": plan.metric,
                               "trials": rows, "best": best, "registered": None}
    if best is not None and cfg.registry.auto_register:
        from pipeline.registry.mlflow_registry import register_run

        try:
            summary["registered"] = register_run(cfg, best["run_uri"])
        except Exception as exc:  # noqa: BLE001 - the best run is safe in storage; say how to register it
            log.warning("could not register the best trial %s: %s", best["run_uri"], exc)
    try:
        _finish_mlflow(cfg, plan, parent_id, rows, best, summary)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not finish the sweep's MLflow run: %s", exc)
    return summary
