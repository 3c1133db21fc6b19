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
