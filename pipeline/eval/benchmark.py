"""`sketchgan benchmark`: FID, KID, precision/recall, path length and sketch fidelity of several models, on Ray.

Scores are against the test part of each evaluation set; training's FID at intervals (the best checkpoint,
Tune's metric, the champion) uses the validation part, so no choice peeks at what is reported.

Each model generates ``n`` samples in a Ray actor (one GPU each when the cluster has GPUs), batched, and the
actor turns them into features in memory (clean-fid's clean protocol, no PNG round trip). Reference
statistics of each evaluation set come from the storage cache or are computed once and published. The
results table, a bar chart and the before/after figure (`pipeline.eval.report`, `pipeline.eval.compare`) are
published to ``<root>/benchmarks/<eval.name>/``; the run is logged to MLflow and each registered version gets
its FID.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from pipeline import layout
from pipeline.config import Config
from pipeline.eval.features import FeatureExtractor, build_extractor
from pipeline.eval.fid import frechet_distance, kernel_distance
from pipeline.eval.metrics import precision_recall
from pipeline.eval.models import BenchmarkError, ModelSpec, resolve_baseline, resolve_models
from pipeline.eval.refstats import ReferenceStats, evalset_id, reference_stats
from pipeline.eval.report import publish
from pipeline.eval.resize import PROTOCOL
from pipeline.progress import Progress
from pipeline.raysession import ensure_ray

log = logging.getLogger(__name__)
TEST_PART = "test"  # of each evaluation set (pipeline.data.evalsets.part_of)



def load_source(source: dict[str, Any], device, cfg: Config):
    """The generator (eval mode) for a resolved model source: a run, a checkpoint, or a registered version (its
    own weights, through MLflow)."""
    from pipeline.models import factory

    if source["kind"] == "run":
        generator, _ = factory.load_run_generator(source["uri"], device)
    elif source["kind"] == "registered":
        from pipeline.registry.versions import load_version_generator

        generator = load_version_generator(cfg, source["model_uri"], source["arch"], device)
    else:
        generator = factory.load_generator(source["uri"], source["arch"], device)
    return generator.eval()


class SampleWorker:
    """One Ray actor: builds the extractor once, then featurises evaluation sets and models' samples."""

    def __init__(self, cfg_data: dict[str, Any], threads: int):
        import torch

        from pipeline.eval.features import default_device

        torch.set_num_threads(max(1, threads))
        self.cfg = Config.model_validate(cfg_data)
        self.device = default_device()
        self.extractor = build_extractor(self.cfg.eval, self.device)
        # Ray does not pin actors to cores: resize on as many threads as the actor reserved CPUs.
        self.extractor.resize_threads = self.cfg.eval.resize_threads or max(1, threads)
        self.classifier = self.sketcher = self.lpips = self.vgg = None
        if self.cfg.eval.classifier:
            from pipeline.eval.shape_classifier import load_classifier

            self.classifier = load_classifier(self.cfg.eval.classifier)

    def evalset_features(self, evalset_uri: str, part: str | None = None) -> np.ndarray:
        from pipeline.eval.fid import extract_features
        from pipeline.eval.refstats import load_evalset_images

        return extract_features(load_evalset_images(evalset_uri, part), self.extractor, self.cfg.eval.batch_size)

    def model_features(self, source: dict[str, Any], n: int, target_class: str | None = None,
                       sketches_uri: str | None = None) -> dict[str, Any]:
        """Features of ``n`` samples and the seconds it took; the share of samples ``eval.classifier`` puts in
        ``target_class`` (None without a classifier or a target); the sketch fidelity of the first
        ``eval.fidelity_samples`` samples to the sketch set at ``sketches_uri``; the path length."""
        from pipeline.eval.fid import extract_features
        from pipeline.models.sampling import generate_batches

        ev = self.cfg.eval
        start = time.perf_counter()
        generator = load_source(source, self.device, self.cfg)
        arch = source.get("arch") or {}
        batches = generate_batches(generator, n, ev.seed, ev.truncation, ev.batch_size, self.device,
                                   arch.get("style_dim"))
        counted = {"target": 0, "all": 0}
        if self.classifier is not None and target_class:
            if target_class not in self.classifier.classes:
                raise BenchmarkError(f"target class {target_class!r} is not one of eval.classifier's classes "
                                     f"({', '.join(self.classifier.classes)})")
            batches = self._classified(batches, self.classifier.classes.index(target_class), counted)
        kept: list[np.ndarray] = []
        if sketches_uri and ev.fidelity_samples:
            batches = self._kept(batches, kept, ev.fidelity_samples)
        vgg_feats: list[np.ndarray] = []
        if ev.vgg_weights:  # precision/recall in VGG-16 fc2 features, as the paper measures them
            batches = self._vgg_featurised(batches, vgg_feats)
        out = {"feats": extract_features(batches, self.extractor, ev.batch_size),
               "target_share": counted["target"] / counted["all"] if counted["all"] else None}
        if vgg_feats:
            out["pr_feats"] = np.concatenate(vgg_feats)
        if kept:
            out["sketch_fidelity"] = self._fidelity(np.concatenate(kept)[:ev.fidelity_samples], sketches_uri)
        if ev.ppl_samples:
            out["ppl"], out["ppl_distance"] = self._path_length(generator)
        out["seconds"] = time.perf_counter() - start
        return out

    def _vgg(self):
        if self.vgg is None:
            from pipeline.eval.vgg import VGG16Features

            self.vgg = VGG16Features(self.cfg.eval.vgg_weights).to(self.device)
        return self.vgg

    def _vgg_featurised(self, batches, out: list[np.ndarray]):
        for batch in batches:
            out.append(self._vgg()(np.asarray(batch)))
            yield batch

    def evalset_pr_features(self, evalset_uri: str, part: str) -> np.ndarray:
        """VGG-16 fc2 features of an evaluation set's part (precision/recall with eval.vgg_weights)."""
        from pipeline.eval.refstats import load_evalset_images

        images = load_evalset_images(evalset_uri, part)
        step = self.cfg.eval.batch_size
        return np.concatenate([self._vgg()(images[i:i + step]) for i in range(0, len(images), step)])

    @staticmethod
    def _kept(batches, kept: list[np.ndarray], m: int):
        held = 0
        for batch in batches:
            if held < m:
                kept.append(np.asarray(batch)[:m - held])
                held += len(kept[-1])
            yield batch

    def _fidelity(self, images: np.ndarray, sketches_uri: str) -> float:
        """Sketch fidelity (`pipeline.eval.metrics`): the images sketched by the pipeline's sketcher F, against
        the sketch set (resized to the images' size)."""
        import torch
        from PIL import Image

        from pipeline.data.sketchsets import load_sketch_set
        from pipeline.eval.metrics import sketch_fidelity
        from pipeline.models.sketchers import build_sketcher

        if self.sketcher is None:
            d = self.cfg.data
            self.sketcher = build_sketcher(d.sketcher, d.sketcher_weights, device=self.device)
        size = images.shape[1]
        _, user = load_sketch_set(sketches_uri)
        user = np.stack([np.asarray(Image.fromarray(u).resize((size, size), Image.BOX)) if u.shape[0] != size
                         else u for u in user])
        with torch.no_grad():
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float().to(self.device) / 127.5 - 1
            sketched = ((self.sketcher(x)[:, 0].clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
        return sketch_fidelity(sketched, user)

    def _path_length(self, generator) -> tuple[float, str]:
        """PPL in W with end points: LPIPS with eval.vgg_weights and eval.lpips_weights, else pixel MSE."""
        from pipeline.eval.metrics import path_length

        ev = self.cfg.eval
        if self.lpips is None and ev.vgg_weights and ev.lpips_weights:
            from pipeline.eval.lpips import LPIPS

            self.lpips = LPIPS(ev.vgg_weights, ev.lpips_weights).to(self.device)
        if self.lpips is not None:
            distance, kind = self.lpips, "lpips-vgg"
        else:
            def distance(a, b):
                return (a - b).pow(2).flatten(1).mean(1)
            kind = "pixel-mse"

        def synthesis(w):
            return generator([w], input_is_latent=True, randomize_noise=False)[0]

        value = path_length(generator.get_latent, synthesis, distance, generator.style_dim, n=ev.ppl_samples,
                            batch=ev.batch_size, seed=ev.seed, device=self.device)
        return value, kind

    def _classified(self, batches, target: int, counted: dict[str, int]):
        from pipeline.eval.shape_classifier import predict_proba

        for batch in batches:
            counted["target"] += int((predict_proba(self.classifier, batch).argmax(1) == target).sum())
            counted["all"] += len(batch)
            yield batch


def _ray_workers(cfg: Config, n_models: int):
    import ray

    ensure_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = ray.cluster_resources().get("CPU", 1)
    ev = cfg.eval
    if gpus:
        default = gpus
        options = {"num_gpus": 1, "num_cpus": ev.cpus_per_actor}
    else:
        default = max(1, int(cpus // ev.cpus_per_actor))
        options = {"num_cpus": ev.cpus_per_actor}
    count = max(1, min(ev.num_actors or default, n_models))
    threads = max(1, int(ev.cpus_per_actor))
    remote = ray.remote(SampleWorker)
    log.info("benchmark: %d sampling actor(s) (%s)", count, ", ".join(f"{k}={v}" for k, v in options.items()))
    data = cfg.model_dump(mode="json")
    return [remote.options(**options).remote(data, threads) for _ in range(count)]


# ------------------------------------------------------------------------------------------------- scoring
def score(feats: np.ndarray, ref: ReferenceStats, cfg: Config) -> tuple[float, float]:
    """(FID, KID) of generated features against the reference statistics."""
    from pipeline.eval.fid import feature_statistics

    mu, sigma = feature_statistics(feats)
    fid = frechet_distance(mu, sigma, ref.mu, ref.sigma)
    kid = kernel_distance(ref.feats, feats, cfg.eval.kid_subsets, cfg.eval.kid_subset_size, cfg.eval.seed)
    return fid, kid


def run_benchmark(cfg: Config, specs: list[ModelSpec], extractor: FeatureExtractor) -> list[dict[str, Any]]:
    """Generate, featurise and score every model in Ray; one result row per model."""
    import ray

    workers = _ray_workers(cfg, len(specs))
    try:
        return _score_all(cfg, specs, extractor, workers)
    finally:
        for worker in workers:
            ray.kill(worker)


def _score_all(cfg: Config, specs: list[ModelSpec], extractor: FeatureExtractor,
               workers) -> list[dict[str, Any]]:
    import ray

    # Samples first (actors work through their queues while reference statistics are looked up).
    sketches = {s.sketches_uri: s.sketches_uri if layout.sketch_set_exists(s.sketches_uri) else None
                for s in specs if s.sketches_uri}  # sketch fidelity where the sketch set is stored
    pending = [workers[i % len(workers)].model_features.remote(s.source, s.n, s.target_class,
                                                                sketches.get(s.sketches_uri))
               for i, s in enumerate(specs)]
    refs: dict[str, ReferenceStats] = {}
    pr_real: dict[str, np.ndarray] = {}  # VGG-16 features of the evaluation sets, with eval.vgg_weights
    for i, uri in enumerate(dict.fromkeys(s.evalset for s in specs)):
        worker = workers[i % len(workers)]
        compute = lambda u, p, w=worker: ray.get(w.evalset_features.remote(u, p))
        # the test part: training chose checkpoints (and the champion) on the validation part
        refs[uri] = reference_stats(cfg, uri, extractor, compute_features=compute, part=TEST_PART)
        if cfg.eval.vgg_weights:
            pr_real[uri] = ray.get(worker.evalset_pr_features.remote(uri, TEST_PART))
    rows, bar = [], Progress("benchmark", len(specs), unit="model")
    for spec, future in zip(specs, pending):
        try:
            got = ray.get(future)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            raise BenchmarkError(f"model {spec.label}: sampling failed: {cause}") from None
        start = time.perf_counter()
        fid, kid = score(got["feats"], refs[spec.evalset], cfg)
        if "pr_feats" in got:
            precision, recall = precision_recall(pr_real[spec.evalset], got["pr_feats"], k=cfg.eval.pr_k)
        else:
            precision, recall = precision_recall(refs[spec.evalset].feats, got["feats"], k=cfg.eval.pr_k)
        extra = {k: got[k] for k in ("target_share", "sketch_fidelity", "ppl", "ppl_distance")
                 if got.get(k) is not None}
        rows.append({"model": spec.label, "version": spec.version, "category": spec.category,
                     "sketch_set": spec.sketch_set, "n": spec.n, "fid": fid, "kid": kid, "precision": precision,
                     "recall": recall, "seconds": round(got["seconds"] + time.perf_counter() - start, 3),
                     "evalset": spec.evalset, "baseline": spec.baseline, **extra})
        log.debug("benchmark: %s%s FID %.4f KID %.6f (%d samples)", spec.label,
                  f" v{spec.version}" if spec.version else "", fid, kid, spec.n)
        bar.update_to(len(rows), spec.label)
    bar.close()
    return rows


# -------------------------------------------------------------------------------------------------- MLflow
def _metric_name(row: dict[str, Any]) -> str:
    text = f"{row['model']}_v{row['version']}" if row["version"] else row["model"]
    return "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in text)


def log_to_mlflow(cfg: Config, rows: list[dict[str, Any]], files: dict[str, bytes],
                  extractor: FeatureExtractor) -> str:
    """Log the benchmark as one MLflow run (params, FID/KID per model, result files); returns its id."""
    import tempfile
    from pathlib import Path

    from pipeline.registry import tracking

    client = tracking.client(cfg)  # registry.tracking_uri, else MLFLOW_TRACKING_URI, else the local store
    experiment_id = tracking.ensure_experiment(client, cfg)
    run = client.create_run(experiment_id, run_name=f"benchmark-{cfg.eval.name}",
                            tags={"sketchgan.kind": "benchmark", "sketchgan.benchmark": cfg.eval.name})
    run_id = run.info.run_id
    try:
        params = {"benchmark": cfg.eval.name, "extractor": extractor.name,
                  "extractor_version": extractor.version, "protocol": PROTOCOL, "models": len(rows),
                  "seed": cfg.eval.seed, "truncation": cfg.eval.truncation,
                  "kid_subsets": cfg.eval.kid_subsets, "kid_subset_size": cfg.eval.kid_subset_size,
                  "pr_k": cfg.eval.pr_k, "pr_features": "vgg16-fc2" if cfg.eval.vgg_weights else extractor.name,
                  "evalset_part": TEST_PART}
        for key, value in params.items():
            client.log_param(run_id, key, value)
        for row in rows:
            for key in ("fid", "kid", "precision", "recall", "ppl", "sketch_fidelity"):
                if row.get(key) is not None:
                    client.log_metric(run_id, f"{key}.{_metric_name(row)}", row[key])
        with tempfile.TemporaryDirectory() as tmp:
            for fname, data in files.items():
                (Path(tmp) / fname).write_bytes(data)
            client.log_artifacts(run_id, tmp, artifact_path="benchmark")
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def record_version_fids(cfg: Config, specs: list[ModelSpec], rows: list[dict[str, Any]]) -> None:
    registered = [(s, r) for s, r in zip(specs, rows) if s.registry_name and s.version and not s.baseline]
    if not registered:
        return
    from pipeline.registry import mlflow_registry

    for spec, row in registered:
        figures = {k: row[k] for k in ("precision", "recall", "ppl", "sketch_fidelity") if row.get(k) is not None}
        mlflow_registry.set_version_fid(spec.registry_name, spec.version, row["fid"], cfg, figures)


def add_baseline_fids(rows: list[dict[str, Any]]) -> None:
    """Give every row that is not the baseline ``fid_base`` (the baseline's FID on the row's evaluation set) and,
    where both have one, ``sketch_fidelity_base``."""
    base = {r["evalset"]: r for r in rows if r.get("baseline")}
    if base:
        for r in rows:
            b = base.get(r["evalset"])
            if not r.get("baseline"):
                r["fid_base"] = b["fid"] if b else None
                if b and b.get("sketch_fidelity") is not None and r.get("sketch_fidelity") is not None:
                    r["sketch_fidelity_base"] = b["sketch_fidelity"]


# --------------------------------------------------------------------------------------------------- entry
def benchmark(cfg: Config) -> list[dict[str, Any]]:
    """Run the configured benchmark end to end; returns the result rows."""
    specs = resolve_models(cfg)
    specs += resolve_baseline(cfg, specs)
    for uri in dict.fromkeys(s.evalset for s in specs):
        evalset_id(uri)  # a missing or incomplete evaluation set fails before any sampling starts
    import torch

    # The driver only needs the extractor's identity (cache keys); building it also checks its weights early.
    extractor = build_extractor(cfg.eval, torch.device("cpu"))
    rows = run_benchmark(cfg, specs, extractor)
    bad = [r["model"] for r in rows if not math.isfinite(r["fid"])]
    if bad:
        raise BenchmarkError(f"FID is not finite for model(s) {', '.join(bad)}")
    add_baseline_fids(rows)
    from pipeline.eval.compare import compare_figure

    files = publish(cfg, rows, compare_figure(cfg, specs))
    if cfg.eval.log_mlflow:
        try:
            run_id = log_to_mlflow(cfg, rows, files, extractor)
            record_version_fids(cfg, specs, rows)
        except BenchmarkError:
            raise
        except Exception as exc:  # noqa: BLE001 - results are safe in storage; say what failed
            out = layout.benchmark_uri(cfg, cfg.eval.name)
            raise BenchmarkError(f"results are in {out}, but logging to MLflow failed: {exc}") from exc
        log.info("benchmark: logged to MLflow run %s", run_id)
    return rows
