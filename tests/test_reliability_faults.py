"""Issue 9, faults without Ray (scenarios 3 and 4): the S3 endpoint stopped in the middle of a checkpoint upload and
restarted, and the MLflow server down at registration time. Training here is the bare per-worker loop (the same
code Ray Train runs), on a storage root on the loopback S3 endpoint."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest
import torch
from tiny_data import write_sketch_set

from pipeline import storage
from pipeline.config import load_config
from pipeline.models import factory
from pipeline.models.checkpoints import save_state_dict
from pipeline.storage import StorageError
from pipeline.train import loop, run_store, streams
from pipeline.train import plan as planning
from pipeline.train.spec import RunSpec

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[1]


def _cfg(root: str, *overrides: str):
    return load_config(REPO / "configs" / "tiny.yaml", [
        f"storage.root={root}", "train.sketch_sets=[{name: tri}]", "train.lambda_image=0", "train.batch_size=4",
        "train.iterations=4", "train.checkpoint_every=2", "train.log_every=2", "train.sample_every=100",
        "train.r1_every=2", *overrides])


def _world(root: str):
    """Random tiny base G/D and the sketch set 'tri' below ``root``; returns a config factory for it."""
    torch.set_num_threads(1)
    write_sketch_set(storage.join(root, "sketchsets", "tri"), n=3)
    arch = factory.generator_kwargs(_cfg(root).model)
    torch.manual_seed(11)
    g, d = storage.join(root, "base", "netG.pth"), storage.join(root, "base", "netD.pth")
    save_state_dict(factory.build_generator(arch), g)
    save_state_dict(factory.build_discriminator(arch), d)
    return lambda *o: _cfg(root, f"model.base_g={g}", f"model.base_d={d}", *o)


def _train(cfg) -> tuple[RunSpec, dict]:
    """Plan on the driver as `sketchgan train` does, then run the worker loop in this process."""
    [plan] = planning.plan_train(cfg)
    sketches = streams.decode_png_batch(plan.sketch_set.blobs, 1, cfg.model.size)
    return plan.spec, loop.run_worker(plan.spec, None, sketches, device=torch.device("cpu"))


class Outage:
    """Stops the S3 endpoint the moment the upload of an object whose key ends with ``key`` starts (from the
    client's send hook, so the request in flight meets a dead endpoint), and restarts it ``down_for`` seconds
    later (or only on `restore()` when None). Records the time of every attempt to send that object."""

    def __init__(self, endpoint, key: str, down_for: float | None):
        self.endpoint, self.key, self.down_for = endpoint, key, down_for
        self.attempts: list[float] = []
        self.stopped_at = self.restarted_at = None
        self._lock = threading.Lock()

    def __call__(self, request, **kwargs):
        if not request.url.split("?")[0].endswith(self.key):
            return None
        with self._lock:
            self.attempts.append(time.monotonic())
            if self.stopped_at is None:
                self.endpoint.stop()
                self.stopped_at = time.monotonic()
                if self.down_for is not None:
                    threading.Timer(self.down_for, self.restore).start()
        return None

    def restore(self) -> None:
        with self._lock:
            if self.restarted_at is None and self.stopped_at is not None:
                self.endpoint.start()
                self.restarted_at = time.monotonic()


@pytest.fixture
def outage(s3_endpoint):
    """Install an `Outage` on the process's S3 client; the endpoint is always running again afterwards."""
    installed = []

    def install(key: str, down_for: float | None) -> Outage:
        o = Outage(s3_endpoint, key, down_for)
        storage.s3_client().meta.events.register("before-send.s3.PutObject", o)
        installed.append((storage.s3_client(), o))
        return o

    yield install
    for client, o in installed:
        client.meta.events.unregister("before-send.s3.PutObject", o)
        deadline = time.monotonic() + 30
        while o.down_for is not None and o.stopped_at is not None and o.restarted_at is None \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        if o.stopped_at is not None and o.restarted_at is None:
            o.restore()
    storage._s3_client.cache_clear()


def _weights(run_uri: str) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(storage.read_bytes(storage.join(run_uri, "final", "G.pth"))), weights_only=True)


def test_s3_outage_during_a_checkpoint_upload_is_retried_with_backoff_and_the_run_continues(s3_bucket, outage):
    root = f"s3://{s3_bucket}/root"
    cfg_for = _world(root)
    retries = storage.s3_client().meta.config.retries  # exponential backoff with jitter between attempts
    assert retries["mode"] == "standard" and retries["total_max_attempts"] == storage._MAX_ATTEMPTS + 1
    o = outage("/runs/train-tri/checkpoints/ckpt-00000004.pt", down_for=2.0)
    spec, metrics = _train(cfg_for())
    assert o.stopped_at is not None and o.restarted_at is not None, "the outage never happened"
    assert len(o.attempts) >= 2, "the upload was not retried"
    assert o.attempts[-1] >= o.restarted_at, "the upload cannot have succeeded while the endpoint was down"
    assert o.attempts[-1] - o.attempts[0] >= 2.0 - 0.05  # retries kept going through the whole outage
    assert metrics["iteration"] == 4
    # the checkpoint made during the outage is whole and is the latest; the run finished normally
    latest = run_store.latest_checkpoint(spec.run_uri)
    assert latest.endswith("ckpt-00000004.pt")
    ckpt = run_store.load_checkpoint(latest)
    assert ckpt["iteration"] == 4 and ckpt["history"][-1]["iteration"] == 4
    assert storage.read_json(storage.join(spec.run_uri, "final", "metadata.json"))["resumed_at"] == []


