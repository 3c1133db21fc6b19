"""What each `sketchgan` command does once its configuration is valid: call its stage, print what a person needs.

One function per command; `pipeline.cli` maps flags to config keys or to these functions' arguments. Stage
modules are imported inside the functions, so a command imports only what it runs (and `--help` stays fast).
"""

from __future__ import annotations

import json
import logging

from pipeline import layout
from pipeline.config import Config

log = logging.getLogger("sketchgan")


def preprocess_command(cfg: Config) -> int:
    from pipeline.data.preprocess import preprocess as run

    print(f"preprocess: {run(cfg)}", flush=True)
    return 0


def sketchset_create_command(cfg: Config, name: str, from_dir: str | None = None, from_ids: str | None = None,
                     dataset: str | None = None, out: str | None = None) -> int:
    from pipeline.data.sketchsets import SketchSetError, create_sketch_set

    if from_ids and not dataset and not cfg.data.dataset:
        raise SketchSetError("--from-ids needs --dataset (the preprocessed dataset the ids come from)")
    man = create_sketch_set(cfg, name, from_dir=from_dir, from_ids=from_ids, dataset=dataset, out=out)
    print(f"sketchset: {man['name']} ({man['count']} sketches, {man['size']} px, id {man['id']}) -> {man['uri']}")
    return 0


def evalset_create_command(cfg: Config, sketchset: str, dataset: str, n: int | None = None,
                           out: str | None = None) -> int:
    from pipeline.data.evalsets import create_evalset

    man = create_evalset(cfg, sketchset, dataset=dataset, n=n, out=out)
    print(f"evalset: {man['name']} ({man['count']} images nearest sketch set {man['sketchset_id']}, "
          f"max distance {man['max_distance']:.4f}, id {man['id']}) -> {man['uri']}")
    return 0


def _metrics_line(summary: dict) -> str:
    m = (summary.get("metadata") or {}).get("final_metrics") or {}
    keys = [k for k in ("loss_sketch", "loss_g", "loss_d", "fid", "it_per_s") if k in m]
    return " ".join(f"{k}={m[k]}" for k in keys)


def _track(cfg: Config, run_uris: list[str]) -> None:
    """Log finished runs to MLflow and register customisations (idempotent: a re-run of the command after an
    MLflow outage registers what is missing and duplicates nothing)."""
    from pipeline.registry.mlflow_registry import track_runs

    for line in track_runs(cfg, run_uris):
        print(line, flush=True)


def pretrain_command(cfg: Config) -> int:
    from pipeline.train.raytrain import pretrain as run

    s = run(cfg)
    base = layout.FinishedRun(s["run_uri"], s["metadata"])
    tag = " (already finished)" if s["reused"] else ""
    print(f"base model{tag}: model.base_g={base.g_uri} model.base_d={base.d_uri}")
    _track(cfg, [s["run_uri"]])
    return 0


def train_command(cfg: Config) -> int:
    from pipeline.train.raytrain import TrainingRunError, train_all

    try:
        summaries = train_all(cfg)
    except TrainingRunError as exc:
        print(f"sketchgan train: error: {exc}", flush=True)
        return 1
    for s in summaries:
        tag = " (already finished)" if s["reused"] else ""
        g_uri = layout.FinishedRun(s["run_uri"], s["metadata"]).g_uri
        print(f"{s['run_name']}: {g_uri}{tag} {_metrics_line(s)}".rstrip())
    _track(cfg, [s["run_uri"] for s in summaries])
    return 0


def tune_command(cfg: Config) -> int:
    from pipeline.tune.sweep import run_sweep

    summary = run_sweep(cfg)
    for row in summary["trials"]:
        state = "finished" if row["finished"] else ("error: " + row["error"] if row["error"] else "stopped early")
        value = "-" if row["metric"] is None else f"{row['metric']:.4f}"
        print(f"{row['trial_id']}  {summary['metric']}={value}  {json.dumps(row['params'], sort_keys=True)}  "
              f"{state}  {row['run_uri'] or ''}".rstrip())
    best = summary["best"]
    if best is None:
        print(f"sweep {summary['sweep']}: no trial finished", flush=True)
        return 1
    print(f"best: {best['run_uri']} {summary['metric']}={best['metric']:.4f}")
    if summary["registered"]:
        print("registered: models:/{}/{}".format(*summary["registered"]))
    return 0


def benchmark_command(cfg: Config) -> int:
    from pipeline.eval.benchmark import benchmark as run
    from pipeline.eval.report import to_markdown

    rows = run(cfg)
    print(to_markdown(rows), end="")
    print(f"results: {layout.benchmark_uri(cfg, cfg.eval.name)}")
    return 0


def models_list_command(cfg: Config) -> int:
    from pipeline.redact import scrub_text
    from pipeline.registry import tracking
    from pipeline.registry.mlflow_registry import model_lines

    lines = model_lines(cfg)
    if not lines:
        print(f"no registered models named {cfg.registry.model_prefix}-* in "
              f"{scrub_text(tracking.tracking_uri(cfg))}")
    for line in lines:
        print(line)
    return 0


def generate_command(cfg: Config, model: str, out: str, n: int = 16, truncation: float = 1.0, seed: int = 0,
                     interpolate: bool = False, edits: list[str] | None = None, ganspace: str | None = None,
                     compare: bool = False, latent: str | None = None) -> int:
    from pipeline.registry.generate import GenerateRequest, write_images

    req = GenerateRequest(model=model, n=n, truncation=truncation, seed=seed, interpolate=interpolate,
                          edits=list(edits or []), ganspace=ganspace, compare=compare, latent=latent)
    print(write_images(cfg, req, out))
    return 0


def blend_command(cfg: Config, a: str, b: str, space: str = "weights", steps: int = 5, out: str | None = None,
                  n: int = 4, seed: int = 0, truncation: float = 1.0, alpha: float | None = None,
                  register: bool = False) -> int:
    from pipeline.edit.blend import run_blend

    for line in run_blend(cfg, a, b, space, steps, out, n, seed, truncation, alpha, register):
        print(line)
    return 0


def project_command(cfg: Config, image: str, base: str, out: str, steps: int = 1000, space: str = "w+",
                    vgg_weights: str | None = None, lpips_weights: str | None = None, seed: int = 0) -> int:
    from pipeline.edit.projection import ProjectSettings, run_project

    for line in run_project(cfg, image, base, out, ProjectSettings(steps=steps, space=space, seed=seed),
                            vgg_weights, lpips_weights):
        print(line)
    return 0


def ganspace_compute_command(cfg: Config, base: str, samples: int, components: int | None = None,
                             seed: int = 0x6A5, force: bool = False) -> int:
    from pipeline.edit.bases import compute_components

    print(compute_components(cfg, base, samples, components, seed, force))
    return 0


def pipeline_command(cfg: Config) -> int:
    from pipeline.chain import print_where_to_look, run_chain

    report = run_chain(cfg)
    print_where_to_look(cfg, report)
    return 0


def studio_command(cfg: Config) -> int:
    from pipeline.config import updated
    from pipeline.demo import committed_assets
    from pipeline.studio.server import serve

    # like the demo: the committed toy base unless the config names one
    serve(updated(cfg, committed_assets(cfg)) if not cfg.model.base_g else cfg)
    return 0


def demo_command(cfg: Config) -> int:
    from pipeline.demo import run_demo

    run_demo(cfg)
    return 0
