"""Customisations launched from the studio: one Ray job per run, running `sketchgan train` (the same command,
the same code) on one sketch set, on the local Ray instance the studio starts or on a cluster's Jobs API (token
auth from RAY_AUTH_* as for `ray job submit`).

A run's settings travel as ``--set`` overrides of the studio's config, so the job needs no file of ours; its
progress is read from the run's own folder (its metrics and sample grids, as `pipeline.layout` names them) and
its state from the Jobs API, so a restarted studio finds its runs again (the jobs its metadata marks).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shlex
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from pipeline import layout
from pipeline.config import Config, ConfigError, load_config
from pipeline.names import validate_name
from pipeline.redact import scrub_text

log = logging.getLogger("sketchgan.studio")

STUDIO_MARK = "sketchgan_studio"  # job metadata key marking the studio's jobs
ACTIVE = ("PENDING", "RUNNING")
MAX_ITERATIONS = 1_000_000


class RunRequestError(ValueError):
    """A launch the studio refuses (unknown set, bad setting, too many runs); shown on the page."""


@dataclass
class RunRequest:
    """What the page's customise form sends: the paper's defaults unless changed."""

    sketch_set: str
    iterations: int
    lambda_image: float
    augment: str
    base: str = "base"


def run_config(cfg: Config, req: RunRequest, run_id: str) -> Config:
    """The studio's config narrowed to one run: the sketch set (its spec from the config when it names it, for
    a target class or an evaluation set), the form's settings, a run name of its own."""
    validate_name(req.sketch_set, "sketch set name")
    if not 1 <= req.iterations <= MAX_ITERATIONS:
        raise RunRequestError(f"iterations must be between 1 and {MAX_ITERATIONS:,}, got {req.iterations}")
    if req.base != "base":
        raise RunRequestError(f"unknown base {req.base!r}: this studio customises its config's model.base_g "
                              "(choose 'base')")
    if not cfg.model.base_g:
        raise RunRequestError("the studio's config has no model.base_g: start it with a config that names the "
                              "base generator to customise")
    dataset = cfg.data.dataset or layout.dataset_uri(cfg)
    try:
        layout.open_dataset(dataset)  # D_X's real images: say so now rather than in a failed job
    except layout.DatasetError as exc:
        raise RunRequestError(f"{exc} (the real images of {cfg.data.category!r} that keep the model on its "
                              "category: run `make demo` or `sketchgan preprocess` first)") from None
    uri = layout.sketchset_uri(cfg, req.sketch_set)
    if not layout.sketch_set_exists(uri):
        raise RunRequestError(f"no sketch set named {req.sketch_set!r} (looked in {uri}): save it first")
    known = {s.name: s for s in cfg.train.sketch_sets}
    spec = known[req.sketch_set].model_dump(mode="json") if req.sketch_set in known else {"name": req.sketch_set}
    spec.update(uri=uri, from_dir=None, from_ids=None)
    data = cfg.model_dump(mode="json")
    data["train"].update(sketch_sets=[spec], iterations=req.iterations, lambda_image=req.lambda_image,
                         augment=req.augment, run_prefix=f"studio-{run_id}", resume=None, num_workers=1,
                         max_concurrent_runs=1, cpus_per_worker=cfg.studio.run_cpus)
    try:
        return Config.model_validate(data)
    except Exception as exc:  # pydantic's message names the field (train.augment: ...)
        raise RunRequestError(f"invalid settings: {exc}") from None


def override_args(cfg: Config) -> list[str]:
    """``--set section.key=JSON`` for every value that differs from the defaults (the studio section aside)."""
    args = []
    for section, values in cfg.model_dump(mode="json", exclude_defaults=True).items():
        if section == "studio":
            continue
        for key, value in values.items():
            args += ["--set", f"{section}.{key}={json.dumps(value)}"]
    # what the job will load must be what we meant: the overrides alone rebuild this config
    rebuilt = load_config(None, [a for a in args if a != "--set"])
    if rebuilt.model_dump(exclude={"studio"}) != cfg.model_dump(exclude={"studio"}):
        raise ConfigError("the run's settings do not survive as --set overrides")
    return args


