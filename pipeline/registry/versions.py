"""A registered version's own artifacts, read through MLflow (the tracking server or store): no access to the
run's storage is needed, so a version outlives its run."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Config
from pipeline.redact import scrub_text
from pipeline.registry import tracking

ARTIFACT_G, ARTIFACT_METADATA, ARTIFACT_GANSPACE = "generator", "metadata", "ganspace"  # the pyfunc's artifacts


def _download(cfg: Config, artifact_uri: str, dst: str) -> Path:
    import mlflow

    tracking.quiet_mlflow()  # also in Ray actors (the benchmark's samplers), which never made a client
    with tracking.activated(cfg):
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=dst))


def version_artifact(cfg: Config, model_uri: str, key: str, dst: str) -> Path:
    """One of a registered version's pyfunc artifacts (``generator`` or ``metadata``), downloaded below ``dst``
    through MLflow (the tracking server or store; no access to the run's storage needed)."""
    from mlflow.exceptions import MlflowException

    try:
        mlmodel = yaml.safe_load(_download(cfg, f"{model_uri}/MLmodel", dst).read_text()) or {}
        rel = mlmodel["flavors"]["python_function"]["artifacts"][key]["path"]
    except MlflowException as exc:
        raise LookupError(scrub_text(f"{model_uri}: cannot read the version's model "
                                     f"({exc.message.splitlines()[0]})")) from None
    except (KeyError, TypeError):
        raise LookupError(f"{model_uri}: the version's model has no {key!r} artifact (not registered by sketchgan: "
                          "`sketchgan train` registers its runs when registry.auto_register is on)") from None
    return _download(cfg, f"{model_uri}/{rel}", dst)


def version_metadata(cfg: Config, model_uri: str) -> dict[str, Any]:
    """The run metadata logged with a registered version (architecture, config, sketch set, lineage)."""
    with tempfile.TemporaryDirectory(prefix="sketchgan-version-") as d:
        return json.loads(version_artifact(cfg, model_uri, ARTIFACT_METADATA, d).read_text())


def load_version_generator(cfg: Config, model_uri: str, arch: dict[str, Any], device=None):
    """A registered version's generator from its own weights (downloaded, loaded, then the download removed)."""
    from pipeline.models import factory

    with tempfile.TemporaryDirectory(prefix="sketchgan-version-") as d:
        return factory.load_generator(str(version_artifact(cfg, model_uri, ARTIFACT_G, d)), arch, device)
