"""Fixtures shared by all tests: a loopback S3 endpoint for the session and a local Ray per module."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from s3_endpoint import S3Endpoint  # noqa: E402

# Keep tests off the user's real AWS account and MLflow server whatever the environment says.
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
    os.environ.pop(_var, None)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1, with the environment pointing boto3 and pyarrow at it."""
    endpoint = S3Endpoint().start()
    saved = {k: os.environ.get(k) for k in endpoint.env}
    os.environ.update(endpoint.env)
    yield endpoint
    endpoint.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket on the loopback endpoint."""
    return s3_endpoint.new_bucket()


@pytest.fixture(scope="module")
def ray_local(s3_endpoint):
    """A local Ray instance with 2 CPUs for the module (started after S3 so workers inherit its env)."""
    import ray

    from pipeline.raysession import local_instance_settings

    if ray.is_initialized():
        ray.shutdown()
    local_instance_settings()  # as `sketchgan` starts a local instance for users
    # address="local": never attach to a cluster another test (or the user) left behind in /tmp/ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def mlflow_server(s3_endpoint, tmp_path_factory):
    """A real `mlflow server` process on loopback for the module: SQLite backend store, artifacts proxied to a
    fresh bucket on the loopback S3 endpoint."""
    from mlflow_server import MlflowServer

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no internet here: do not try to phone home
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), s3_endpoint.env,
                          s3_endpoint.new_bucket("mlflow")).start()
    yield server
    server.stop()
