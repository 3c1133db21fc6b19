"""MLflow tracking of finished (or stopped) training runs, read back from storage.

Training never talks to MLflow: it writes the run contract (metrics, sample grids, the final G and its metadata,
see `pipeline.layout`). `log_run` turns those outputs into one MLflow run, so it can
run (or re-run) any time later, against whichever tracking server is configured. Logging is idempotent: the
MLflow run is tagged with the storage run URI and a fingerprint of what was logged, and reused when present.

Where MLflow lives: ``registry.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else an embedded store under a
local storage root (``sqlite:///<root>/mlflow/mlflow.db``, artifacts in ``<root>/mlflow/artifacts``; MLflow 3
uses SQLite as its default backend, and the model registry needs a database store).

Nothing secret is logged: everything logged passes through `pipeline.redact`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from pipeline import layout, storage
from pipeline.config import Config
from pipeline.redact import scrub, scrub_text

log = logging.getLogger("sketchgan.registry")

TAG_RUN_URI = "sketchgan.run_uri"
TAG_FINGERPRINT = "sketchgan.fingerprint"
TAG_LOGGED = "sketchgan.logged"
TAG_KIND = "sketchgan.kind"
PARENT_TAG = "mlflow.parentRunId"

PARAM_MAX = 6000  # MLflow's limit on a param value
TAG_MAX = 5000


class TrackingError(ValueError):
    """MLflow cannot be used as configured; the message says what to set."""


# -- where MLflow lives -------------------------------------------------------------------------------------
def _local_store_dir(cfg: Config) -> Path:
    return Path(layout.mlflow_uri(cfg)).expanduser().absolute()


def tracking_uri(cfg: Config) -> str:
    """``registry.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the embedded SQLite store under the root."""
    if cfg.registry.tracking_uri:
        return cfg.registry.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if storage.is_s3(cfg.storage.root):
        raise TrackingError(
            f"storage.root {cfg.storage.root} is on S3, where MLflow cannot keep an embedded database: run an "
            "MLflow tracking server and set MLFLOW_TRACKING_URI (or registry.tracking_uri) to its URL")
    folder = _local_store_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def _artifact_location(cfg: Config, uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside the embedded store; a server decides for itself."""
    if uri.startswith("sqlite:") and not storage.is_s3(cfg.storage.root):
        return (_local_store_dir(cfg) / "artifacts").as_uri()
    return None


def quiet_mlflow() -> None:
    """MLflow's per-artifact download bars and its INFO notes on logging a model are noise in our output; a
    user's own setting of the bars wins."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow.pyfunc", "mlflow.store.db.utils"):  # "validating input example", "creating tables"
        logging.getLogger(name).setLevel(logging.WARNING)


def client(cfg: Config):
    """An `MlflowClient` for the configured tracking server / store (also the model registry)."""
    import mlflow

    quiet_mlflow()
    uri = tracking_uri(cfg)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def activated(cfg: Config) -> Iterator[str]:
    """Point MLflow's fluent API (``mlflow.pyfunc.log_model``, the registry's model lookups) at our store.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``; both the module state and the environment
    are put back exactly as they were afterwards, so the caller's (or the user's) choice is not overwritten.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    uri = tracking_uri(cfg)
    env_keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {k: os.environ.get(k) for k in env_keys}
    saved = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry_utils._registry_uri = saved[1]
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ensure_experiment(mlf, cfg: Config, name: str | None = None) -> str:
    """The id of the configured experiment, created (with the local artifact folder) when missing."""
    name = name or cfg.registry.experiment
    exp = mlf.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            mlf.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return mlf.create_experiment(name, artifact_location=_artifact_location(cfg, mlf.tracking_uri))
    except Exception:  # created concurrently by another process
        exp = mlf.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"train.lr": "0.002", ...}`` (lists of mappings as JSON)."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list):
        out[prefix] = json.dumps(obj, sort_keys=True, default=str)
    else:
        out[prefix] = "" if obj is None else str(obj)
    return out