def test_s3_down_past_the_retries_fails_clearly_keeps_the_previous_checkpoint_and_the_rerun_continues(
        s3_bucket, outage, monkeypatch):
    root = f"s3://{s3_bucket}/root"
    cfg_for = _world(root)
    straight, _ = _train(cfg_for("train.run_prefix=straight"))  # the reference, without any outage

    monkeypatch.setattr(storage, "_MAX_ATTEMPTS", 2)  # give up quickly
    storage._s3_client.cache_clear()
    o = outage("/runs/train-tri/checkpoints/ckpt-00000004.pt", down_for=None)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"cannot write s3://.*/runs/train-tri/checkpoints/ckpt-00000004\.pt"):
        _train(cfg_for())
    assert len(o.attempts) >= 2 and time.monotonic() - t0 < 60
    o.restore()
    monkeypatch.undo()
    storage._s3_client.cache_clear()

    run = storage.join(root, "runs", "train-tri")
    ckpts = [u.rsplit("/", 1)[-1] for u in storage.list_files(storage.join(run, "checkpoints"))]
    assert ckpts == ["ckpt-00000002.pt", "latest.json"]  # no partial ckpt-4 object anywhere
    assert storage.read_json(storage.join(run, "checkpoints", "latest.json"))["iteration"] == 2
    assert run_store.load_checkpoint(run_store.latest_checkpoint(run))["iteration"] == 2  # the previous one still loads
    assert not storage.exists(storage.join(run, "final", "metadata.json"))  # not mistaken for finished

    # launched again (as Ray Train's restart does), the run continues from iteration 2 and ends where an
    # uninterrupted run ends, bit for bit
    spec, metrics = _train(cfg_for())
    assert metrics["iteration"] == 4
    meta = storage.read_json(storage.join(run, "final", "metadata.json"))
    assert meta["resumed_at"] == [2] and meta["iterations"] == 4
    a, b = _weights(straight.run_uri), _weights(spec.run_uri)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- 4. MLflow down at registration time ---------------------------------------------------------------------
def _snapshot(prefix: str) -> dict[str, bytes]:
    return {u: storage.read_bytes(u) for u in storage.list_files(prefix)}


def test_mlflow_down_at_registration_keeps_outputs_and_registration_reruns_later(
        s3_endpoint, s3_bucket, tmp_path, monkeypatch, caplog):
    from mlflow_server import MlflowServer

    from pipeline.registry import mlflow_registry as reg
    from pipeline.registry import tracking

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    root = f"s3://{s3_bucket}/root"
    cfg_for = _world(root)
    spec, _ = _train(cfg_for("train.iterations=2"))
    server = MlflowServer(tmp_path / "mlflow", s3_endpoint.env, s3_endpoint.new_bucket("mlflow"))  # not started
    cfg = cfg_for("train.iterations=2", f"registry.tracking_uri={server.url}")
    before = _snapshot(spec.run_uri)
    assert any(u.endswith("/final/G.pth") for u in before)

    lines = reg.track_runs(cfg, [spec.run_uri])
    assert len(lines) == 1 and lines[0].startswith(f"{spec.run_uri}: not logged to MLflow (")
    assert "the run is complete in storage: run the same command again" in caplog.text and spec.run_uri in caplog.text
    assert _snapshot(spec.run_uri) == before  # the outputs are all still there, untouched

    try:
        server.start()
        name = "sketchgan-shapes-tri"
        assert reg.track_runs(cfg, [spec.run_uri]) == [f"{spec.run_uri}: registered as models:/{name}/1"]
        assert reg.track_runs(cfg, [spec.run_uri]) == [f"{spec.run_uri}: registered as models:/{name}/1"]
        mlf = tracking.client(cfg)
        versions = mlf.search_model_versions(f"name = '{name}'")
        assert [str(v.version) for v in versions] == ["1"]
        exp = mlf.get_experiment_by_name(cfg.registry.experiment).experiment_id
        runs = mlf.search_runs([exp], f"tags.`{tracking.TAG_RUN_URI}` = '{spec.run_uri}'")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        meta = storage.read_json(storage.join(spec.run_uri, "final", "metadata.json"))
        assert versions[0].tags["sketchgan.g_sha256"] == meta["g_sha256"]
        resolved = reg.resolve_model(f"models:/{name}@champion", cfg)
        # the run is the version's lineage; its weights are the version's own artifact, the run's G byte for byte
        assert resolved.run_uri == spec.run_uri and resolved.model_uri == f"models:/{name}/1" and resolved.g_uri is None
        own = resolved.load_generator(cfg, "cpu").state_dict()
        from pipeline.models.checkpoints import load_state_dict

        stored = load_state_dict(storage.join(spec.run_uri, "final", "G.pth"))
        assert own.keys() == stored.keys() and all(torch.equal(own[k], stored[k]) for k in own)
    finally:
        server.stop()
