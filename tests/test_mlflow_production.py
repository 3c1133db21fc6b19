"""MLflow as production runs it (issue 21): a real `mlflow server` with a PostgreSQL backend store (Debian's
PostgreSQL, started here on loopback), artifacts on the loopback S3 endpoint, `--allowed-hosts` and basic
authentication on. The pipeline logs and registers with credentials from the environment and never prints them;
a client without credentials is refused; infra/mlflow/deployment.yaml runs the same server command."""

from __future__ import annotations

import logging
import secrets
import urllib.error
import urllib.request
import uuid
from base64 import b64encode
from pathlib import Path

import pytest
from overrides import with_overrides
from postgres_server import PostgresServer
from test_registry import make_run

from pipeline.config import Config

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]


def _get(url: str, host: str | None = None, auth: tuple[str, str] | None = None) -> int:
    req = urllib.request.Request(url)
    if host:
        req.add_header("Host", host)
    if auth:
        req.add_header("Authorization", "Basic " + b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture(scope="module")
def production_mlflow(s3_endpoint, tmp_path_factory):
    """PostgreSQL (a store database and an auth database) and `mlflow server --app-name basic-auth` on it."""
    from mlflow_server import MlflowServer
    from s3_endpoint import free_port

    pg = PostgresServer().start()
    server = None
    try:
        store, auth_db = pg.create_database("mlflow"), pg.create_database("mlflow_auth")
        work = tmp_path_factory.mktemp("mlflow-prod")
        ini = work / "auth.ini"
        ini.write_text("[mlflow]\ndefault_permission = READ\n"
                       f"database_uri = {auth_db}\nadmin_username = admin\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        admin_password = secrets.token_hex(12)
        port = free_port()
        server = MlflowServer(
            work, s3_endpoint.env, s3_endpoint.new_bucket("mlflow-prod"), backend_store_uri=store, port=port,
            extra_args=["--app-name", "basic-auth", "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"],
            extra_env={"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
                       "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}).start()
        yield pg, server, ("admin", admin_password)
    finally:
        if server is not None:
            server.stop()
        pg.stop()


def test_server_on_postgres_with_auth_and_allowed_hosts(production_mlflow, s3_bucket, monkeypatch, capsys, caplog):
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    from pipeline.registry import mlflow_registry, tracking

    pg, server, admin = production_mlflow
    # the admin creates the pipeline's own user (its credentials reach the pipeline through the environment only)
    user, password = f"pipeline-{uuid.uuid4().hex[:6]}", secrets.token_hex(16)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin[1])
    AuthServiceClient(server.url).create_user(user, password)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)

    cfg = with_overrides(Config(), [f"storage.root=s3://{s3_bucket}/root", f"registry.tracking_uri={server.url}"])
    sketch_set = f"s{uuid.uuid4().hex[:6]}"
    run = make_run(cfg, "prod", sketch_set, fid=4.5, seed=2)
    with caplog.at_level(logging.DEBUG):
        lines = mlflow_registry.track_runs(cfg, [run], register=True)
        resolved = mlflow_registry.resolve_model(f"models:/sketchgan-cat-{sketch_set}@champion", cfg)
        assert resolved.load_generator(cfg, "cpu") is not None  # the version's weights, through the server
    assert lines == [f"{run}: registered as models:/sketchgan-cat-{sketch_set}/1"], lines
    out = capsys.readouterr()
    for text in (out.out, out.err, caplog.text):
        assert password not in text and admin[1] not in text
    mlf = tracking.client(cfg)
    logged = mlf.get_run(mlf.get_model_version(f"sketchgan-cat-{sketch_set}", "1").run_id)
    assert password not in repr(logged.data.params) + repr(logged.data.tags)

    # the data lives in PostgreSQL
    assert f"sketchgan-cat-{sketch_set}" in pg.query("mlflow", "SELECT name FROM registered_models")
    assert user in pg.query("mlflow_auth", "SELECT username FROM users")

    # without credentials, or with wrong ones, the server refuses; with them it answers
    api = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _get(api) == 401
    assert _get(api, auth=(user, "wrong")) == 401
    assert _get(api, auth=(user, password)) == 200
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
        tracking.client(cfg).search_experiments(max_results=1)
    # a Host header outside --allowed-hosts is refused even with credentials (DNS rebinding)
    assert _get(api, host=f"attacker.example:{server.port}", auth=(user, password)) == 403
    assert _get(api, host=f"localhost:{server.port}", auth=(user, password)) == 200


def test_deployment_runs_the_tested_server_command():
    """infra/mlflow/deployment.yaml: PostgreSQL driver installed, allowed hosts, basic auth from a secret."""
    import yaml

    docs = [d for d in yaml.safe_load_all((REPO / "infra" / "mlflow" / "deployment.yaml").read_text()) if d]
    mlflow = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "sketchgan-mlflow")
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(container.get("command", []) + container.get("args", []))
    assert "--app-name basic-auth" in command and "--allowed-hosts" in command and "sketchgan-mlflow:5000" in command
    assert "--backend-store-uri" in command and "--artifacts-destination s3://" in command
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"]
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].endswith(".ini")
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"]  # CSRF key of the auth app
    assert '".[server]"' in (REPO / "infra" / "Dockerfile").read_text()  # the image has the PostgreSQL driver