# -- reading a run from storage ----------------------------------------------------------------------------
def read_run(run_uri: str) -> dict[str, Any]:
    """What storage holds for a run: metadata (None until finished), run info, metrics rows, sample URIs."""
    finished = layout.finished_run(run_uri)
    info = layout.read_run_info(run_uri)
    if finished is None and info is None:
        raise FileNotFoundError(f"{run_uri} is not a training run (neither {layout.final_metadata_uri('')} nor "
                                f"{layout.RUN_INFO} exists)")
    samples = storage.list_files(layout.samples_uri(run_uri), suffix=".png")
    return {"metadata": finished.metadata if finished else None, "info": info or {},
            "metrics": layout.read_metrics(run_uri), "samples": samples}


def fingerprint(run: dict[str, Any]) -> str:
    """Identifies what a log covers: the final G of a finished run, else how far an unfinished one got."""
    meta = run["metadata"]
    if meta is not None:
        return f"final:{meta.get('g_sha256') or meta.get('finished_at')}"
    last = run["metrics"][-1].get("iteration", len(run["metrics"])) if run["metrics"] else 0
    return f"unfinished:{last}"


def run_tags(run: dict[str, Any], run_uri: str) -> dict[str, str]:
    """Lineage tags of a run (also put on registered model versions)."""
    meta = run["metadata"] or {}
    info = run["info"]
    sketch = meta.get("sketch_set") or info.get("sketch_set") or {}
    config = meta.get("config") or info.get("config") or {}
    tags = {
        TAG_RUN_URI: run_uri,
        TAG_KIND: meta.get("kind") or info.get("kind") or "",
        "sketchgan.run_name": meta.get("run_name") or info.get("run_name") or "",
        "sketchgan.category": meta.get("category") or (config.get("data") or {}).get("category") or "",
        "sketchgan.sketch_set": sketch.get("name") or "",
        "sketchgan.sketch_set_id": sketch.get("id") or "",
        "sketchgan.base_g_sha256": meta.get("base_g_sha256") or "",
        "sketchgan.dataset_manifest": meta.get("dataset_manifest_id") or "",
        "sketchgan.g_sha256": meta.get("g_sha256") or "",
        "sketchgan.finished": "true" if run["metadata"] is not None else "false",
    }
    fid = meta.get("fid")
    if isinstance(fid, int | float) and math.isfinite(fid):
        tags["sketchgan.fid"] = repr(float(fid))
    return {k: scrub_text(str(v))[:TAG_MAX] for k, v in tags.items() if v != ""}


# -- logging ----------------------------------------------------------------------------------------------
def find_logged_run(mlf, experiment_id: str, run_uri: str, fp: str | None = None):
    """The complete MLflow run logged for ``run_uri`` (with fingerprint ``fp`` when given), or None."""
    for r in _runs_for(mlf, experiment_id, run_uri):
        if r.data.tags.get(TAG_LOGGED) == "true" and (fp is None or r.data.tags.get(TAG_FINGERPRINT) == fp):
            return r
    return None


def _runs_for(mlf, experiment_id: str, run_uri: str) -> list:
    if "'" in run_uri:  # not expressible in a filter string: filter here
        runs = mlf.search_runs([experiment_id], max_results=5000)
        return [r for r in runs if r.data.tags.get(TAG_RUN_URI) == run_uri]
    return list(mlf.search_runs([experiment_id], f"tags.`{TAG_RUN_URI}` = '{run_uri}'", max_results=1000))


def _metrics(rows: list[dict]) -> list:
    from mlflow.entities import Metric

    out = []
    now = int(time.time() * 1000)
    for n, row in enumerate(rows):
        step = int(row.get("iteration", n))
        for key, value in row.items():
            if key == "iteration" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                out.append(Metric(key=key, value=float(value), timestamp=now + n, step=step))
    return out


