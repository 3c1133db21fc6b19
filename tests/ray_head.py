"""A real Ray head on loopback (`ray start --head --block`) with token authentication on, and extra nodes that
join it (`ray start --address ... --block`): a multi-node cluster on one machine."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from s3_endpoint import free_port

VENV_BIN = str(Path(sys.executable).parent)


class RayHead:
    """Started in its own process group so that stopping it ends exactly the processes it started."""

    def __init__(self, workdir: Path, num_cpus: int = 2, env: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.token_path = self.workdir / "ray_auth_token"
        self.dashboard_port = free_port()
        self.gcs_port = free_port()
        self.num_cpus = num_cpus
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None
        self.temp_dir = tempfile.mkdtemp(prefix="rh-")
        # Ray replaces 127.0.0.1 by the machine's outward address (it expects other machines to reach it), but
        # takes the rest of 127/8 as it is: the head and each extra node get their own loopback address
        self.node_ip = "127.0.0.2"
        self.nodes: list[RayNode] = []

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self, with_token: bool = True) -> dict[str, str]:
        """Environment for `ray job submit`: the venv first on PATH, and the cluster's token (or none)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
        env["HOME"] = str(self.workdir / "home")  # keep ~/.ray/auth_token out of the picture
        if with_token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path))
        return env

    def start(self, timeout: float = 120) -> RayHead:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "home").mkdir(exist_ok=True)
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        env = {**self.client_env(), **self.extra_env, "RAY_USAGE_STATS_ENABLED": "0",
               # a throwaway test cluster: stop at once on SIGTERM instead of draining for 30 s
               "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        cmd = [f"{VENV_BIN}/ray", "start", "--head", "--block", f"--node-ip-address={self.node_ip}",
               f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--num-cpus={self.num_cpus}", "--include-dashboard=true", "--disable-usage-stats",
               # its own temp dir (short: socket paths are length-limited), so it never records itself as
               # the machine's current cluster for later ray.init() calls to find
               f"--temp-dir={self.temp_dir}",
               # every port explicit: other Ray instances on the machine must not collide with this one
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               f"--ray-client-server-port={free_port()}", f"--node-manager-port={free_port()}",
               f"--object-manager-port={free_port()}"]
        self.log = open(self.workdir / "ray-head.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.workdir)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray head exited: {(self.workdir / 'ray-head.log').read_text()[-2000:]}")
            try:
                req = urllib.request.Request(f"{self.address}/api/version",
                                             headers={"Authorization": f"Bearer {self.token_path.read_text()}"})
                with urllib.request.urlopen(req, timeout=2):
                    return self
            except OSError:
                time.sleep(1)
        self.stop()
        raise RuntimeError("ray head did not become ready")

    def submit(self, args: list[str], cwd: Path, with_token: bool = True, timeout: float = 900,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        cmd = [f"{VENV_BIN}/ray", "job", "submit", "--address", self.address, *args]
        deadline = time.time() + 120
        while True:
            proc = subprocess.run(cmd, cwd=cwd, env={**self.client_env(with_token), **(env or {})},
                                  capture_output=True, text=True, timeout=timeout)
            # the head's job agent starts a little after the dashboard answers
            if "No available agent" not in proc.stderr or time.time() > deadline:
                return proc
            time.sleep(3)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc = None
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def api(self, path: str) -> dict:
        """GET a dashboard endpoint (e.g. the state API's ``/api/v0/nodes``) with the cluster's token."""
        req = urllib.request.Request(f"{self.address}{path}",
                                     headers={"Authorization": f"Bearer {self.token_path.read_text()}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def alive_nodes(self) -> list[dict]:
        data = self.api("/api/v0/nodes?limit=100&detail=1")["data"]["result"]["result"]
        return [n for n in data if n["state"] == "ALIVE"]

    def head_node_id(self) -> str:
        return next(n["node_id"] for n in self.alive_nodes() if n["is_head_node"])


class RayNode:
    """A second Ray node joining ``head`` from its own process group, with its own ports and resources;
    `kill()` ends it abruptly (SIGKILL to the group), as a lost machine would."""

    def __init__(self, head: RayHead, num_cpus: int = 1, env: dict[str, str] | None = None):
        self.head, self.num_cpus, self.extra_env = head, num_cpus, env or {}
        self.proc: subprocess.Popen | None = None
        self.node_id: str | None = None
        self.node_ip = f"127.0.0.{3 + len(head.nodes)}"
        head.nodes.append(self)
        # its own temp dir, as on another machine: sharing the head's would share its runtime-env folders too
        self.temp_dir = tempfile.mkdtemp(prefix="rn-")

    def start(self, timeout: float = 120) -> RayNode:
        deadline = time.time() + timeout
        while not (before := {n["node_id"] for n in self.head.alive_nodes()}) and time.time() < deadline:
            time.sleep(1)  # the head lists itself a moment after its dashboard answers
        env = {**self.head.client_env(), **self.extra_env, "RAY_USAGE_STATS_ENABLED": "0"}
        cmd = [f"{VENV_BIN}/ray", "start", "--block", f"--address={self.head.node_ip}:{self.head.gcs_port}",
               f"--node-ip-address={self.node_ip}", f"--num-cpus={self.num_cpus}", "--disable-usage-stats",
               f"--temp-dir={self.temp_dir}",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]
        self.log = open(self.head.workdir / f"ray-node-{len(before)}.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.head.workdir)
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray node exited: {Path(self.log.name).read_text()[-2000:]}")
            new = [n["node_id"] for n in self.head.alive_nodes() if n["node_id"] not in before]
            if new:
                self.node_id = new[0]
                return self
            time.sleep(1)
        self.kill()
        raise RuntimeError("ray node did not join the head")

    def kill(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
