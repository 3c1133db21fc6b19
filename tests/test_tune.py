"""`sketchgan tune`: sweep validation, and a small real sweep (Ray Tune + Ray Train, 32 px, 4 iterations) whose
trials, child runs and best trial land in storage and MLflow; then the sweep restored from Tune's state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from overrides import with_overrides
from tiny_data import write_pairs_dataset, write_sketch_set

from pipeline import cli, storage
from pipeline.config import load_config
from pipeline.models import factory
from pipeline.models.checkpoints import save_state_dict

REPO = Path(__file__).resolve().parents[1]
SWEEP = ["train.sketch_sets=[{name: tri}]", "train.batch_size=4", "train.iterations=4", "train.checkpoint_every=2",
         "train.log_every=1", "train.sample_every=4", "train.r1_every=2",
         "tune.param_space={train.lambda_image: [0.0, 0.7]}", "tune.cpus_per_trial=0.5", "tune.driver_cpus=0.01",
         "tune.grace_period=2", "tune.max_concurrent_trials=2", "tune.name=small"]


def world(root: Path, *overrides: str):
    """Tiny inputs in the stage contracts and a random base G/D (no pretraining needed)."""
    write_pairs_dataset(str(root / "datasets" / "shapes"), n=24)
    write_sketch_set(str(root / "sketchsets" / "tri"), n=3, name="tri")
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"storage.root={root}"])
    arch = factory.generator_kwargs(cfg.model)
    torch.manual_seed(0)
    save_state_dict(factory.build_generator(arch), root / "base" / "G.pth")
    save_state_dict(factory.build_discriminator(arch), root / "base" / "D.pth")
    return with_overrides(cfg, [f"model.base_g={root}/base/G.pth", f"model.base_d={root}/base/D.pth", *SWEEP,
                                *overrides])


@pytest.mark.reliability
def test_sweep_settings_are_checked_before_anything_runs(tmp_path):
    from pipeline.tune.sweep import SweepError, plan_sweep

    cfg = world(tmp_path)
    plan = plan_sweep(cfg)
    assert plan.metric == "loss_sketch" and plan.space == {"train.lambda_image": [0.0, 0.7]}
    assert plan.cfg.train.cpus_per_worker == 0.5 and plan.tune_uri == f"{tmp_path}/tune/small"
    cases = {
        "tune.param_space={train.sketch_sets: [[]]}": "cannot be swept",
        "tune.param_space={train.no_such: [1]}": "train has no field 'no_such'",
        "tune.param_space={train.augment: [translation, zoom]}": "train.augment: value 'zoom' is not valid",
        "tune.param_space={train.trained: [mapping, w_shift]}": "do not fit one",
        "tune.metric=fid": "needs an evaluation set",
        "tune.sketch_set=nope": "not one of train.sketch_sets",
    }
    for override, message in cases.items():
        with pytest.raises(SweepError, match=message):
            plan_sweep(with_overrides(cfg, [override]))
    with pytest.raises(SweepError, match="exactly one"):
        plan_sweep(with_overrides(cfg, ["train.sketch_sets=[{name: tri}, {name: b}]"]))
    with pytest.raises(ValueError, match="sweep keys are train"):
        with_overrides(cfg, ["tune.param_space={model.size: [32]}"])


def test_small_sweep_lands_in_storage_and_mlflow_and_restores(ray_local, tmp_path, capsys):
    from pipeline.registry import tracking
    from pipeline.tune.sweep import SweepError, run_sweep

    cfg = world(tmp_path)
    summary = run_sweep(cfg)
    rows = summary["trials"]
    assert sorted(r["params"]["train.lambda_image"] for r in rows) == [0.0, 0.7]
    assert all(r["error"] is None and r["run_uri"] for r in rows)
    finished = [r for r in rows if r["finished"]]
    assert finished, rows  # ASHA never stops the first trial to reach a rung
    best = summary["best"]
    assert best["metric"] == min(r["metric"] for r in finished)
    # Each trial ran the ordinary training code with its own settings (the run contract, its config).
    for r in rows:
        info = storage.read_json(storage.join(r["run_uri"], "run.json"))
        assert info["config"]["train"]["lambda_image"] == r["params"]["train.lambda_image"]
        last = json.loads(storage.read_text(storage.join(r["run_uri"], "metrics.jsonl")).splitlines()[-1])
        # A stopped trial may run a step or two past its last report to Tune before its actor is gone.
        assert last["iteration"] == 4 if r["finished"] else last["iteration"] >= r["iteration"]
    meta = storage.read_json(storage.join(best["run_uri"], "final", "metadata.json"))
    assert meta["final_metrics"]["loss_sketch"] == pytest.approx(best["metric"])

    # MLflow: a parent run with one child per trial; the best trial registered and champion.
    mlf = tracking.client(cfg)
    exp = mlf.get_experiment_by_name(cfg.registry.experiment).experiment_id
    [parent] = mlf.search_runs([exp], "tags.`sketchgan.kind` = 'sweep'")
    assert parent.info.status == "FINISHED" and parent.data.tags["sketchgan.best_run_uri"] == best["run_uri"]
    assert parent.data.metrics["best_loss_sketch"] == pytest.approx(best["metric"])
    children = mlf.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["sketchgan.run_uri"] for c in children) == sorted(r["run_uri"] for r in rows)
    for c in children:
        row = next(r for r in rows if r["run_uri"] == c.data.tags["sketchgan.run_uri"])
        assert c.info.status == ("FINISHED" if row["finished"] else "KILLED")
        assert c.data.params["train.lambda_image"] == str(row["params"]["train.lambda_image"])
        logged = storage.read_text(storage.join(row["run_uri"], "metrics.jsonl")).splitlines()
        assert len(mlf.get_metric_history(c.info.run_id, "loss_sketch")) == len(logged)
    name, version = summary["registered"]
    assert name == "sketchgan-shapes-tri"
    champion = mlf.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == version and champion.tags["sketchgan.run_uri"] == best["run_uri"]

    # Same name again without --resume: refused. With --resume (through the CLI): Tune restores the finished
    # sweep, nothing is trained, logged or registered twice.
    with pytest.raises(SweepError, match="already exists"):
        run_sweep(cfg)
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    capsys.readouterr()
    assert cli.main(["tune", "--config", str(config), "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"best: {best['run_uri']}" in out and f"registered: models:/{name}/{version}" in out
    assert len(mlf.search_model_versions(f"name = '{name}'")) == 1
    assert len(mlf.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")) == len(rows)
    assert len(mlf.search_runs([exp], "tags.`sketchgan.kind` = 'sweep'")) == 1


def test_only_reports_with_the_sweep_metric_reach_tune(monkeypatch):
    """FID is measured only every train.eval_every iterations: reports without it are not forwarded (Tune
    refuses results that lack the metric), and every forwarded one names the trial's run."""
    import ray.tune.integration.ray_train as integration

    from pipeline.tune.sweep import _report_callback

    forwarded = []

    class Session:
        def _get_or_create_inter_actor_queue(self):
            return type("Q", (), {"put": staticmethod(forwarded.append)})()

    monkeypatch.setattr(integration, "_in_tune_session", lambda: True)
    monkeypatch.setattr(integration, "get_session", lambda: Session())
    callback = _report_callback("fid", "/runs/sweep-t1")
    callback.after_report(None, [{"iteration": 10, "loss_sketch": 0.5}], None)
    callback.after_report(None, [{"iteration": 20, "loss_sketch": 0.4, "fid": 12.0}], None)
    assert forwarded == [{"iteration": 20, "loss_sketch": 0.4, "fid": 12.0, "run_uri": "/runs/sweep-t1"}]
