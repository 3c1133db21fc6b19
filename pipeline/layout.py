"""The storage contract: where each stage keeps its artefacts below the root, every name inside them, and typed
readers for them. No other module spells these names.

```
<root>/datasets/<category>/   pairs/category=<c>/*.parquet, errors/*.parquet, manifest.json
<root>/sketchsets/<name>/     sketches.parquet (id, sketch PNG, size), manifest.json
<root>/evalsets/<name>/       images.parquet (id, image PNG, size, distance), manifest.json
<root>/runs/<run>/            run.json, metrics.jsonl, samples/iter-<n>.png,
                              checkpoints/{ckpt-<n>.pt, latest.json, best.pt, best.json, best-G-<n>.pth},
                              final/{G.pth, G_best.pth, D.pth | D_sketch.pth, D_image.pth, metadata.json}
<root>/fid-stats/<hash>.npz   cached reference statistics
<root>/benchmarks/<name>/     results.{parquet,csv,md,json}, fid.png
<root>/tune/<sweep>/          Ray Tune's experiment state
<root>/ray-train/             Ray Train's own (small) state
<root>/mlflow/                the embedded MLflow store (local roots only)
<root>/synthetic/             generated LSUN-format data for the demo and tests
<base folder>/                G.pth, D.pth, metadata.json, ganspace-<sha12>.npz (GANSpace components of the
                              G.pth whose sha256 starts with <sha12>)
```

A multi-file artefact is complete when its marker exists (``manifest.json``, or ``final/metadata.json`` for a
run); writers publish the marker last (`storage.staged_publish`), readers refuse an artefact without it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pipeline import storage
from pipeline.config import Config
from pipeline.names import validate_name
from pipeline.storage import join

MANIFEST = "manifest.json"
PAIRS, ERRORS = "pairs", "errors"
SKETCHES = "sketches.parquet"
EVALSET_IMAGES = "images.parquet"
RUN_INFO, METRICS, SAMPLES, CHECKPOINTS, FINAL = "run.json", "metrics.jsonl", "samples", "checkpoints", "final"
FINAL_METADATA = "metadata.json"
G_FILE, D_FILE, D_SKETCH_FILE, D_IMAGE_FILE = "G.pth", "D.pth", "D_sketch.pth", "D_image.pth"
G_BEST_FILE = "G_best.pth"  # the generator at the best validation FID, beside the last one
BENCHMARK_FILES = {"parquet": "results.parquet", "csv": "results.csv", "markdown": "results.md",
                   "json": "results.json", "chart": "fid.png", "compare": "compare.png"}


class ArtifactError(ValueError):
    """An artefact that is missing, incomplete or unreadable; the message names its URI."""


class DatasetError(ArtifactError):
    """A preprocessed dataset that cannot be used."""


class SketchSetError(ArtifactError):
    """A sketch set that cannot be created or read; the message names the culprit."""


class EvalSetError(ArtifactError):
    """An evaluation set that cannot be created or read; the message names the culprit."""


# -- where artefacts live below the root ----------------------------------------------------------------------
def dataset_uri(cfg: Config, category: str | None = None) -> str:
    if cfg.data.dataset and category in (None, cfg.data.category):
        return cfg.data.dataset
    return join(cfg.storage.root, "datasets", validate_name(category or cfg.data.category, "category"))


def sketchset_uri(cfg: Config, name: str) -> str:
    return join(cfg.storage.root, "sketchsets", validate_name(name, "sketch set name"))


def evalset_uri(cfg: Config, name: str) -> str:
    return join(cfg.storage.root, "evalsets", validate_name(name, "evaluation set name"))


def run_uri(cfg: Config, run_name: str) -> str:
    return join(cfg.storage.root, "runs", validate_name(run_name, "run name"))


def fid_stats_uri(cfg: Config, key: str) -> str:
    return join(cfg.storage.root, "fid-stats", f"{validate_name(key, 'statistics key')}.npz")


def benchmark_uri(cfg: Config, name: str) -> str:
    return join(cfg.storage.root, "benchmarks", validate_name(name, "benchmark name"))


def tune_uri(cfg: Config) -> str:
    return join(cfg.storage.root, "tune", validate_name(cfg.tune.name, "sweep name"))


def ray_train_uri(cfg: Config) -> str:
    return join(cfg.storage.root, "ray-train")


def mlflow_uri(cfg: Config) -> str:
    return join(cfg.storage.root, "mlflow")


def synthetic_uri(cfg: Config) -> str:
    return join(cfg.storage.root, "synthetic")


# -- names inside artefacts -----------------------------------------------------------------------------------
def manifest_uri(artefact_uri: str) -> str:
    return join(artefact_uri, MANIFEST)


def pairs_uri(dataset: str) -> str:
    return join(dataset, PAIRS)


def pairs_part(category: str, part: str) -> str:
    """A pairs file's path inside a dataset (Hive-style partition by category)."""
    return f"{PAIRS}/category={category}/{part}"


def errors_part(part: str) -> str:
    return f"{ERRORS}/{part}"


