"""One way for every stage to get a Ray connection.

Inside a submitted job (``RAY_ADDRESS`` set) the job's cluster is used; on a laptop, a cluster started
with ``ray start`` on this machine is joined, else a local instance is started. A stale record of a
``ray start`` cluster that is no longer running (left by a killed head) would make ``ray.init()`` wait for
it for minutes: that case starts a local instance instead, and says so.

A local instance started here runs its workers at normal priority: Ray's default (niceness 15) lets any
other busy process on the machine, Ray's own included, take the CPU from training and preprocessing. Its Ray
Train runs also go without the preemption watcher, an extra actor process per run that watches for cloud nodes
being reclaimed, which a single machine has none of (clusters keep it).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

log = logging.getLogger("sketchgan.ray")

PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


def _recorded_cluster() -> str | None:
    try:
        from ray._private.utils import read_ray_address  # what the last `ray start` here recorded
    except ImportError:
        return None
    try:
        return read_ray_address()
    except OSError:
        return None


def _reachable(address: str, timeout: float = 2.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


WORKER_NICENESS_ENV = "RAY_worker_niceness"
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Ray Train passes it from driver to controller
COLOR_PREFIX_ENV = "RAY_COLOR_PREFIX"  # "0": the driver prints workers' lines without colour codes


def local_instance_settings() -> None:
    """Settings for a Ray instance this process starts on one machine (an explicit setting wins): workers at
    niceness 0, and Ray Train runs without a preemption watcher."""
    os.environ.setdefault(WORKER_NICENESS_ENV, "0")
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")


# Ray Train's own DatasetManager builds Ray Data options through a deprecated setter and warns about it in every
# run (ray/train/_internal/data_config.py; nothing a user can change): this one message is ignored in Ray's
# worker processes, by its text (a -W filter cannot name Ray's warning class, which Python would import first).
RAY_INTERNAL_DEPRECATION = "ignore:`ExecutionOptions.exclude_resources` is deprecated:DeprecationWarning"


def worker_env() -> dict[str, str]:
    """Environment variables of this package's Ray workers: the package importable, Ray's own noise off."""
    warnings = ",".join(w for w in (os.environ.get("PYTHONWARNINGS"), RAY_INTERNAL_DEPRECATION) if w)
    return {"PYTHONPATH": PACKAGE_ROOT, "PYTHONWARNINGS": warnings}


def job_env_vars() -> dict[str, str]:
    """The environment variables of the submitted job's runtime env (`ray job submit --runtime-env`), if any."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job manager for the job's driver
    if not raw:
        return {}
    try:
        env = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in env.items()} if isinstance(env, dict) else {}


def driver_runtime_env() -> dict | None:
    """What `ray.init` adds to the runtime env: our worker variables, minus those a submitted job already sets.

    Ray refuses to start a job's driver whose `ray.init` names an environment variable the job's runtime env
    names too; the job's value wins here (its working_dir and PYTHONPATH make the package importable).
    """
    taken = job_env_vars()
    ours = {k: v for k, v in worker_env().items() if k not in taken}
    return {"env_vars": ours} if ours else None


_dashboard_url: str | None = None  # of the Ray this process connected to (its Jobs API)


def ensure_ray() -> str | None:
    """Connect to (or start) Ray once per process; workers can import this package. Returns the dashboard's
    URL (the Jobs API), when Ray reports one."""
    global _dashboard_url
    import ray

    if ray.is_initialized():
        return _dashboard_url
    address = os.environ.get("RAY_ADDRESS") or None
    if address is None:
        recorded = _recorded_cluster()
        if recorded and not _reachable(recorded):
            log.warning("the Ray cluster recorded by an earlier `ray start` (%s) is not running: starting a "
                        "local Ray instance instead", recorded)
            address = "local"
    if address in (None, "local"):  # None starts a local instance when there is no cluster to join
        local_instance_settings()
    if not sys.stdout.isatty():
        os.environ.setdefault(COLOR_PREFIX_ENV, "0")  # worker lines forwarded to a file or pipe: no ANSI codes
    # Ray's start-up line carries ANSI colour codes whatever the output, and its token warning only says how to
    # turn authentication off: one plain line of ours instead
    quiet = [logging.getLogger(n) for n in ("ray._private.worker",
                                            "ray._private.authentication.authentication_token_setup")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.WARNING if q.name.endswith("worker") else logging.ERROR)
    try:
        context = ray.init(address=address, runtime_env=driver_runtime_env())
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    dashboard = getattr(context, "dashboard_url", None)
    if dashboard:
        _dashboard_url = dashboard if "://" in dashboard else f"http://{dashboard}"
    log.info("Ray: %s%s", "started a local instance" if address in (None, "local") else f"connected to {address}",
             f" (dashboard {_dashboard_url})" if dashboard else "")
    quiet_ray_data(sys.stdout.isatty())
    return _dashboard_url


def quiet_ray_data(interactive: bool) -> None:
    """Ray Data on the driver: its own progress bars on a terminal; elsewhere none of its periodic progress
    log (dozens of lines per small dataset; each stage prints its own summary line), and no INFO line per
    execution (plan, start, finish) either way."""
    import ray.data

    if not interactive:
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    for name in ("ray.data._internal.execution.streaming_executor", "ray.data.dataset"):
        logging.getLogger(name).setLevel(logging.WARNING)
