"""What one training run is: the plain, picklable description that the driver plans and every worker receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Config, PretrainConfig, TrainConfig


@dataclass
class RunSpec:
    """Everything a worker needs for one training run; its config was validated once, on the driver."""

    kind: str  # "pretrain" | "train"
    run_name: str
    run_uri: str
    cfg: Config = field(repr=False)  # its repr would show every setting, locations with credentials included
    sketch_set: dict[str, Any] = field(default_factory=dict)  # name, uri, id, count (train only)
    dataset_manifest_id: str | None = None
    base_g_sha256: str | None = None
    resume_from: str | None = None  # a checkpoint URI to start from when the run has none of its own
    evalset_uri: str | None = None  # real images for FID at intervals (train.eval_every)

    @property
    def section(self) -> PretrainConfig | TrainConfig:
        """The config section that drives this run (``pretrain`` or ``train``)."""
        return self.cfg.pretrain if self.kind == "pretrain" else self.cfg.train

    @property
    def config(self) -> dict[str, Any]:
        """The config as JSON-ready data (what the start record, checkpoints and final metadata keep)."""
        return self.cfg.model_dump(mode="json")

    def fingerprints(self) -> dict[str, Any]:
        """The inputs a checkpoint was made from (a continuation must use the same)."""
        return {"sketch_set": self.sketch_set.get("id"), "dataset": self.dataset_manifest_id,
                "base_g_sha256": self.base_g_sha256}


@dataclass
class TestHooks:
    """Fault injection for tests only (never part of the public config): die once at an iteration."""

    crash_at: int | None = None
    crash_marker: str | None = None  # the crash happens only while this file does not exist
