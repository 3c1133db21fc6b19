"""A real `sketchgan studio` process for tests, on a root holding a tiny real-image dataset, with the committed
toy base: started in its own process group, stopped by it (with the Ray instance it may have started)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from s3_endpoint import free_port
from tiny_data import write_pairs_dataset

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)

# the committed base's architecture (configs/shapes.yaml); a customisation of a few dozen iterations
STUDIO_CONFIG = {
    "data": {"category": "shapes", "size": 32},
    "model": {"size": 32, "style_dim": 64, "n_mlp": 2, "channel_max": 32, "lr_mlp": 0.01},
    "train": {"iterations": 20, "batch_size": 4, "lr": 0.002, "checkpoint_every": 10, "sample_every": 5,
              "log_every": 5},
    "eval": {"feature_extractor": "randconv"},
}


def write_studio_root(workdir: Path) -> Path:
    """A config file whose root holds the real images training needs (D_X); returns the config's path."""
    root = workdir / "root"
    write_pairs_dataset(str(root / "datasets" / "shapes"), n=48)
    config = workdir / "studio.yaml"
    config.write_text(yaml.safe_dump({"storage": {"root": str(root)}, **STUDIO_CONFIG}))
    return config


class StudioServer:
    def __init__(self, workdir: Path, config: Path, args: list[str] | None = None,
                 env: dict[str, str] | None = None):
        self.workdir, self.config = Path(workdir), config
        self.port = free_port()
        self.args, self.env = list(args or []), dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "studio.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> StudioServer:
        env = {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""), **self.env}
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([f"{VENV_BIN}/sketchgan", "studio", "--config", str(self.config), "--port",
                                      str(self.port), *self.args], cwd=REPO, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"studio exited: {self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/info", timeout=2):
                    return self
            except urllib.error.HTTPError:
                return self  # it answers (with a token required, say)
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("the studio did not start")

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 300,
                headers: dict | None = None) -> tuple[int, dict | bytes]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"content-type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                code, raw, kind = resp.status, resp.read(), resp.headers.get("content-type", "")
        except urllib.error.HTTPError as exc:
            code, raw, kind = exc.code, exc.read(), exc.headers.get("content-type", "")
        return code, json.loads(raw) if "json" in kind else raw

    def wait_run(self, run_id: str, states=("SUCCEEDED", "FAILED", "STOPPED"), timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            code, run = self.request("GET", f"/api/runs/{run_id}")
            assert code == 200, run
            if run["status"] in states:
                return run
            time.sleep(1)
        log = self.log_path.read_text()[-3000:]
        raise AssertionError(f"run {run_id} still {run['status']} after {timeout}s:\n{log}")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # uvicorn stops; the Ray instance it started goes with it
            self.proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of the group is left
        except ProcessLookupError:
            pass
        self.proc = None
        self.log.close()
