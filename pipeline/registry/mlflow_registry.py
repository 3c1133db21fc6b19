"""The MLflow model registry of customised GANs: one registered model per (category, sketch set).

`register_run` turns a finished GANSketching run (read from storage) into a new version of
``<prefix>-<category>-<sketch set>``, logged as a pyfunc (see `pyfunc_model`) with lineage tags; registering the
same run again returns the existing version. The pyfunc is logged from code (`pyfunc_entry`, no pickled
object) with its own copy of the `pipeline` package, the weights and the run's metadata: a version is
self-contained, and every consumer here (`generate`, the benchmark) reads its weights from the version's own
artifacts through MLflow, never from the run's storage (which may be gone).
The alias ``champion`` (``registry.champion_alias``) points at the version with the lowest FID and moves only
when another version is strictly better; while no version has an FID it follows the latest version.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import layout, storage
from pipeline.config import Config
from pipeline.names import validate_name
from pipeline.redact import scrub, scrub_text
from pipeline.registry import tracking
from pipeline.registry.versions import (
    ARTIFACT_G,
    ARTIFACT_GANSPACE,
    ARTIFACT_METADATA,
    load_version_generator,
    version_metadata,
)

log = logging.getLogger("sketchgan.registry")

TAG_FID = "fid"  # the benchmark's, on the test part of the evaluation set
TAG_FID_VALIDATION = "fid_validation"  # training's, on the validation part, of the registered generator
BENCHMARK_TAGS = ("precision", "recall", "ppl", "sketch_fidelity")  # set by the benchmark beside the FID
TAG_G_URI = "sketchgan.g_uri"
TAG_ARCH = "sketchgan.arch"
TAG_CONFIG = "sketchgan.config"
MODEL_ARTIFACT = "model"


@dataclass
class ResolvedModel:
    """A model reference resolved to weights: registry version, run or checkpoint."""

    name: str
    version: str  # registry version ("" for a run or checkpoint)
    run_uri: str | None  # a registered version's: lineage only (its weights are the version's own)
    g_uri: str | None  # the weights of a run or checkpoint; None for a registered version
    arch: dict[str, Any] | None
    metadata: dict[str, Any] = field(default_factory=dict)
    fid: float | None = None
    model_uri: str | None = None  # ``models:/NAME/VERSION`` for a registered version

    def load_generator(self, cfg: Config, device=None):
        """The generator (eval mode): a registered version's from its own artifacts, else from ``g_uri``."""
        from pipeline.models import factory

        arch = self.arch or factory.generator_kwargs(cfg.model)
        if self.model_uri:
            return load_version_generator(cfg, self.model_uri, arch, device)
        return factory.load_generator(self.g_uri, arch, device)


def model_name(cfg: Config, category: str, sketch_set: str) -> str:
    """``<prefix>-<category>-<sketch set>``, e.g. ``sketchgan-horse-horse_riders``."""
    return validate_name(f"{cfg.registry.model_prefix}-{category}-{sketch_set}", "registered model name")