def status_of(job) -> str:
    """A job's status as a plain string (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    return getattr(job.status, "value", str(job.status))


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def submit_with_retry(client, timeout: float = 60.0, **job) -> None:
    """Submit, waiting while a just-started Ray has no job agent up yet (the dashboard answers first)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.submit_job(**job)
            return
        except (RuntimeError, OSError) as exc:  # OSError: the dashboard dropped the connection
            if (isinstance(exc, RuntimeError) and "No available agent" not in str(exc)) or \
                    time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def with_retry(call, *args, timeout: float = 20.0, **kwargs):
    """A Jobs API call, retried while the dashboard drops connections (it does under load on small machines)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call(*args, **kwargs)
        except OSError:  # requests' ConnectionError is one
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


class Runs:
    """The studio's runs, as Ray jobs."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._client = None
        self._lock = threading.Lock()
        self._launch_lock = threading.Lock()
        self._errors: dict[str, str] = {}  # failed runs' error text, read once from their logs

    def client(self):
        """The Jobs API client; the local Ray instance is started on first use when no cluster is configured."""
        with self._lock:
            if self._client is None:
                from ray.job_submission import JobSubmissionClient

                address = self.cfg.studio.ray_address
                if address is None:
                    from pipeline.raysession import ensure_ray

                    address = ensure_ray()
                    if not address:
                        raise RuntimeError("the local Ray instance has no dashboard (its Jobs API): install "
                                           "ray[default]")
                self._client = JobSubmissionClient(address)
            return self._client

    def runtime_env(self) -> dict[str, Any]:
        """Local jobs import the package from here; cluster jobs take the configured runtime env (working_dir)."""
        from pipeline import raysession, storage

        if self.cfg.studio.ray_address is None:
            return {"env_vars": raysession.worker_env()}
        if not self.cfg.studio.runtime_env:
            return {}
        import yaml

        env = yaml.safe_load(storage.read_text(self.cfg.studio.runtime_env)) or {}
        if not isinstance(env, dict):
            raise RunRequestError(f"studio.runtime_env {self.cfg.studio.runtime_env}: not a mapping")
        wd = env.get("working_dir")
        if isinstance(wd, str) and "://" not in wd and not os.path.isabs(wd):
            # the code to ship is this package's checkout, wherever the studio was started from
            env["working_dir"] = os.path.normpath(os.path.join(raysession.PACKAGE_ROOT, wd))
        return env

    def check_reachable_storage(self) -> None:
        """A cluster elsewhere cannot read this machine's folders: refuse a local root (or base) then."""
        address = self.cfg.studio.ray_address
        if address is None:
            return
        host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
        if host in ("127.0.0.1", "localhost", "::1"):
            return  # a head on this machine shares its disk
        local = [f"{k}={v}" for k, v in (("storage.root", self.cfg.storage.root), ("model.base_g",
                 self.cfg.model.base_g)) if v and "://" not in v]
        if local:
            raise RunRequestError(f"runs go to the cluster at {address}, which cannot read this machine's "
                                  f"folders ({', '.join(local)}): use s3:// locations")

    def launch(self, req: RunRequest) -> dict[str, Any]:
        """Submit one run; returns its description. Concurrent launches get distinct runs."""
        run_id = new_run_id()
        self.check_reachable_storage()
        cfg = run_config(self.cfg, req, run_id)
        run_uri = layout.run_uri(cfg, f"studio-{run_id}-{req.sketch_set}")
        # a local job runs with this interpreter (a venv need not be on PATH); a cluster's job with its own
        python = sys.executable if self.cfg.studio.ray_address is None else "python"
        entrypoint = shlex.join([python, "-m", "pipeline", "train", *override_args(cfg)])
        metadata = {STUDIO_MARK: "1", "run_id": run_id, "sketch_set": req.sketch_set, "base": req.base,
                    "iterations": str(req.iterations), "lambda_image": str(req.lambda_image),
                    "augment": req.augment, "run_uri": run_uri,
                    "sketchset_uri": cfg.train.sketch_sets[0].uri or "",
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        client = self.client()
        with self._launch_lock:  # the count and the submission together: two browsers cannot both pass the cap
            active = [j for j in self._jobs(client) if status_of(j) in ACTIVE]
            if len(active) >= self.cfg.studio.max_active_runs:
                raise RunRequestError(f"{len(active)} runs are already pending or running (studio.max_active_runs"
                                      f" = {self.cfg.studio.max_active_runs}): wait for one or cancel one")
            submit_with_retry(client, entrypoint=entrypoint, submission_id=f"studio-{run_id}",
                              runtime_env=self.runtime_env(), metadata=metadata)
        log.info("studio: launched run %s on sketch set %s (%d iterations)", run_id, req.sketch_set, req.iterations)
        return self.describe(with_retry(client.get_job_info, f"studio-{run_id}"))

    def _jobs(self, client) -> list:
        return [j for j in with_retry(client.list_jobs) if (j.metadata or {}).get(STUDIO_MARK) == "1"]

    def active_on(self, sketch_set: str) -> list[str]:
        """Ids of the pending or running runs that train on ``sketch_set`` (its replacement must wait)."""
        if self._client is None and self.cfg.studio.ray_address is None:
            return []  # no local Ray started yet: no run of this studio exists (and none is started to ask)
        return [(j.metadata or {}).get("run_id", j.submission_id) for j in self._jobs(self.client())
                if (j.metadata or {}).get("sketch_set") == sketch_set
                and status_of(j) in ACTIVE]

    def list(self) -> list[dict[str, Any]]:
        """Every studio run, newest first."""
        jobs = self._jobs(self.client())
        return sorted((self.describe(j) for j in jobs), key=lambda r: r["created"], reverse=True)

    def job(self, run_id: str):
        validate_name(run_id, "run id")
        client = self.client()
        try:
            info = with_retry(client.get_job_info, f"studio-{run_id}")
        except RuntimeError as exc:
            if "does not exist" not in str(exc) and "404" not in str(exc):
                raise  # the Jobs API failing is not "no such run"
            info = None
        if info is None or (info.metadata or {}).get(STUDIO_MARK) != "1":
            raise LookupError(f"no studio run {run_id!r}")
        return info

    def get(self, run_id: str) -> dict[str, Any]:
        return self.describe(self.job(run_id))

    def cancel(self, run_id: str) -> dict[str, Any]:
        info = self.job(run_id)
        if status_of(info) in ACTIVE:
            with_retry(self.client().stop_job, f"studio-{run_id}")
        return self.get(run_id)

    def error_text(self, submission_id: str, message: str | None) -> str:
        """Why a run failed: our command's own error lines from the job's log, else its end; secrets masked."""
        if submission_id not in self._errors:
            try:
                logs = with_retry(self.client().get_job_logs, submission_id)
            except Exception:  # noqa: BLE001 - the status message still says something
                logs = ""
            lines = [ln for ln in logs.splitlines() if ln.strip()]
            ours = [ln for ln in lines if "error:" in ln or "Error:" in ln]
            text = "\n".join(ours[-5:] if ours else lines[-15:]) or (message or "the job failed")
            self._errors[submission_id] = scrub_text(text)[-4000:]
        return self._errors[submission_id]

    def describe(self, info) -> dict[str, Any]:
        """A run as the page shows it: status, progress from its metrics, ETA, latest losses and sample."""
        md = dict(info.metadata or {})
        status = status_of(info)
        run_uri = md.get("run_uri", "")
        iterations = int(md.get("iterations", "0") or 0)
        try:
            rows = layout.read_metrics(run_uri) if run_uri else []
        except ValueError as exc:  # one unreadable metrics file must not hide every other run
            log.warning("studio: %s", exc)
            rows = []
        last = rows[-1] if rows else {}
        iteration = int(last.get("iteration", 0))
        speed = float(last.get("it_per_s") or 0)
        running = status == "RUNNING" and iteration < iterations  # the last iteration done: publishing
        eta = (iterations - iteration) / speed if running and speed > 0 else None
        samples = layout.sample_iterations(run_uri) if run_uri else []
        finished = status == "SUCCEEDED" and layout.finished_run(run_uri) is not None
        return {
            "id": md.get("run_id", info.submission_id), "sketch_set": md.get("sketch_set"), "base": md.get("base"),
            "settings": {k: md.get(k) for k in ("iterations", "lambda_image", "augment")},
            "status": status, "iteration": iteration if not finished else iterations, "iterations": iterations,
            "eta_seconds": None if eta is None else round(eta, 1),
            "losses": {k: v for k, v in last.items() if k.startswith("loss")},
            "sample_iteration": samples[-1] if samples else None,
            "error": self.error_text(info.submission_id, info.message) if status == "FAILED" else None,
            "created": md.get("created", ""), "model": run_uri if finished else None, "run_uri": run_uri,
            "sketchset_uri": md.get("sketchset_uri"),
        }
