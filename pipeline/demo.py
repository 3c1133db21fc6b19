"""`sketchgan demo`: the whole pipeline on generated data on this machine (embedded default)."""

from __future__ import annotations

import importlib.util

from pipeline.config import Config

STAGES = [
    ("synthetic data", "pipeline.data.synthetic"),
    ("preprocess", "pipeline.data.preprocess"),
    ("sketch set", "pipeline.data.sketchsets"),
    ("evaluation set", "pipeline.data.evalsets"),
    ("pretrain + train", "pipeline.train.trainer"),
    ("tune", "pipeline.tune.sweep"),
    ("registry", "pipeline.registry.mlflow_registry"),
    ("benchmark", "pipeline.eval.benchmark"),
]


def cli_main(cfg: Config, args) -> int:
    missing = [name for name, module in STAGES if importlib.util.find_spec(module) is None]
    built = [name for name, _ in STAGES if name not in missing]
    print(f"demo: stages built: {', '.join(built) or 'none'}")
    if missing:
        print(f"demo: stages not built yet: {', '.join(missing)}")
    return 0
