"""Where each stage keeps its data below the storage root (one place, so stages agree).

```
<root>/datasets/<category>/   pairs/category=<c>/*.parquet, errors/*.parquet, manifest.json
<root>/sketchsets/<name>/     sketches.parquet, manifest.json
<root>/evalsets/<name>/       images.parquet, manifest.json
<root>/runs/<run>/            checkpoints/, samples/, metrics.jsonl, final/{G.pth, metadata.json}
<root>/fid-stats/<hash>.npz   cached reference statistics
<root>/benchmarks/<name>/     results.{parquet,csv,md}, fid.png
<root>/mlflow/                the embedded MLflow store (local roots only)
<root>/synthetic/             generated LSUN-format data for the demo and tests
```
"""

from __future__ import annotations

from pipeline.config import Config
from pipeline.names import validate_name
from pipeline.storage import join


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


def synthetic_uri(cfg: Config) -> str:
    return join(cfg.storage.root, "synthetic")