def _log_batches(mlf, run_id: str, params: dict[str, str], metrics: list, tags: dict[str, str]) -> None:
    from mlflow.entities import Param, RunTag

    plist = [Param(k[:250], v[:PARAM_MAX]) for k, v in params.items()]
    for i in range(0, len(plist), 100):
        mlf.log_batch(run_id, params=plist[i:i + 100])
    for i in range(0, len(metrics), 1000):
        mlf.log_batch(run_id, metrics=metrics[i:i + 1000])
    tlist = [RunTag(k, v) for k, v in tags.items()]
    if tlist:
        mlf.log_batch(run_id, tags=tlist)


def log_run(cfg: Config, run_uri: str, parent_run_id: str | None = None) -> str:
    """Log a training run's storage outputs as one MLflow run (idempotent); returns the MLflow run id.

    Params are the run's flattened config; metrics are the run's logged rows with the iteration as step;
    artifacts are the config YAML, the metadata, the sample grids and (for a finished run) the final G.
    A finished run ends FINISHED; one stopped early (e.g. by ASHA) ends KILLED with what it reached.
    """
    run = read_run(run_uri)
    fp = fingerprint(run)
    mlf = client(cfg)
    exp_id = ensure_experiment(mlf, cfg)
    existing = find_logged_run(mlf, exp_id, run_uri, fp)
    if existing is not None:
        if parent_run_id and existing.data.tags.get(PARENT_TAG) != parent_run_id:
            mlf.set_tag(existing.info.run_id, PARENT_TAG, parent_run_id)
        return existing.info.run_id
    # Partial logs (a crash mid-way) and logs of an unfinished state that has since moved on are replaced.
    for stale in _runs_for(mlf, exp_id, run_uri):
        tags = stale.data.tags
        if tags.get(TAG_LOGGED) != "true" or tags.get(TAG_FINGERPRINT, "").startswith("unfinished:"):
            mlf.delete_run(stale.info.run_id)

    meta, info = run["metadata"], run["info"]
    config = scrub((meta or {}).get("config") or info.get("config") or {})
    tags = {**run_tags(run, run_uri), TAG_FINGERPRINT: fp}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    run_name = (meta or info).get("run_name") or run_uri.rstrip("/").rsplit("/", 1)[-1]
    created = mlf.create_run(exp_id, run_name=run_name, tags=tags)
    run_id = created.info.run_id
    try:
        params = flatten(config)
        params["run_uri"] = scrub_text(run_uri)
        _log_batches(mlf, run_id, params, _metrics(run["metrics"]), {})
        with tempfile.TemporaryDirectory(prefix="sketchgan-mlflow-") as tmp:
            d = Path(tmp)
            (d / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            mlf.log_artifact(run_id, str(d / "config.yaml"))
            if meta is not None:
                (d / layout.FINAL_METADATA).write_text(json.dumps(scrub(meta), indent=2, sort_keys=True,
                                                                    default=str))
                mlf.log_artifact(run_id, str(d / layout.FINAL_METADATA))
            if run["metrics"]:
                (d / layout.METRICS).write_text("".join(json.dumps(m) + "\n" for m in run["metrics"]))
                mlf.log_artifact(run_id, str(d / layout.METRICS))
            samples = d / layout.SAMPLES
            samples.mkdir()
            for uri in run["samples"]:
                storage.download_file(uri, samples / uri.rsplit("/", 1)[-1])
            if run["samples"]:
                mlf.log_artifacts(run_id, str(samples), artifact_path=layout.SAMPLES)
            if meta is not None:
                g = storage.download_file(layout.final_uri(run_uri, layout.G_FILE), d / layout.FINAL / layout.G_FILE)
                mlf.log_artifact(run_id, str(g), artifact_path=layout.FINAL)
        mlf.set_tag(run_id, TAG_LOGGED, "true")
    except Exception:
        mlf.set_terminated(run_id, status="FAILED")
        raise
    mlf.set_terminated(run_id, status="FINISHED" if meta is not None else "KILLED")
    log.info("logged %s to MLflow run %s", run_uri, run_id)
    return run_id
