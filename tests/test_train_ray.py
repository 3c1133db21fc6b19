"""Training through Ray Train on the CPU: pretraining with 2 workers, GANSketching with 1 and 2 workers,
several sketch sets at once, bf16, a worker killed mid-run, and a run stopped and resumed on request."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import torch
from tiny_data import write_pairs_dataset, write_sketch_set

from pipeline import storage
from pipeline.config import load_config
from pipeline.models import factory
from pipeline.train import plan as planning
from pipeline.train import raytrain

REPO = Path(__file__).resolve().parents[1]

# Small and quick: 4 iterations, checkpoints every 2, R1 on even iterations, 3 batches of 8 per epoch.
COMMON = ["train.batch_size=8", "train.iterations=4", "train.checkpoint_every=2", "train.log_every=2",
          "train.sample_every=2", "train.r1_every=2", "train.max_failures=1", "train.cpus_per_worker=0.5"]


@pytest.fixture(scope="module")
def world(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-ray")
    write_pairs_dataset(str(root / "datasets" / "shapes"), n=24)
    write_sketch_set(str(root / "sketchsets" / "tri"), n=3, name="tri")
    write_sketch_set(str(root / "sketchsets" / "tri2"), n=2, name="tri2", seed=5)
    return root


def cfg_for(root: Path, *overrides: str):
    return load_config(REPO / "configs" / "tiny.yaml", [f"storage.root={root}", *overrides])


@pytest.fixture(scope="module")
def base(world):
    """`sketchgan pretrain` with 2 data-parallel workers; its outputs are the base of every train run."""
    cfg = cfg_for(world, "pretrain.iterations=3", "pretrain.batch_size=8", "pretrain.num_workers=2",
                  "pretrain.cpus_per_worker=0.5", "pretrain.log_every=1", "pretrain.checkpoint_every=2")
    handler = signal.getsignal(signal.SIGINT)
    summary = raytrain.pretrain(cfg)  # on the main thread, where Ray Train installs a Ctrl-C handler for the run
    summary["sigint_handlers"] = (handler, signal.getsignal(signal.SIGINT))
    return summary, cfg


@pytest.fixture(scope="module")
def straight(world, base):
    """One worker, four iterations straight through: the reference for the resume and kill tests."""
    summary = raytrain.train_all(train_cfg(world, "train.run_prefix=straight"))[0]
    return summary


def train_cfg(root: Path, *overrides: str):
    final = root / "runs" / "base" / "final"
    return cfg_for(root, f"model.base_g={final / 'G.pth'}", f"model.base_d={final / 'D.pth'}",
                   "train.sketch_sets=[{name: tri}]", *COMMON, *overrides)


def weights(run_uri: str) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_uri) / "final" / "G.pth", weights_only=True)


def metrics(run_uri: str) -> list[dict]:
    import json

    return [json.loads(line) for line in storage.read_text(storage.join(run_uri, "metrics.jsonl")).splitlines()]


def test_pretrain_with_two_workers_publishes_a_usable_base(base):
    summary, cfg = base
    run = summary["run_uri"]
    meta = summary["metadata"]
    assert meta["kind"] == "pretrain" and meta["iterations"] == 3
    assert meta["arch"] == factory.generator_kwargs(cfg.model)
    for name in ("G.pth", "D.pth", "metadata.json"):
        assert storage.exists(storage.join(run, "final", name)), name
    rows = metrics(run)
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) and r["img_per_s"] > 0 for r in rows)
    G, loaded_meta = factory.load_run_generator(run, "cpu")
    assert loaded_meta["run_name"] == "base"
    with torch.no_grad():
        out = G([torch.randn(2, cfg.model.style_dim)])[0]
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    # EMA G, not the raw G, is published: it differs from the last raw weights in the checkpoint
    from pipeline.train.run_store import latest_checkpoint, load_checkpoint

    ckpt = load_checkpoint(latest_checkpoint(run))
    assert ckpt["iteration"] == 3
    published = torch.load(Path(run) / "final" / "G.pth", weights_only=True)
    assert all(torch.equal(published[k], ckpt["step"]["G_ema"][k]) for k in published)


def test_a_run_on_the_main_thread_gives_ctrl_c_back(base):
    # Ray Train's handler would abort the finished run's controller (keeping it alive) and swallow the next Ctrl-C
    before, after = base[0]["sigint_handlers"]
    assert after is before


def test_train_one_worker_writes_the_run_contract(straight, world):
    run = straight["run_uri"]
    meta = straight["metadata"]
    assert meta["kind"] == "train" and meta["sketch_set"]["name"] == "tri" and meta["sketch_set"]["id"]
    assert meta["base_g_sha256"] and meta["dataset_manifest_id"] == "tiny-0-24" and meta["resumed_at"] == []
    rows = metrics(run)
    assert [r["iteration"] for r in rows] == [2, 4]
    for key in ("loss_sketch", "loss_d_sketch", "loss_d_image", "it_per_s", "img_per_s"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert all(0 <= r["data_wait_frac"] < 1 for r in rows)  # time spent waiting for real images
    # the worker's CPU time over wall time: it computed (> 0) on at most the machine's cores
    assert all(0 < r["cpu_cores"] <= (os.cpu_count() or 1) * 1.05 for r in rows)
    samples = [u.rsplit("/", 1)[-1] for u in storage.list_files(storage.join(run, "samples"), ".png")]
    assert samples == ["iter-00000000.png", "iter-00000002.png", "iter-00000004.png"]
    ckpts = [u.rsplit("/", 1)[-1] for u in storage.list_files(storage.join(run, "checkpoints"), ".pt")]
    assert ckpts == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    base = torch.load(world / "runs" / "base" / "final" / "G.pth", weights_only=True)
    g = weights(run)
    assert g.keys() == base.keys()
    assert any(not torch.equal(g[k], base[k]) for k in g if k.startswith("style."))  # the mapping was trained
    assert all(torch.equal(g[k], base[k]) for k in g if not k.startswith("style."))  # the rest was not


def test_local_runs_go_without_a_preemption_watcher(straight):
    from ray._private import state as ray_state  # the GCS's actor table, dead actors included

    classes = {a["ActorClassName"] for a in ray_state.actors().values()}
    assert any("Controller" in c for c in classes), classes  # the table does list Ray Train's actors
    assert not any("Preemption" in c for c in classes), classes


def test_one_worker_runs_keep_torch_out_of_ray_trains_controller(world, straight):
    """Ray Train starts a controller process per run, which unpickles the run's backend config: a one-worker
    run's (`SingleWorkerConfig`) loads no torch there, where Ray's `TorchConfig` costs ≈ 400 MiB per run."""
    import threading
    import time

    import psutil
    import ray

    raylet = psutil.Process(ray._private.worker._global_node.all_processes["raylet"][0].process.pid)
    loaded: dict[str, bool] = {}  # process kind -> libtorch seen in its memory map at any poll
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for proc in raylet.children(recursive=True):
                try:
                    title = " ".join(proc.cmdline())
                    kind = next((k for k in ("TrainController", "RayTrainWorker") if title.startswith(f"ray::{k}")),
                                None)
                    if kind and proc.create_time() >= started:  # this run's (earlier runs' may linger)
                        torch_mapped = "libtorch_cpu" in Path(f"/proc/{proc.pid}/maps").read_text()
                        loaded[kind] = loaded.get(kind, False) or torch_mapped
                except (psutil.Error, OSError):
                    pass  # gone between the listing and the read
            time.sleep(0.1)

    started = time.time() - 1  # process start times are rounded to clock ticks
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        raytrain.train_all(train_cfg(world, "train.run_prefix=notorch", "train.iterations=2"))
    finally:
        stop.set()
        watcher.join()
    assert loaded == {"TrainController": False, "RayTrainWorker": True}


@pytest.mark.reliability
def test_kill_worker_mid_run_recovers_from_latest_checkpoint(world, straight, monkeypatch, tmp_path):
    marker = tmp_path / "crashed-once"
    monkeypatch.setenv(raytrain.CRASH_ENV, f"3:{marker}")  # die at iteration 3, after the checkpoint at 2
    summary = raytrain.train_all(train_cfg(world, "train.run_prefix=kill"))[0]
    assert marker.exists(), "the worker never crashed"
    meta = summary["metadata"]
    assert meta["resumed_at"] == [2] and meta["final_metrics"]["iteration"] == 4
    assert [r["iteration"] for r in metrics(summary["run_uri"])] == [2, 4]
    a, b = weights(straight["run_uri"]), weights(summary["run_uri"])
    assert all(torch.equal(a[k], b[k]) for k in a), "recovered run differs from the straight run"


def test_resume_on_request_matches_the_straight_run(world, straight):
    first = raytrain.train_all(train_cfg(world, "train.run_prefix=stop", "train.iterations=2"))[0]
    assert first["metadata"]["iterations"] == 2
    with pytest.raises(planning.TrainingInputError, match="already finished with 2 iterations.*--resume stop-tri"):
        raytrain.train_all(train_cfg(world, "train.run_prefix=stop"))
    # sketch sets come from the named run when the config lists none
    cfg = train_cfg(world, "train.run_prefix=stop", "train.resume=stop-tri", "train.sketch_sets=[]")
    resumed = raytrain.train_all(cfg)[0]
    assert resumed["metadata"]["resumed_at"] == [2] and resumed["metadata"]["iterations"] == 4
    a, b = weights(straight["run_uri"]), weights(resumed["run_uri"])
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the straight run"
    again = raytrain.train_all(cfg)[0]  # finished: reused, not retrained
    assert again["reused"] and again["metadata"]["g_sha256"] == resumed["metadata"]["g_sha256"]


def test_streamed_images_train_the_same_weights_as_a_materialised_dataset(world, straight, monkeypatch):
    """A dataset too large to materialise streams through a split coordinator; a small one comes one part
    per rank. Both feed the loop the same batches, so both runs end with the same weights."""
    monkeypatch.setattr(raytrain, "MATERIALIZE_MAX_BYTES", 0)
    plan = planning.plan_train(train_cfg(world, "train.run_prefix=streamed"))[0]
    data = raytrain.prepare_run_inputs([plan])[plan.run_name]
    assert data["images"][1] is False  # really the streaming split path
    streamed = raytrain.train_all(train_cfg(world, "train.run_prefix=streamed"))[0]
    a, b = weights(straight["run_uri"]), weights(streamed["run_uri"])
    assert all(torch.equal(a[k], b[k]) for k in a), "streamed images trained other weights"


def test_small_datasets_are_split_once_into_one_part_per_rank(ray_local):
    """Two part files of 6 and 5 rows among 2 ranks: contiguous parts of 5, the last row dropped (losing a node
    with these parts on it is tests/test_multinode.py)."""
    import pyarrow as pa
    import ray.data

    files = [pa.table({"image": [bytes([i]) for i in range(6)]}),
             pa.table({"image": [bytes([i]) for i in range(6, 11)]})]
    parts, per_rank = raytrain.image_datasets(files, 2)
    assert per_rank and sorted(parts) == ["images_0", "images_1"]
    rows = [[r["image"][0] for r in parts[f"images_{i}"].take_all()] for i in range(2)]
    assert rows == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    whole, per_rank = raytrain.image_datasets(files, 1)
    assert per_rank and [r["image"][0] for r in whole["images_0"].take_all()] == list(range(11))
    assert whole["images_0"].num_blocks() == 2  # the part files' chunks stay blocks
    lazy = ray.data.range(10)
    assert raytrain.image_datasets(lazy, 2) == ({"images": lazy}, False)
    assert raytrain.image_datasets(None, 2) == ({}, False)
    with pytest.raises(ValueError, match="11 real images cannot be split among 12 workers"):
        raytrain.image_datasets(files, 12)


def test_two_sketch_sets_at_once_with_two_workers_each_in_bf16_unlike_fp32(world, base):
    cfg = train_cfg(world, "train.run_prefix=multi", "train.sketch_sets=[{name: tri}, {name: tri2}]",
                    "train.num_workers=2", "train.precision=bf16", "train.iterations=2", "train.batch_size=4",
                    "train.max_concurrent_runs=2")
    summaries = {s["run_name"]: s for s in raytrain.train_all(cfg)}
    assert set(summaries) == {"multi-tri", "multi-tri2"}
    for name, s in summaries.items():
        m = s["metadata"]
        assert m["config"]["train"]["precision"] == "bf16" and m["config"]["train"]["num_workers"] == 2
        assert m["sketch_set"]["name"] == name.split("-", 1)[1]
        for key in ("loss_sketch", "loss_d_sketch", "loss_d_image"):
            assert math.isfinite(m["final_metrics"][key]), (name, key)
        assert all(torch.isfinite(t).all() for t in weights(s["run_uri"]).values())
    assert summaries["multi-tri"]["metadata"]["g_sha256"] != summaries["multi-tri2"]["metadata"]["g_sha256"]
    # bf16 really ran: the same run in fp32 (same seed, data and workers) ends with other weights
    fp32 = raytrain.train_all(train_cfg(world, "train.run_prefix=multi32", "train.sketch_sets=[{name: tri}]",
                                        "train.num_workers=2", "train.iterations=2", "train.batch_size=4"))[0]
    a, b = weights(summaries["multi-tri"]["run_uri"]), weights(fp32["run_uri"])
    assert any(not torch.equal(a[k], b[k]) for k in a), "the bf16 run trained exactly the fp32 weights"


def test_train_command_registers_finished_runs_once(world, straight, tmp_path, capsys):
    """`sketchgan train` logs and registers what it trained; run again, it reuses the finished run and
    registers nothing twice (the way to catch up after an MLflow outage)."""
    import yaml
    from mlflow import MlflowClient

    from pipeline import cli
    from pipeline.registry import tracking

    cfg = train_cfg(world, "train.run_prefix=straight")
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    for _ in range(2):
        assert cli.main(["train", "--config", str(config)]) == 0
        out = capsys.readouterr().out
        assert "straight-tri:" in out and "(already finished)" in out
        assert f"{straight['run_uri']}: registered as models:/sketchgan-shapes-tri/1" in out
    mlf = MlflowClient(tracking_uri=tracking.tracking_uri(cfg))
    versions = mlf.search_model_versions("name = 'sketchgan-shapes-tri'")
    assert [str(v.version) for v in versions] == ["1"]