def _fid_of(version, tag: str = TAG_FID) -> float | None:
    raw = (version.tags or {}).get(tag)
    try:
        value = float(raw) if raw not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _versions(mlf, name: str) -> list:
    return sorted(mlf.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def _alias_version(mlf, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return mlf.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def update_champion(mlf, name: str, alias: str) -> str | None:
    """Point ``alias`` at the best version by validation FID, else by the benchmark's FID (moving only for a
    strictly lower FID), or at the latest version while none has an FID. Returns the champion's version."""
    versions = _versions(mlf, name)
    if not versions:
        return None
    current = _alias_version(mlf, name, alias)
    # validation FID (training's, on the evaluation set's validation part) when any version has one: the
    # benchmark's FID is on the test part, which must not choose
    tag = TAG_FID_VALIDATION if any(_fid_of(v, TAG_FID_VALIDATION) is not None for v in versions) else TAG_FID
    measured = [v for v in versions if _fid_of(v, tag) is not None]
    if measured:
        best = min(measured, key=lambda v: (_fid_of(v, tag), int(v.version)))
        cur_fid = _fid_of(current, tag) if current is not None else None
        target = current if cur_fid is not None and cur_fid <= _fid_of(best, tag) else best
    else:
        target = versions[-1]
    if current is None or current.version != target.version:
        mlf.set_registered_model_alias(name, alias, target.version)
        log.info("%s: alias %s -> version %s", name, alias, target.version)
    return str(target.version)


PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the `pipeline` package, logged with every version


def chosen_generator(cfg: Config, run_uri: str, meta: dict) -> dict[str, Any]:
    """Which generator of a finished run a version holds (``registry.checkpoint``): its best by validation FID
    when the run kept one, else its last; with the iteration, sha256 and validation FID of that generator."""
    best = meta.get("best") or {}
    if cfg.registry.checkpoint == "best" and best.get("g_sha256"):
        return {"uri": layout.final_uri(run_uri, layout.G_BEST_FILE), "checkpoint": "best",
                "iteration": best.get("iteration"), "g_sha256": best["g_sha256"], "fid_validation": best.get("fid")}
    return {"uri": layout.final_uri(run_uri, layout.G_FILE), "checkpoint": "last", "iteration": meta.get("iterations"),
            "g_sha256": meta.get("g_sha256"), "fid_validation": meta.get("fid")}


def _lineage_tags(meta: dict, run_uri: str, chosen: dict[str, Any]) -> dict[str, str]:
    run = {"metadata": meta, "info": {}, "metrics": []}
    tags = tracking.run_tags(run, run_uri)
    tags[TAG_G_URI] = scrub_text(chosen["uri"])
    tags["sketchgan.g_sha256"] = chosen["g_sha256"] or ""
    tags["sketchgan.checkpoint"] = f"{chosen['checkpoint']}@{chosen['iteration']}"
    tags[TAG_ARCH] = json.dumps(meta.get("arch"), sort_keys=True)
    config = json.dumps(scrub(meta.get("config") or {}), sort_keys=True, separators=(",", ":"))
    if len(config) <= tracking.TAG_MAX:
        tags[TAG_CONFIG] = config
    tags.pop(TAG_FID, None)  # a run's own FID is on the validation part: it is this version's fid_validation
    fid = chosen.get("fid_validation")
    if isinstance(fid, int | float) and math.isfinite(fid):
        tags[TAG_FID_VALIDATION] = repr(float(fid))
    if meta.get("blend"):  # a blend's parents, alpha and space (pipeline.edit.blend)
        tags["sketchgan.blend"] = scrub_text(json.dumps(meta["blend"], sort_keys=True))[:tracking.TAG_MAX]
    return tags


def _find_version(mlf, name: str, run_uri: str, g_sha: str | None):
    for v in _versions(mlf, name):
        t = v.tags or {}
        if t.get(tracking.TAG_RUN_URI) == run_uri and t.get("sketchgan.g_sha256", "") == (g_sha or ""):
            return v
    return None


def _log_pyfunc(cfg: Config, mlflow_run_id: str, meta: dict, chosen: dict[str, Any]) -> str:
    """Log the pyfunc into the MLflow run; returns its model URI."""
    import mlflow

    from pipeline.registry.pyfunc_model import input_example, pip_requirements, signature

    with tempfile.TemporaryDirectory(prefix="sketchgan-model-") as tmp:
        d = Path(tmp)
        g_path = storage.download_file(chosen["uri"], d / layout.G_FILE)
        meta_path = d / layout.FINAL_METADATA
        registered = {k: chosen[k] for k in ("checkpoint", "iteration", "g_sha256", "fid_validation")}
        meta_path.write_text(json.dumps(scrub({**meta, "registered": registered}), indent=2, sort_keys=True,
                                        default=str))
        artifacts = {ARTIFACT_G: str(g_path), ARTIFACT_METADATA: str(meta_path)}
        if meta.get("base_g") and meta.get("base_g_sha256"):  # the base's GANSpace components, for edits
            components = layout.ganspace_uri(str(meta["base_g"]), str(meta["base_g_sha256"]))
            if storage.exists(components):
                artifacts[ARTIFACT_GANSPACE] = str(storage.download_file(components, d / "ganspace.npz"))
        with tracking.activated(cfg), mlflow.start_run(run_id=mlflow_run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT, python_model=str(PACKAGE_DIR / "registry" / "pyfunc_entry.py"),
                code_paths=[str(PACKAGE_DIR)],
                artifacts=artifacts,
                signature=signature(int(meta["arch"]["size"])),
                input_example=input_example(), pip_requirements=pip_requirements())
    return info.model_uri


def _finished_metadata(run_uri: str) -> dict:
    meta = layout.open_finished_run(run_uri, "nothing to register").metadata
    if not isinstance(meta.get("arch"), dict):
        raise ValueError(f"{layout.final_metadata_uri(run_uri)}: no generator architecture ('arch') recorded")
    return meta


def register_run(cfg: Config, run_uri: str) -> tuple[str, str]:
    """Register a finished customisation run as a new model version (or return its existing version)."""
    meta = _finished_metadata(run_uri)
    sketch = (meta.get("sketch_set") or {}).get("name")
    category = meta.get("category") or ((meta.get("config") or {}).get("data") or {}).get("category")
    if meta.get("kind") not in ("train", "blend") or not sketch or not category:
        raise ValueError(f"run {run_uri} is not a customisation run (kind {meta.get('kind')!r}, sketch set "
                         f"{sketch!r}, category {category!r}): only GANSketching runs are registered")
    name = model_name(cfg, category, sketch)
    mlf = tracking.client(cfg)
    _ensure_registered_model(mlf, name, category, sketch)
    alias = cfg.registry.champion_alias
    chosen = chosen_generator(cfg, run_uri, meta)
    existing = _find_version(mlf, name, run_uri, chosen["g_sha256"])
    if existing is not None:
        log.info("%s already registered as %s version %s", run_uri, name, existing.version)
        update_champion(mlf, name, alias)
        return name, str(existing.version)

    mlflow_run_id = tracking.log_run(cfg, run_uri)
    run = mlf.get_run(mlflow_run_id)
    model_uri = run.data.tags.get("sketchgan.model_uri")
    if not model_uri:
        model_uri = _log_pyfunc(cfg, mlflow_run_id, meta, chosen)
        mlf.set_tag(mlflow_run_id, "sketchgan.model_uri", model_uri)
    # The registry resolves the logged model's URI through the global tracking URI: point it at ours.
    with tracking.activated(cfg):
        version = mlf.create_model_version(name, source=model_uri, run_id=mlflow_run_id,
                                           tags=_lineage_tags(meta, run_uri, chosen),
                                           description=f"{meta.get('run_name')} ({run_uri})",
                                           model_id=model_uri.removeprefix("models:/") or None)
    log.info("registered %s (%s generator, iteration %s) as %s version %s", run_uri, chosen["checkpoint"],
             chosen["iteration"], name, version.version)
    update_champion(mlf, name, alias)
    return name, str(version.version)


def _ensure_registered_model(mlf, name: str, category: str, sketch: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlf.get_registered_model(name)
        return
    except MlflowException:
        pass
    try:
        mlf.create_registered_model(name, tags={"sketchgan.category": category, "sketchgan.sketch_set": sketch},
                                    description=f"StyleGAN2 customised to the {sketch!r} sketches ({category})")
    except MlflowException:  # created concurrently
        mlf.get_registered_model(name)


def set_version_fid(name: str, version: str | int, fid: float, cfg: Config,
                    figures: dict[str, float] | None = None) -> str | None:
    """Record a version's benchmark FID (and its other ``figures``, BENCHMARK_TAGS) and update the champion alias;
    returns the champion."""
    fid = float(fid)
    if not math.isfinite(fid):
        raise ValueError(f"{name} version {version}: FID must be a finite number, got {fid}")
    mlf = tracking.client(cfg)
    for key, value in (figures or {}).items():
        mlf.set_model_version_tag(name, str(version), key, repr(float(value)))
    mlf.set_model_version_tag(name, str(version), TAG_FID, repr(fid))
    return update_champion(mlf, name, cfg.registry.champion_alias)


def _from_version(cfg: Config, v) -> ResolvedModel:
    tags = v.tags or {}
    model_uri = f"models:/{v.name}/{v.version}"
    meta = version_metadata(cfg, model_uri)
    arch = meta.get("arch") or (json.loads(tags[TAG_ARCH]) if tags.get(TAG_ARCH) else None)
    fid = _fid_of(v)
    if fid is not None:
        meta = {**meta, "registry_fid": fid}
    return ResolvedModel(name=v.name, version=str(v.version), run_uri=tags.get(tracking.TAG_RUN_URI), g_uri=None,
                         arch=arch, metadata=meta, fid=fid, model_uri=model_uri)


def resolve_model(ref: str, cfg: Config) -> ResolvedModel:
    """``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` (or ``/latest``), a finished run, a base folder (a G
    checkpoint beside its metadata, as `layout` names them) or a G checkpoint URI."""
    from mlflow.exceptions import MlflowException

    ref = ref.strip()
    if ref.startswith("models:/"):
        body = ref[len("models:/"):]
        mlf = tracking.client(cfg)
        try:
            if "@" in body:
                name, alias = body.split("@", 1)
                v = mlf.get_model_version_by_alias(name, alias)
            elif "/" in body:
                name, version = body.split("/", 1)
                if version == "latest":
                    versions = _versions(mlf, name)
                    if not versions:
                        raise LookupError(f"{ref}: registered model {name!r} has no versions")
                    v = versions[-1]
                else:
                    v = mlf.get_model_version(name, version)
            else:
                raise ValueError(f"{ref}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        except MlflowException as exc:
            raise LookupError(scrub_text(f"{ref}: not found in the registry at {mlf.tracking_uri} "
                                                  f"({exc.message.splitlines()[0]})")) from None
        return _from_version(cfg, v)
    if ref.endswith(".pth"):
        meta_uri = layout.checkpoint_metadata_uri(ref)
        meta = storage.read_json(meta_uri) if storage.exists(meta_uri) else {}
        if not storage.exists(ref):
            raise FileNotFoundError(f"checkpoint {ref} does not exist")
        return ResolvedModel(name=Path(ref).stem, version="", run_uri=None, g_uri=ref, arch=meta.get("arch"),
                             metadata=meta, fid=meta.get("fid"))
    run = layout.finished_run(ref)
    if run is None:
        folder_g = storage.join(ref, layout.G_FILE)
        if storage.exists(folder_g):  # a base folder (G and its metadata), e.g. the committed toy base
            return resolve_model(folder_g, cfg)
        raise FileNotFoundError(f"{ref}: not a registered model (models:/...), a finished run (no "
                                f"{layout.final_metadata_uri('')}), a base folder (no {layout.G_FILE}) or a .pth "
                                "checkpoint")
    meta = run.metadata
    return ResolvedModel(name=meta.get("run_name") or ref.rstrip("/").rsplit("/", 1)[-1], version="", run_uri=ref,
                         g_uri=run.g_uri, arch=meta.get("arch"), metadata=meta,
                         fid=meta.get("fid"))


def _our_models(mlf, cfg: Config) -> list:
    prefix = f"{cfg.registry.model_prefix}-"
    models = list(mlf.search_registered_models(max_results=1000))
    return sorted((m for m in models if m.name.startswith(prefix)), key=lambda m: m.name)


def list_champions(cfg: Config) -> list[ResolvedModel]:
    """The champion version of every registered model with this prefix (models without one are skipped)."""
    mlf = tracking.client(cfg)
    out = []
    for m in _our_models(mlf, cfg):
        v = _alias_version(mlf, m.name, cfg.registry.champion_alias)
        if v is not None:
            out.append(_from_version(cfg, v))
    return out


def model_lines(cfg: Config) -> list[str]:
    """One line per registered model: name, versions, aliases, FID and the other benchmark figures per version."""
    mlf = tracking.client(cfg)
    lines = []
    for m in _our_models(mlf, cfg):
        versions = _versions(mlf, m.name)
        aliases = {str(a): str(n) for a, n in (mlf.get_registered_model(m.name).aliases or {}).items()}
        figures = {key: " ".join(f"v{v.version}={float(v.tags[key]):.4g}" for v in versions if (v.tags or {}).get(key))
                   for key in (TAG_FID_VALIDATION, TAG_FID, *BENCHMARK_TAGS)}
        lines.append(f"{m.name}  versions: {','.join(str(v.version) for v in versions) or '-'}"
                     f"  aliases: {','.join(f'{a}=v{n}' for a, n in sorted(aliases.items())) or '-'}  "
                     + "  ".join(f"{key}: {text or '-'}" for key, text in figures.items()))
    return lines


def registry_table(cfg: Config) -> list[dict[str, Any]]:
    """Every registered model of this prefix: its champion and each version's aliases, FIDs and run (the
    studio's registry view)."""
    mlf = tracking.client(cfg)
    table = []
    for m in _our_models(mlf, cfg):
        aliases = {str(a): str(n) for a, n in (mlf.get_registered_model(m.name).aliases or {}).items()}
        versions = [{"version": str(v.version), "ref": f"models:/{m.name}/{v.version}",
                     "aliases": sorted(a for a, n in aliases.items() if n == str(v.version)),
                     "fid": _fid_of(v), "fid_validation": _fid_of(v, TAG_FID_VALIDATION),
                     "run": (v.tags or {}).get(tracking.TAG_RUN_URI)} for v in _versions(mlf, m.name)]
        table.append({"name": m.name, "champion": aliases.get(cfg.registry.champion_alias), "versions": versions})
    return table


def track_runs(cfg: Config, run_uris: list[str], register: bool | None = None) -> list[str]:
    """For `sketchgan pretrain` / `train` after their runs finish: log each run to MLflow and (for
    customisations, when ``registry.auto_register``) register it. MLflow being unreachable never fails
    training: each failure becomes a warning line saying how to retry. Returns one line per run."""
    register = cfg.registry.auto_register if register is None else register
    lines = []
    for uri in run_uris:
        try:
            meta = _finished_metadata(uri)
            if register and meta.get("kind") == "train":
                name, version = register_run(cfg, uri)
                lines.append(f"{uri}: registered as models:/{name}/{version}")
            else:
                lines.append(f"{uri}: logged to MLflow run {tracking.log_run(cfg, uri)}")
        except Exception as exc:  # noqa: BLE001 - the run is safe in storage; say so and how to retry
            # MLflow's errors quote the tracking URI, credentials included: mask them
            reason = scrub_text(str(exc))
            log.warning("MLflow: could not log %s (%s); the run is complete in storage: run the same command "
                        "again once MLflow is reachable (finished runs are reused, then logged and registered "
                        "once)", uri, reason)
            lines.append(f"{uri}: not logged to MLflow ({reason.splitlines()[0] if reason else type(exc).__name__})")
    return lines
