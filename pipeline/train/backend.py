"""Which torch backend Ray Train sets up on the workers.

Several workers need a ``torch.distributed`` process group (gradients are averaged over it). A single worker
does not: every collective in the loop is skipped when the world has one member. Ray Train's `TorchConfig`
still creates a gloo group for it, whose TCP loop thread wakes ~100 times a second beside the training
threads; `torch_config_for` leaves the group out for one worker and keeps everything else `TorchConfig` does
(setting the worker's CUDA device).
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.train.backend import Backend
from ray.train.torch import TorchConfig


class NoProcessGroupBackend(Backend):
    """A backend whose hooks do nothing: the worker runs without a ``torch.distributed`` process group."""


@dataclass
class SingleWorkerTorchConfig(TorchConfig):
    """`TorchConfig` without the process group, for a one-worker run."""

    @property
    def backend_cls(self):
        return NoProcessGroupBackend


def torch_config_for(num_workers: int) -> TorchConfig:
    """Ray Train's default `TorchConfig` for data-parallel runs; no process group for a single worker."""
    if num_workers < 1:
        raise ValueError(f"train.num_workers must be at least 1, got {num_workers}")
    return SingleWorkerTorchConfig() if num_workers == 1 else TorchConfig()
