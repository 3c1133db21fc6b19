"""Which models a benchmark compares: ``eval.models`` entries -> resolved specs with an evaluation set each.

An entry is a mapping: ``model`` (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, the query
``champions``, a training run URI or a G checkpoint URI ending in .pth/.pt), plus optional ``evalset``
(URI), ``category``, ``sketch_set``, ``target_class`` and ``n`` (samples). The evaluation set defaults to the one
recorded in the model's metadata, then to ``train.sketch_sets[].evalset`` for its sketch set; the target class
to ``train.sketch_sets[].target_class``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline import layout, storage
from pipeline.config import Config

ENTRY_KEYS = {"model", "evalset", "category", "sketch_set", "target_class", "n"}
CHECKPOINT_SUFFIXES = (".pth", ".pt")


class BenchmarkError(ValueError):
    """A benchmark that cannot run as configured; the message names the model or entry."""


@dataclass
class ModelSpec:
    label: str  # the model's name in the results
    version: str  # registry version, else "" for a run or checkpoint
    # {"kind": "run", "uri"}, {"kind": "checkpoint", "uri", "arch"} or {"kind": "registered", "model_uri", "arch"}
    source: dict[str, Any]
    evalset: str | None
    category: str
    sketch_set: str
    n: int
    registry_name: str | None = None  # set when the FID should be recorded on a registered version
    baseline: bool = False  # the `eval.baseline` model, scored on one of the evaluation sets
    target_class: str | None = None  # the class its sketch set shows (eval.classifier's name for it)
    sketches_uri: str | None = None  # its sketch set, when known (the comparison figure shows its sketches)
    metadata: dict[str, Any] = field(default_factory=dict)


def _entries(cfg: Config) -> list[dict[str, Any]]:
    entries = cfg.eval.models
    if not entries:
        raise BenchmarkError(
            "eval.models is empty: list the models to benchmark, e.g. [{model: RUN_URI, evalset: URI}]"
        )
    out = []
    for i, entry in enumerate(entries):
        where = f"eval.models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict):
            raise BenchmarkError(f"{where}: expected a mapping with `model:`, not {type(entry).__name__}")
        unknown = sorted(set(entry) - ENTRY_KEYS)
        if unknown:
            known = ", ".join(sorted(ENTRY_KEYS))
            raise BenchmarkError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {known})")
        if not isinstance(entry.get("model"), str) or not entry["model"].strip():
            raise BenchmarkError(f"{where}.model: required (a registry ref, `champions` or a run/G URI)")
        n = entry.get("n", cfg.eval.n_samples)
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise BenchmarkError(f"{where}.n: expected an integer >= 2, got {n!r}")
        for key in ("evalset", "category", "sketch_set", "target_class"):
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise BenchmarkError(f"{where}.{key}: expected a string, got {entry[key]!r}")
        out.append({**entry, "n": n, "_where": where})
    return out


def _sketch_set_of(meta: dict[str, Any]) -> str | None:
    for key in ("sketch_set", "sketchset", "sketch_set_name"):
        value = meta.get(key)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            return value["name"]
    return None


def _category_of(meta: dict[str, Any]) -> str | None:
    if isinstance(meta.get("category"), str):
        return meta["category"]
    config = meta.get("config")
    if isinstance(config, dict) and isinstance(config.get("data"), dict):
        value = config["data"].get("category")
        return value if isinstance(value, str) else None
    return None


def _arch_of(meta: dict[str, Any]) -> dict[str, Any] | None:
    for key in ("arch", "architecture", "generator_kwargs", "model"):
        if isinstance(meta.get(key), dict):
            return meta[key]
    return None


def _sketch_set_spec(cfg: Config, name: str | None):
    return next((s for s in cfg.train.sketch_sets if s.name == name), None) if name else None


def _sketches_uri(meta: dict[str, Any], sketch_set: str | None, cfg: Config) -> str | None:
    """The stored sketch set a model was customised from: its metadata's, else the configured or default one."""
    recorded = meta.get("sketch_set")
    if isinstance(recorded, dict) and isinstance(recorded.get("uri"), str) and recorded.get("name") == sketch_set:
        return recorded["uri"]
    spec = _sketch_set_spec(cfg, sketch_set)
    if spec is not None:
        return spec.uri or layout.sketchset_uri(cfg, spec.name)
    return None


def _evalset_for(entry: dict[str, Any], meta: dict[str, Any], sketch_set: str | None,
                 cfg: Config) -> str | None:
    if entry.get("evalset"):
        return entry["evalset"]
    for key in ("evalset", "evalset_uri"):
        value = meta.get(key)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, dict) and isinstance(value.get("uri"), str):
            return value["uri"]
    spec = _sketch_set_spec(cfg, sketch_set)
    return spec.evalset if spec is not None else None


