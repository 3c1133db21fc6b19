"""Issue 9, secrets (scenario 11): credentials planted in the environment never reach the logs, the files written to
storage (configs, metadata, checkpoints) or MLflow (params, tags, artifacts, model versions)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from tiny_data import write_sketch_set

from pipeline import cli, storage
from pipeline.chain import ChainReport, print_where_to_look
from pipeline.config import load_config
from pipeline.models import factory
from pipeline.models.checkpoints import save_state_dict
from pipeline.registry import mlflow_registry as reg
from pipeline.registry import tracking
from pipeline.train import loop, streams
from pipeline.train import plan as planning

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[1]
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAPLANTED0SECRET77",
    "AWS_SECRET_ACCESS_KEY": "planted/aws+secret/key0123456789abcdefXYZ",
    "MLFLOW_TRACKING_USERNAME": "planted-mlflow-user",
    "MLFLOW_TRACKING_PASSWORD": "planted-mlflow-password-42",
    "MLFLOW_TRACKING_TOKEN": "planted-mlflow-token-0xdeadbeef",
}
DOWN_SERVER_PASSWORD = "planted-uri-password-99"


def _leaks(text: str) -> list[str]:
    return [k for k, v in {**SECRETS, "uri password": DOWN_SERVER_PASSWORD}.items() if v in text]


def test_planted_secrets_never_reach_logs_storage_or_mlflow(tmp_path, monkeypatch, caplog, capsys):
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    caplog.set_level(logging.INFO)  # every logger, at the level the command line logs at
    torch.set_num_threads(1)
    root = tmp_path / "root"
    write_sketch_set(str(root / "sketchsets" / "tri"), n=3)
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"storage.root={root}", "train.sketch_sets=[{name: tri}]", "train.lambda_image=0", "train.batch_size=4",
        "train.iterations=2", "train.checkpoint_every=1", "train.log_every=1", "train.sample_every=1"])
    arch = factory.generator_kwargs(cfg.model)
    save_state_dict(factory.build_generator(arch), str(root / "base" / "G.pth"))
    save_state_dict(factory.build_discriminator(arch), str(root / "base" / "D.pth"))
    from overrides import with_overrides

    cfg = with_overrides(cfg, [f"model.base_g={root / 'base' / 'G.pth'}", f"model.base_d={root / 'base' / 'D.pth'}"])

    # train (the driver's planning, then the worker loop), register, list, look up, fail to reach a server
    [plan] = planning.plan_train(cfg)
    sketches = streams.decode_png_batch(plan.sketch_set.blobs, 1, cfg.model.size)
    storage.write_json(storage.join(plan.spec.run_uri, "run.json"), {"run_name": plan.run_name, "kind": "train",
                                                                      "config": plan.spec.config})
    loop.run_worker(plan.spec, None, sketches, device=torch.device("cpu"))
    [line] = reg.track_runs(cfg, [plan.spec.run_uri])
    assert line.endswith("registered as models:/sketchgan-shapes-tri/1")
    args = ["--set", f"storage.root={root}"]
    assert cli.main(["models", "list", *args]) == 0
    assert cli.main(["generate", "--model", "models:/sketchgan-shapes-nope@champion", "--out",
                     str(tmp_path / "x.png"), *args]) == 1
    down = f"http://svc:{DOWN_SERVER_PASSWORD}@127.0.0.1:9"
    assert cli.main(["generate", "--model", "models:/sketchgan-shapes-tri@champion", "--out", str(tmp_path / "y.png"),
                     *args, "--set", f"registry.tracking_uri={down}"]) == 1
    assert cli.main(["models", "list", *args, "--set", "registry.model_prefix=none"]) == 0
    [failed] = reg.track_runs(with_overrides(cfg, [f"registry.tracking_uri={down}"]), [plan.spec.run_uri])
    assert "not logged to MLflow" in failed and "http://***@127.0.0.1:9" in failed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    print_where_to_look(cfg.model_copy(update={"registry": cfg.registry.model_copy(update={"tracking_uri": None})}),
                        ChainReport())
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    # 1. logs: everything logged and printed
    out = capsys.readouterr()
    logged = caplog.text + out.out + out.err + failed
    assert "http://***@127.0.0.1:9" in logged  # the URI was reported, with its password masked
    assert _leaks(logged) == []

    # 2. storage: every file below the root except MLflow's own store (configs, metadata, metrics, checkpoints)
    files = [p for p in root.rglob("*") if p.is_file() and "mlflow" not in p.relative_to(root).parts]
    assert any(p.name == "run.json" for p in files) and any(p.name.endswith(".pt") for p in files)
    for p in files:
        assert _leaks(p.read_bytes().decode("latin-1")) == [], p

    # 3. MLflow: params, tags and artifacts of every run; the registered model and its versions
    mlf = tracking.client(cfg)
    exp = mlf.get_experiment_by_name(cfg.registry.experiment).experiment_id
    runs = mlf.search_runs([exp])
    assert runs
    for r in runs:
        assert _leaks(json.dumps(r.data.params) + json.dumps(r.data.tags)) == [], r.info.run_id
        for path in ("config.yaml", "metadata.json"):
            local = mlf.download_artifacts(r.info.run_id, path, str(tmp_path / "dl" / r.info.run_id))
            assert _leaks(Path(local).read_text()) == [], path
    model = mlf.get_registered_model("sketchgan-shapes-tri")
    versions = mlf.search_model_versions("name = 'sketchgan-shapes-tri'")
    assert len(versions) == 1
    assert _leaks(json.dumps(model.tags) + (model.description or "") + json.dumps(versions[0].tags)
                  + (versions[0].description or "")) == []