def sketches_uri(sketchset: str) -> str:
    return join(sketchset, SKETCHES)


def evalset_images_uri(evalset: str) -> str:
    return join(evalset, EVALSET_IMAGES)


def run_info_uri(run: str) -> str:
    return join(run, RUN_INFO)


def metrics_uri(run: str) -> str:
    return join(run, METRICS)


def samples_uri(run: str) -> str:
    return join(run, SAMPLES)


def sample_uri(run: str, iteration: int) -> str:
    return join(run, SAMPLES, f"iter-{iteration:08d}.png")


def checkpoints_uri(run: str) -> str:
    return join(run, CHECKPOINTS)


def checkpoint_uri(run: str, iteration: int, name: str | None = None) -> str:
    """``ckpt-<iteration>.pt`` (rotated), or ``<name>.pt`` kept outside the rotation (e.g. ``best``)."""
    return join(run, CHECKPOINTS, f"{name}.pt" if name else f"ckpt-{iteration:08d}.pt")


def is_rotated_checkpoint(uri: str) -> bool:
    name = uri.rsplit("/", 1)[-1]
    return name.startswith("ckpt-") and name.endswith(".pt")


def best_generator_uri(run: str, iteration: int) -> str:
    """The published generator of the best checkpoint, at ``iteration`` (copied to the final output)."""
    return join(run, CHECKPOINTS, f"best-G-{iteration:08d}.pth")


def checkpoint_pointer_uri(run: str, name: str | None = None) -> str:
    return join(run, CHECKPOINTS, f"{name or 'latest'}.json")


def final_uri(run: str, name: str | None = None) -> str:
    return join(run, FINAL, name) if name else join(run, FINAL)


def final_metadata_uri(run: str) -> str:
    return join(run, FINAL, FINAL_METADATA)


PROJECTED_LATENT, RECONSTRUCTION, PROJECTION_COMPARE = "latent.pt", "reconstruction.png", "compare.png"


def ganspace_uri(base_g_uri: str, base_g_sha256: str) -> str:
    """GANSpace components of a base generator, beside it and named by its content hash (stale files for other
    weights are never picked up)."""
    folder = base_g_uri.rsplit("/", 1)[0] if "/" in base_g_uri else "."
    return join(folder, f"ganspace-{base_g_sha256[:12]}.npz")


def checkpoint_metadata_uri(g_uri: str) -> str:
    """The metadata beside a G checkpoint (``final/metadata.json`` next to ``final/G.pth``)."""
    return join(g_uri.rsplit("/", 1)[0], FINAL_METADATA) if "/" in g_uri else FINAL_METADATA


def run_name_of_checkpoint(g_uri: str) -> str:
    """``<run>`` for ``.../<run>/final/G.pth``, else the file's name."""
    parts = g_uri.rstrip("/").split("/")
    return parts[-3] if len(parts) >= 3 and parts[-2] == FINAL else parts[-1]


def benchmark_file(benchmark: str, kind: str) -> str:
    return join(benchmark, BENCHMARK_FILES[kind])


# -- typed readers --------------------------------------------------------------------------------------------
def manifest_id(manifest: dict) -> str | None:
    """An artefact's content id (older datasets call it ``fingerprint``)."""
    return manifest.get("id") or manifest.get("fingerprint")


@dataclass
class Manifested:
    """A complete artefact: where it is and its manifest."""

    uri: str
    manifest: dict[str, Any]

    @property
    def id(self) -> str | None:
        return manifest_id(self.manifest)


@dataclass
class Dataset(Manifested):
    """A complete preprocessed dataset."""

    @property
    def pairs_uri(self) -> str:
        return pairs_uri(self.uri)


def open_dataset(uri: str, need_pairs: bool = True) -> Dataset:
    """The dataset at ``uri``; refused (naming it) when incomplete or, with ``need_pairs``, without pairs."""
    if not storage.exists(manifest_uri(uri)):
        raise DatasetError(f"dataset {uri} is missing or incomplete (no {MANIFEST}): run `sketchgan preprocess` "
                           "first")
    if need_pairs and not storage.list_files(pairs_uri(uri), suffix=".parquet"):
        raise DatasetError(f"dataset {uri} has no image/sketch pairs under {pairs_uri(uri)}")
    return Dataset(uri, storage.read_json(manifest_uri(uri)))


@dataclass
class SketchSet(Manifested):
    """A stored sketch set: its manifest and the encoded sketches (``ids[i]`` names ``blobs[i]``)."""

    ids: list[str] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.manifest.get("name") or self.uri.rstrip("/").rsplit("/", 1)[-1]


def publish_table_set(out: str, table_name: str, table, manifest: dict[str, Any]) -> None:
    """Publish a one-table artefact (a sketch set: `SKETCHES`; an evaluation set: `EVALSET_IMAGES`) whole,
    replacing what was at ``out``; the manifest goes last."""
    with storage.staged_publish(out, marker=MANIFEST) as staging:
        storage.write_parquet(join(staging, table_name), table)
        storage.write_json(manifest_uri(staging), manifest)