def _from_uri(entry: dict[str, Any], cfg: Config) -> ModelSpec:
    uri = entry["model"].rstrip("/")
    if not uri.endswith(CHECKPOINT_SUFFIXES) and layout.finished_run(uri) is None and \
            storage.exists(storage.join(uri, layout.G_FILE)):
        uri = storage.join(uri, layout.G_FILE)  # a base folder: its G beside its metadata
    if uri.endswith(CHECKPOINT_SUFFIXES):
        if not storage.exists(uri):
            raise BenchmarkError(f"{entry['_where']}.model {uri}: no such checkpoint")
        meta_uri = layout.checkpoint_metadata_uri(uri)
        meta = storage.read_json(meta_uri) if storage.exists(meta_uri) else {}
        arch = _arch_of(meta)
        if arch is None:
            from pipeline.models.factory import generator_kwargs

            arch = generator_kwargs(cfg.model)
        source = {"kind": "checkpoint", "uri": uri, "arch": arch}
        label = str(meta.get("run") or meta.get("run_name") or layout.run_name_of_checkpoint(uri))
    else:
        run = layout.finished_run(uri)
        if run is None:
            raise BenchmarkError(f"{entry['_where']}.model {uri}: not a finished training run (no "
                                 f"{layout.final_metadata_uri('')})")
        if not isinstance(run.metadata, dict):
            raise BenchmarkError(f"{layout.final_metadata_uri(uri)}: expected a JSON object")
        meta = run.metadata
        source = {"kind": "run", "uri": uri}
        label = str(meta.get("run") or meta.get("run_name") or uri.rsplit("/", 1)[-1])
    return _spec(entry, label, "", source, meta, cfg)


def _spec(entry, label, version, source, meta, cfg, registry_name=None) -> ModelSpec:
    sketch_set = entry.get("sketch_set") or _sketch_set_of(meta)
    set_spec = _sketch_set_spec(cfg, sketch_set)
    return ModelSpec(
        label=label,
        version=version,
        source=source,
        evalset=_evalset_for(entry, meta, sketch_set, cfg),
        category=entry.get("category") or _category_of(meta) or "",
        sketch_set=sketch_set or "",
        n=entry["n"],
        registry_name=registry_name,
        metadata=meta,
        target_class=entry.get("target_class") or (set_spec.target_class if set_spec is not None else None),
        sketches_uri=_sketches_uri(meta, sketch_set, cfg),
    )


def _from_registry(entry: dict[str, Any], resolved, cfg: Config) -> ModelSpec:
    meta = dict(resolved.metadata or {})
    arch = resolved.arch or _arch_of(meta)
    if resolved.model_uri and arch:  # a registered version: its own weights, through MLflow
        source = {"kind": "registered", "model_uri": resolved.model_uri, "arch": arch}
    elif resolved.g_uri and arch:
        source = {"kind": "checkpoint", "uri": resolved.g_uri, "arch": arch}
    elif resolved.run_uri:
        source = {"kind": "run", "uri": resolved.run_uri}
    else:
        raise BenchmarkError(
            f"{entry['_where']}: registered model {resolved.name} v{resolved.version} has no run and no "
            "checkpoint with a known architecture"
        )
    return _spec(entry, resolved.name, str(resolved.version), source, meta, cfg, registry_name=resolved.name)


def _resolve_entry(entry: dict[str, Any], cfg: Config) -> list[ModelSpec]:
    ref = entry["model"].strip()
    if ref == "champions" or ref.startswith("models:/"):
        from pipeline.registry import mlflow_registry

        if ref == "champions":
            resolved = list(mlflow_registry.list_champions(cfg))
            if not resolved:
                raise BenchmarkError(f"{entry['_where']}: `champions` matched no registered model")
        else:
            resolved = [mlflow_registry.resolve_model(ref, cfg)]
        return [_from_registry(entry, r, cfg) for r in resolved]
    return [_from_uri(entry, cfg)]


def resolve_baseline(cfg: Config, specs: list[ModelSpec]) -> list[ModelSpec]:
    """``eval.baseline`` once per evaluation set of ``specs`` (with that set's sketch set and sample count)."""
    ref = cfg.eval.baseline
    if not ref:
        return []
    if ref.strip() == "champions":
        raise BenchmarkError("eval.baseline: name one model (a run, a checkpoint or models:/...), not `champions`")
    out = []
    for evalset in dict.fromkeys(s.evalset for s in specs):
        first = next(s for s in specs if s.evalset == evalset)
        entry = {"model": ref, "evalset": evalset, "category": first.category, "sketch_set": first.sketch_set,
                 "target_class": first.target_class, "n": first.n, "_where": "eval.baseline"}
        for spec in _resolve_entry(entry, cfg):
            spec.baseline, spec.sketches_uri = True, first.sketches_uri
            out.append(spec)
    return out


def resolve_models(cfg: Config) -> list[ModelSpec]:
    """Every configured model resolved, each with an evaluation set; raises naming the ones without."""
    specs: list[ModelSpec] = []
    for entry in _entries(cfg):
        specs.extend(_resolve_entry(entry, cfg))
    missing = [s for s in specs if not s.evalset]
    if missing:
        names = ", ".join(f"{s.label}" + (f" v{s.version}" if s.version else "") for s in missing)
        raise BenchmarkError(
            f"no evaluation set for model(s) {names}: give `evalset:` in its eval.models entry, or set "
            "train.sketch_sets[].evalset for its sketch set"
        )
    return specs
