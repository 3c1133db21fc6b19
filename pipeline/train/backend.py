"""Which torch backend Ray Train sets up on the workers.

Several workers need a ``torch.distributed`` process group (gradients are averaged over it): Ray Train's
`TorchConfig`. A single worker does not: every collective in the loop is skipped when the world has one
member, and `TorchConfig` would still create a gloo group whose TCP loop thread wakes ~100 times a second beside
the training threads. `torch_config_for` gives one worker `SingleWorkerConfig` instead: no process group, the
worker's CUDA device set as `TorchConfig` sets it, and no torch in this module. That last point matters because
Ray Train's controller (one process per run) unpickles the backend config: `TorchConfig`'s module imports torch,
which costs every controller ≈ 400 MiB for nothing (benchmarks/README.md, "Packed customisations").
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.util import TrainingFramework


class NoProcessGroupBackend(Backend):
    """A backend whose hooks do nothing: the worker runs without a ``torch.distributed`` process group."""


class WorkerDeviceContext:
    """Around the training function on a worker: a GPU worker's device becomes torch's current one (what
    `TorchConfig`'s context does). torch is imported here, in the worker, never where the config is unpickled."""

    def __enter__(self) -> None:
        import torch

        if torch.cuda.is_available():
            import ray.train.torch

            device = ray.train.torch.get_device()
            if device.type == "cuda":
                torch.cuda.set_device(device)

    def __exit__(self, *exc) -> bool:
        return False


@dataclass
class SingleWorkerConfig(BackendConfig):
    """A one-worker torch run without a process group (and without importing torch where Ray unpickles it)."""

    backend: str | None = None  # `TorchTrainer` fills in gloo or nccl; unused without a process group

    @property
    def backend_cls(self):
        return NoProcessGroupBackend

    @property
    def train_func_context(self):
        return WorkerDeviceContext

    @property
    def framework(self):
        return TrainingFramework.TORCH


def torch_config_for(num_workers: int) -> BackendConfig:
    """Ray Train's default `TorchConfig` for data-parallel runs; `SingleWorkerConfig` for a single worker."""
    if num_workers < 1:
        raise ValueError(f"train.num_workers must be at least 1, got {num_workers}")
    if num_workers == 1:
        return SingleWorkerConfig()
    from ray.train.torch import TorchConfig

    return TorchConfig()
