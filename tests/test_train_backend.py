"""Which torch backend a Ray Train run gets (pure: no Ray cluster started)."""

import subprocess
import sys

import pytest
import ray.cloudpickle
from ray.train.torch import TorchConfig

from pipeline.train.backend import NoProcessGroupBackend, SingleWorkerConfig, WorkerDeviceContext, torch_config_for


def test_one_worker_runs_without_a_process_group():
    cfg = torch_config_for(1)
    assert isinstance(cfg, SingleWorkerConfig) and cfg.backend_cls is NoProcessGroupBackend
    assert cfg.framework == TorchConfig().framework  # Ray's state export still says torch
    assert cfg.train_func_context is WorkerDeviceContext
    with cfg.train_func_context():  # on a CPU worker: nothing to set, nothing raised
        pass


def test_a_single_worker_config_unpickles_without_torch():
    # what Ray Train's controller does with it: TorchConfig's module would load torch (~400 MiB per run)
    blob = ray.cloudpickle.dumps(torch_config_for(1))
    code = ("import sys, ray.cloudpickle; cfg = ray.cloudpickle.loads(sys.stdin.buffer.read()); "
            "print(type(cfg).__name__, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, check=True, timeout=120)
    assert out.stdout.decode().split() == ["SingleWorkerConfig", "False"]


def test_several_workers_get_ray_trains_torch_process_group():
    cfg = torch_config_for(2)
    assert isinstance(cfg, TorchConfig) and cfg.backend_cls is TorchConfig().backend_cls
    assert cfg.backend_cls is not NoProcessGroupBackend


def test_zero_workers_is_a_config_error():
    with pytest.raises(ValueError, match="train.num_workers"):
        torch_config_for(0)
