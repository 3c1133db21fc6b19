"""A sweep in MLflow (driver side, from storage): a parent run per sweep, a child run per trial when it ends, the
best trial's figures and registration on the parent. MLflow being down never stops a sweep."""

from __future__ import annotations

import json
import logging
from typing import Any

from pipeline import layout
from pipeline.config import Config
from pipeline.tune.plan import SweepPlan, trial_run_name

log = logging.getLogger("sketchgan.tune")

TAG_SWEEP = "sketchgan.sweep_uri"


def parent_run(cfg: Config, plan: SweepPlan) -> str | None:
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


def trial_logger(cfg: Config, parent_id: str | None):
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


def finish_sweep_run(cfg: Config, plan: SweepPlan, parent_id: str | None, rows: list[dict], best: dict | None,
                   summary: dict[str, Any]) -> None:
    from pipeline.registry import tracking

    if parent_id is None:
        try:
            parent_id = parent_run(cfg, plan)
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
