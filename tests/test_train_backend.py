"""Which torch backend a Ray Train run gets (pure: no Ray cluster started)."""

import pytest
from ray.train.torch import TorchConfig

from pipeline.train.backend import NoProcessGroupBackend, torch_config_for


def test_one_worker_runs_without_a_process_group():
    cfg = torch_config_for(1)
    assert cfg.backend_cls is NoProcessGroupBackend
    # everything else TorchConfig does on the worker (its CUDA device) is kept
    assert cfg.train_func_context is TorchConfig().train_func_context


def test_several_workers_get_ray_trains_torch_process_group():
    cfg = torch_config_for(2)
    assert cfg.backend_cls is TorchConfig().backend_cls
    assert cfg.backend_cls is not NoProcessGroupBackend


def test_zero_workers_is_a_config_error():
    with pytest.raises(ValueError, match="train.num_workers"):
        torch_config_for(0)
