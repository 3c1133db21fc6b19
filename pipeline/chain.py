"""The whole pipeline from one config: data -> sketch sets -> evaluation sets -> base -> train -> registry
-> benchmark. Every stage whose outputs already exist is reused (and says so), so a re-run only does
what is missing. `sketchgan pipeline` and `jobs/pipeline.py` run this; `sketchgan demo` runs it on
generated data.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline import layout, storage
from pipeline.config import Config, updated


@dataclass
class ChainReport:
    """What each stage did, for the closing summary."""

    lines: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    registered: list[tuple[str, str]] = field(default_factory=list)
    benchmark_uri: str | None = None
    base_run_uri: str | None = None


class Progress:
    """One progress line per stage with its duration."""

    def __init__(self, total: int):
        self.total, self.index = total, 0

    def stage(self, name: str, func: Callable[[], str | None]) -> None:
        self.index += 1
        t0 = time.time()
        print(f"[{self.index}/{self.total}] {name} ...", flush=True)
        note = func()
        print(f"[{self.index}/{self.total}] {name}: {note or 'done'} ({time.time() - t0:.0f}s)", flush=True)


def preprocess_unless_done(cfg: Config) -> str:
    """Preprocess the configured source into the category's dataset unless it is already complete."""
    uri = layout.dataset_uri(cfg)
    if storage.exists(layout.manifest_uri(uri)):
        return f"reusing dataset {uri}"
    if not cfg.data.source:
        raise ValueError(f"dataset {uri} does not exist and data.source is not set: nothing to preprocess")
    from pipeline.data.preprocess import preprocess

    summary = preprocess(cfg)
    return f"{uri}: {summary}"


def prepare_sketch_sets(cfg: Config) -> tuple[Config, str]:
    """Create each configured sketch set that does not exist yet; returns the config pointing at them."""
    from pipeline.data import sketchsets

    notes, specs = [], []
    for spec in cfg.train.sketch_sets:
        uri = spec.uri or layout.sketchset_uri(cfg, spec.name)
        if layout.sketch_set_exists(uri):
            notes.append(f"reusing {spec.name}")
        elif spec.from_dir or spec.from_ids:
            sketchsets.create_sketch_set(cfg, spec.name, from_dir=spec.from_dir, from_ids=spec.from_ids,
                                         dataset=layout.dataset_uri(cfg), out=uri)
            notes.append(f"created {spec.name}")
        else:
            raise ValueError(f"sketch set {spec.name!r} does not exist at {uri} and has neither from_dir nor "
                             "from_ids to create it from")
        specs.append({**spec.model_dump(), "uri": uri})
    return updated(cfg, {"train.sketch_sets": specs}), ", ".join(notes)


def prepare_evalsets(cfg: Config, n: int) -> tuple[Config, str]:
    """An evaluation set per sketch set (real images nearest its sketches) unless one is configured."""
    from pipeline.data import evalsets

    notes, specs = [], []
    for spec in cfg.train.sketch_sets:
        uri = spec.evalset or layout.evalset_uri(cfg, spec.name)
        if layout.evalset_exists(uri):
            notes.append(f"reusing {spec.name}")
        else:
            ids = None
            if spec.evalset_ids:
                ids = [line.strip() for line in storage.read_text(spec.evalset_ids).splitlines() if line.strip()]
            made = evalsets.create_evalset(cfg, sketchset=spec.uri, dataset=layout.dataset_uri(cfg), n=n, out=uri,
                                           ids=ids)
            notes.append(f"created {spec.name} ({made['count']} images{', by id' if ids is not None else ''})")
        specs.append({**spec.model_dump(), "evalset": uri})
    return updated(cfg, {"train.sketch_sets": specs}), ", ".join(notes)


def ensure_base(cfg: Config, report: ChainReport) -> tuple[Config, str]:
    """Use the configured base checkpoints, or pretrain one on the dataset (reused when finished)."""
    if cfg.model.base_g:
        return cfg, f"using base {cfg.model.base_g}"
    from pipeline.train.raytrain import pretrain

    summary = pretrain(cfg)
    base = layout.FinishedRun(summary["run_uri"], summary["metadata"])
    report.base_run_uri = base.uri
    cfg = updated(cfg, {"model.base_g": base.g_uri, "model.base_d": base.d_uri})
    return cfg, ("reusing" if summary.get("reused") else "pretrained") + f" base {summary['run_uri']}"