def sketch_set_exists(uri: str) -> bool:
    return storage.exists(manifest_uri(uri))


def read_sketch_set(uri: str, name: str | None = None) -> SketchSet:
    """The sketch set at ``uri`` (``name`` only labels errors); refused when missing, unreadable or empty."""
    label = repr(name) if name else uri
    if not storage.exists(manifest_uri(uri)) or not storage.exists(sketches_uri(uri)):
        raise SketchSetError(f"sketch set {label} not found at {uri} (no {MANIFEST} or {SKETCHES}): create it "
                             "with `sketchgan sketchset create`")
    manifest = storage.read_json(manifest_uri(uri))
    if int(manifest.get("count", 0) or 0) <= 0:
        raise SketchSetError(f"sketch set {label} at {uri} is empty (manifest count 0)")
    try:
        table = storage.read_parquet(sketches_uri(uri), ["id", "sketch"])
    except (OSError, KeyError, ValueError) as exc:
        raise SketchSetError(f"sketch set {label}: cannot read columns 'id' and 'sketch' of {sketches_uri(uri)} "
                             f"({exc})") from None
    ids, blobs = table.column("id").to_pylist(), table.column("sketch").to_pylist()
    if not blobs:
        raise SketchSetError(f"sketch set {label} at {uri} is empty (no rows)")
    return SketchSet(uri, manifest, [str(i) for i in ids], [b or b"" for b in blobs])


@dataclass
class EvalSet(Manifested):
    """A complete evaluation set (real images for FID)."""

    @property
    def images_uri(self) -> str:
        return evalset_images_uri(self.uri)


def evalset_exists(uri: str) -> bool:
    return storage.exists(manifest_uri(uri))


def open_evalset(uri: str) -> EvalSet:
    """The evaluation set at ``uri``; refused, naming it, when missing, incomplete or unreadable."""
    if not storage.exists(manifest_uri(uri)):
        if storage.exists(evalset_images_uri(uri)):
            raise EvalSetError(f"evaluation set {uri}: incomplete (no {MANIFEST})")
        raise EvalSetError(f"evaluation set {uri}: not found (no {MANIFEST} or {EVALSET_IMAGES})")
    try:
        manifest = storage.read_json(manifest_uri(uri))
    except (ValueError, OSError) as exc:
        raise EvalSetError(f"evaluation set {uri}: unreadable {MANIFEST} ({exc})") from None
    return EvalSet(uri, manifest if isinstance(manifest, dict) else {})


@dataclass
class FinishedRun:
    """A training run that finished: its final metadata (``arch``, ``config``, lineage, metrics)."""

    uri: str
    metadata: dict[str, Any]

    @property
    def g_uri(self) -> str:
        return final_uri(self.uri, G_FILE)

    @property
    def d_uri(self) -> str:
        return final_uri(self.uri, D_FILE)


def finished_run(uri: str) -> FinishedRun | None:
    """The run at ``uri`` if it finished (its final metadata exists), else None."""
    meta = final_metadata_uri(uri)
    return FinishedRun(uri, storage.read_json(meta)) if storage.exists(meta) else None


def open_finished_run(uri: str, purpose: str = "") -> FinishedRun:
    """The finished run at ``uri``; refused, naming the missing file, when it has not finished."""
    run = finished_run(uri)
    if run is None:
        raise FileNotFoundError(f"run {uri} has not finished: {final_metadata_uri(uri)} does not exist"
                                + (f" ({purpose})" if purpose else ""))
    return run


def read_run_info(uri: str) -> dict[str, Any] | None:
    """What a run recorded when it started (``run.json``), or None."""
    info = run_info_uri(uri)
    return storage.read_json(info) if storage.exists(info) else None


def read_metrics(run_uri: str) -> list[dict]:
    """The run's logged metric rows (empty when it has logged nothing yet)."""
    uri = metrics_uri(run_uri)
    rows = []
    if storage.exists(uri):
        for n, line in enumerate(storage.read_text(uri).splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{uri} line {n}: not valid JSON ({exc})") from None
    return rows


def sample_iterations(run_uri: str) -> list[int]:
    """The iterations at which the run wrote a sample grid (``samples/iter-<n>.png``), ascending."""
    found = []
    for uri in storage.list_files(samples_uri(run_uri), suffix=".png"):
        stem = uri.rsplit("/", 1)[-1][: -len(".png")]
        if stem.startswith("iter-") and stem[5:].isdigit():
            found.append(int(stem[5:]))
    return sorted(found)


def stored_names(cfg: Config, kind: str) -> list[str]:
    """Names of the complete artefacts of one kind below the root (``sketchsets``, ``benchmarks``...)."""
    marker = MANIFEST if kind != "benchmarks" else BENCHMARK_FILES["json"]
    top = join(cfg.storage.root, kind)
    names = {uri[len(top):].strip("/").split("/")[0] for uri in storage.list_files(top, suffix=marker)}
    return sorted(n for n in names if n)
