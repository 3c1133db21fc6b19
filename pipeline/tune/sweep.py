"""`sketchgan tune`: a Ray Tune sweep of GANSketching training settings for one sketch set (planned by
`pipeline.tune.plan`).

Each trial is one ordinary training run, `pipeline.train.raytrain.run_training` (the code `sketchgan train` runs):
a Tune function trainable that launches the run's `TorchTrainer` (Ray Train v2) and forwards its reports to
Tune with a `TuneReportCallback`. Trials write the run contract to ``<root>/runs/<sweep>-<trial id>``; Tune's
own state lives in ``<root>/tune/<sweep>``, from which an interrupted sweep is restored (``--resume``): trial
ids, and so run names, are kept, and every unfinished trial continues from its latest storage checkpoint.

ASHA stops poor trials early on ``tune.metric`` (``fid`` when the sketch set has an evaluation set and
``train.eval_every`` is set, else the sketch loss ``loss_sketch``), measured in training iterations.

MLflow (driver side, from storage; `pipeline.tune.mlflow_runs`): the sweep is a parent run; each trial is logged
as a child run when it ends (a logging failure is a warning: the results are safe in storage, and the end of the
sweep logs again, idempotently); the best finished trial is registered in the model registry.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from pipeline import layout, storage
from pipeline.config import Config, SketchSetSpec, updated
from pipeline.raysession import ensure_ray
from pipeline.tune.mlflow_runs import finish_sweep_run, parent_run, trial_logger
from pipeline.tune.plan import SweepError, SweepPlan, plan_sweep, trial_changes, trial_run_name

log = logging.getLogger("sketchgan.tune")


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


def run_sweep(cfg: Config) -> dict[str, Any]:
    """Run (or resume) the configured sweep; returns a summary with one row per trial and the best trial."""
    plan = plan_sweep(cfg)
    ensure_ray()
    parent_id = parent_run(cfg, plan)
    tuner = _tuner(plan, [trial_logger(plan.cfg, parent_id)])
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
        finish_sweep_run(cfg, plan, parent_id, rows, best, summary)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not finish the sweep's MLflow run: %s", exc)
    return summary