def train_stage(cfg: Config, report: ChainReport) -> str:
    from pipeline.train.raytrain import train_all

    report.runs = train_all(cfg)
    reused = sum(1 for r in report.runs if r.get("reused"))
    return f"{len(report.runs)} run(s), {reused} reused: " + ", ".join(r["run_uri"] for r in report.runs)


def register_stage(cfg: Config, report: ChainReport) -> str:
    if not cfg.registry.auto_register:
        return "skipped (registry.auto_register is false)"
    from pipeline.registry.mlflow_registry import register_run

    for run in report.runs:
        name, version = register_run(cfg, run["run_uri"])[:2]
        report.registered.append((name, str(version)))
    return ", ".join(f"{n} v{v}" for n, v in report.registered)


def benchmark_stage(cfg: Config, report: ChainReport) -> str:
    from pipeline.eval.benchmark import benchmark as run_benchmark

    if not cfg.eval.models:
        # a registered customisation is scored as its model version: the table names the version, and the
        # registry records the FID on it (`sketchgan models list`)
        versions = dict(zip((r["run_uri"] for r in report.runs), report.registered))
        models = []
        for spec, run in zip(cfg.train.sketch_sets, report.runs):
            name_version = versions.get(run["run_uri"])
            ref = f"models:/{name_version[0]}/{name_version[1]}" if name_version else run["run_uri"]
            models.append({"model": ref, "evalset": spec.evalset, "category": cfg.data.category,
                           "sketch_set": spec.name})
        # the base, scored on every sketch set's evaluation set: each row's "before" figure (fid_base)
        base = report.base_run_uri or cfg.model.base_g
        cfg = updated(cfg, {"eval.models": models, "eval.baseline": cfg.eval.baseline or base})
    rows = run_benchmark(cfg)
    report.benchmark_uri = layout.benchmark_uri(cfg, cfg.eval.name)
    base_share = {r["evalset"]: r.get("target_share") for r in rows if r.get("baseline")}

    def summary(r: dict[str, Any]) -> str:
        text = f"{r['model']} v{r['version']}" if r["version"] else r["model"]
        text += f" FID {r['fid']:.2f}" + (f" (base {r['fid_base']:.2f})" if r.get("fid_base") else "")
        if r.get("target_share") is not None:
            before = base_share.get(r["evalset"])
            text += f", target share {r['target_share']:.2f}" + (f" (base {before:.2f})" if before is not None else "")
        return text

    return "; ".join(summary(r) for r in rows if not r.get("baseline"))


def run_chain(cfg: Config, evalset_size: int = 64) -> ChainReport:
    """Run every stage in order, reusing finished outputs; returns what was done and where it lives."""
    report = ChainReport()
    storage.ensure_writable(cfg.storage.root)
    progress = Progress(7)
    state = {"cfg": cfg}

    def step(func):
        def run():
            out = func(state["cfg"])
            if isinstance(out, tuple):
                state["cfg"], note = out
                return note
            return out
        return run

    progress.stage("preprocess", step(preprocess_unless_done))
    progress.stage("sketch sets", step(prepare_sketch_sets))
    progress.stage("evaluation sets", step(lambda c: prepare_evalsets(c, evalset_size)))
    progress.stage("base model", step(lambda c: ensure_base(c, report)))
    progress.stage("train", step(lambda c: train_stage(c, report)))
    progress.stage("register", step(lambda c: register_stage(c, report)))
    progress.stage("benchmark", step(lambda c: benchmark_stage(c, report)))
    return report


def print_where_to_look(cfg: Config, report: ChainReport) -> None:
    print("\nWhere to look:")
    if report.base_run_uri:
        print(f"  before customisation (base samples): {layout.samples_uri(report.base_run_uri)}")
    for run in report.runs:
        print(f"  after customisation ({run['run_name']}):   {layout.samples_uri(run['run_uri'])}")
    for name, version in report.registered:
        print(f"  registered model: models:/{name}/{version} (alias {cfg.registry.champion_alias} on the best)")
    if report.benchmark_uri:
        print(f"  benchmark table:  {layout.benchmark_file(report.benchmark_uri, 'markdown')}")
        print(f"  FID chart:        {layout.benchmark_file(report.benchmark_uri, 'chart')}")
        compare = layout.benchmark_file(report.benchmark_uri, "compare")
        if storage.exists(compare):
            print(f"  before and after: {compare}")
    try:
        from pipeline.redact import scrub_text
        from pipeline.registry.tracking import tracking_uri

        print(f"  MLflow UI:        mlflow ui --backend-store-uri {scrub_text(tracking_uri(cfg))}")
    except ImportError:
        pass
