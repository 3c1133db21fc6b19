"""Every stage gets Ray the same way: the job's cluster, a live `ray start` cluster, else a local instance;
a stale record of a dead cluster never makes a command wait for it."""

from __future__ import annotations

import socket

import pytest

from pipeline import raysession


@pytest.fixture
def init_calls(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_stale_cluster_record_starts_a_local_instance(init_calls, monkeypatch, caplog):
    stale = f"127.0.0.1:{closed_port()}"
    monkeypatch.setattr(raysession, "_recorded_cluster", lambda: stale)
    raysession.ensure_ray()
    assert init_calls[0]["address"] == "local"
    assert init_calls[0]["runtime_env"]["env_vars"]["PYTHONPATH"] == raysession.PACKAGE_ROOT
    assert stale in caplog.text and "not running" in caplog.text


def test_live_cluster_record_and_job_address_are_used(init_calls, monkeypatch):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        live = f"127.0.0.1:{listener.getsockname()[1]}"
        monkeypatch.setattr(raysession, "_recorded_cluster", lambda: live)
        raysession.ensure_ray()
    assert init_calls[-1]["address"] is None  # Ray itself joins the recorded cluster
    monkeypatch.setattr(raysession, "_recorded_cluster", lambda: f"127.0.0.1:{closed_port()}")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    raysession.ensure_ray()
    assert init_calls[-1]["address"] == "127.0.0.1:6379"  # inside a submitted job: always the job's cluster


def test_local_instances_run_workers_at_normal_priority_without_a_preemption_watcher(init_calls, monkeypatch):
    import os

    monkeypatch.setattr(raysession, "_recorded_cluster", lambda: None)
    monkeypatch.delenv(raysession.WORKER_NICENESS_ENV, raising=False)
    monkeypatch.delenv(raysession.PREEMPTION_WATCHER_ENV, raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a cluster's job: Ray's defaults stay
    raysession.ensure_ray()
    assert raysession.WORKER_NICENESS_ENV not in os.environ and raysession.PREEMPTION_WATCHER_ENV not in os.environ
    monkeypatch.delenv("RAY_ADDRESS")
    raysession.ensure_ray()
    assert init_calls[-1]["address"] is None and os.environ[raysession.WORKER_NICENESS_ENV] == "0"
    assert os.environ[raysession.PREEMPTION_WATCHER_ENV] == "0"
    monkeypatch.setenv(raysession.WORKER_NICENESS_ENV, "5")  # the user's choice wins
    monkeypatch.setenv(raysession.PREEMPTION_WATCHER_ENV, "1")
    raysession.ensure_ray()
    assert os.environ[raysession.WORKER_NICENESS_ENV] == "5" and os.environ[raysession.PREEMPTION_WATCHER_ENV] == "1"


def test_workers_of_a_local_instance_are_not_niced(tmp_path):
    # A real local instance, in its own process (the test session may hold another Ray): its tasks run at
    # niceness 0, not Ray's default 15.
    import os
    import subprocess
    import sys

    code = ("import os, ray; from pipeline import raysession; raysession.ensure_ray(); "
            "print('niceness', ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())); ray.shutdown()")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", raysession.WORKER_NICENESS_ENV)}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    out = subprocess.run([sys.executable, "-c", code], cwd=raysession.PACKAGE_ROOT, env=env, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "niceness 0" in out.stdout, out.stdout


def test_a_submitted_jobs_runtime_env_merges_with_the_drivers(init_calls, monkeypatch):
    # `ray job submit --runtime-env infra/runtime_env.yaml`: Ray hands the job's runtime env to the driver and
    # merges it with ray.init's, refusing any environment variable named by both (issue 21)
    import json
    from pathlib import Path

    import yaml
    from ray._private.worker import _merge_runtime_env

    job_env = yaml.safe_load((Path(raysession.PACKAGE_ROOT) / "infra" / "runtime_env.yaml").read_text())
    assert "PYTHONPATH" in job_env["env_vars"]
    assert _merge_runtime_env(job_env, {"env_vars": raysession.worker_env()}) is None  # what used to happen
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job_env}))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    raysession.ensure_ray()
    ours = init_calls[-1]["runtime_env"]
    assert "PYTHONPATH" not in ours["env_vars"] and "PYTHONWARNINGS" in ours["env_vars"]
    merged = _merge_runtime_env(job_env, ours)
    assert merged is not None and merged["env_vars"]["PYTHONPATH"] == job_env["env_vars"]["PYTHONPATH"]
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")  # no job: our own variables, the package path included
    raysession.ensure_ray()
    assert init_calls[-1]["runtime_env"]["env_vars"]["PYTHONPATH"] == raysession.PACKAGE_ROOT
