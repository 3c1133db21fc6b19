"""A real `mlflow server` process on loopback for tests: SQLite (or any) backend store, artifacts proxied to S3.

The server stores run/registry data in a SQLite file unless given another backend store URI (PostgreSQL in
tests/test_mlflow_production.py) and serves artifacts itself (``mlflow-artifacts:/``), writing them to
``s3://<bucket>/<prefix>`` on the loopback S3 endpoint; clients need only the HTTP URL. ``extra_args`` and
``extra_env`` turn on what production runs (``--allowed-hosts``, ``--app-name basic-auth``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """Start with `start()`, stop with `stop()`; `url` is the tracking URI, `artifacts` the S3 destination."""

    def __init__(self, workdir: Path, s3_env: dict[str, str], bucket: str, prefix: str = "mlartifacts",
                 backend_store_uri: str | None = None, extra_args: list[str] | None = None,
                 extra_env: dict[str, str] | None = None, port: int | None = None):
        self.workdir = Path(workdir)
        self.port = port or _free_port()
        self.artifacts = f"s3://{bucket}/{prefix}"
        self.db = self.workdir / "mlflow.db"
        self.backend_store_uri = backend_store_uri or f"sqlite:///{self.db}"
        self.log = self.workdir / "server.log"
        self.env = dict(s3_env)
        self.extra_args, self.extra_env = list(extra_args or []), dict(extra_env or {})
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> MlflowServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env, **self.extra_env}
        # The server (not the client) talks to S3: point boto3 inside it at the loopback endpoint.
        env["MLFLOW_S3_ENDPOINT_URL"] = self.env["AWS_ENDPOINT_URL"]
        env.pop("MLFLOW_TRACKING_URI", None)
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", self.backend_store_uri,
               "--artifacts-destination", self.artifacts, "--serve-artifacts", *self.extra_args]
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self.log.read_text()[-3000:]
                raise RuntimeError(f"mlflow server exited with {self._proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not become healthy in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        # The server runs workers in its own session: signal the whole group we started.
        try:
            os.killpg(proc.pid, 15)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=5)
