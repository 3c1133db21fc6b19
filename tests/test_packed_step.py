"""A packed step (K customisations of one base in one step) against K separate `GANSketchingStep` runs.

Compared in float64: the packed step does the same arithmetic as separate runs, but its batched synthesis and
sketcher passes sum in another order, and in float32 that rounding noise is amplified by Adam (which scales
near-zero gradients up to lr-sized steps) and by the GAN game: measured over 50 iterations, the lanes' losses
drift from separate runs by 2e-5 to 1e-1 in float32, and by at most 3.5e-13 in float64. A wrong lane (a shared
random stream, a mis-sliced batch, a gradient crossing lanes) differs by far more than 1e-9 at once.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.models import factory
from pipeline.models.sketchers import build_sketcher
from pipeline.train.objective import GANSketchingStep
from pipeline.train.packed import PackedGANSketchingStep, PackingError
from pipeline.train.step_base import ObjectiveConfig

ARCH = factory.generator_kwargs(ModelConfig(size=32, style_dim=32, n_mlp=2, channel_max=16))
BATCH, ITERATIONS = 2, 50


@pytest.fixture(scope="module", autouse=True)
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.fixture(scope="module")
def base(float64):
    torch.manual_seed(3)
    return factory.build_generator(ARCH), factory.build_discriminator(ARCH), factory.build_discriminator(ARCH)


def batches(lane: int, n: int = ITERATIONS) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each lane's own real images and user sketches, one batch per iteration."""
    g = torch.Generator().manual_seed(100 + lane)
    real = [torch.rand(BATCH, 3, 32, 32, generator=g) * 2 - 1 for _ in range(n)]
    sketch = [(torch.rand(BATCH, 1, 32, 32, generator=g) > 0.9).to(torch.get_default_dtype()) * -2 + 1
              for _ in range(n)]
    return real, sketch


def separate_run(base, cfg: ObjectiveConfig, seed: int, lane: int, iterations: int = ITERATIONS
                 ) -> tuple[list[dict], dict]:
    G, D_s, D_i = (copy.deepcopy(m) for m in base)
    step = GANSketchingStep(G, D_s, D_i, build_sketcher("edges", None), cfg, seed=seed)
    real, sketch = batches(lane, iterations)
    logs = [step.step(it, real[it], sketch[it]) for it in range(iterations)]
    return logs, step.state_dict()


def packed_run(base, cfg: ObjectiveConfig, seeds: list[int], iterations: int = ITERATIONS
               ) -> tuple[list[list[dict]], PackedGANSketchingStep]:
    G, D_s, D_i = base
    step = PackedGANSketchingStep(copy.deepcopy(G), [copy.deepcopy(D_s) for _ in seeds],
                                  [copy.deepcopy(D_i) for _ in seeds], build_sketcher("edges", None), cfg,
                                  seeds=seeds)
    data = [batches(k, iterations) for k in range(len(seeds))]
    logs = [step.step(it, [d[0][it] for d in data], [d[1][it] for d in data]) for it in range(iterations)]
    return logs, step


def assert_states_close(packed: dict, separate: dict, atol: float, what: str) -> None:
    assert set(packed) == set(separate), what
    for net in ("G", "D_sketch", "D_image", "G_ema"):
        for name, t in separate.get(net, {}).items():
            diff = (packed[net][name].float() - t.float()).abs().max().item()
            assert diff <= atol, f"{what}: {net}.{name} differs by {diff:.3g}"


def test_each_lane_follows_its_separate_run(base):
    # the paper's defaults (mapping only, λ_image 0.7, R1 every 16: at 0, 16, 32, 48), the weight regulariser
    # and a running average of G (its mapping network's, per lane)
    cfg = ObjectiveConfig(lambda_weight=0.5, ema_beta=0.9)
    seeds = [0, 7, 11]
    packed_logs, packed = packed_run(base, cfg, seeds)
    for k, seed in enumerate(seeds):
        logs, state = separate_run(base, cfg, seed, k)
        for it in range(ITERATIONS):
            assert set(logs[it]) == set(packed_logs[it][k])
            for key, value in logs[it].items():
                assert packed_logs[it][k][key] == pytest.approx(value, rel=1e-9, abs=1e-9), (k, it, key)
        lane = packed.lane_state_dict(k)
        assert_states_close(lane, state, 1e-9, f"lane {k}")
        # the lanes drew exactly what the separate runs drew (latents, mixing, augmentation, noise)
        assert torch.equal(lane["rng"]["gen"], state["rng"]["gen"])
        assert torch.equal(lane["rng"]["torch"], state["rng"]["torch"])
        assert lane["rng"]["py"] == state["rng"]["py"]
    # and the lanes did learn apart: different sketches, different mapping networks
    a, b = packed.lane_generator_state(0), packed.lane_generator_state(1)
    assert not torch.equal(a["style.1.weight"], b["style.1.weight"])


def test_one_lane_is_the_separate_step_bit_for_bit(base):
    cfg = ObjectiveConfig()
    logs, state = separate_run(base, cfg, 5, 0, iterations=20)
    packed_logs, packed = packed_run(base, cfg, [5], iterations=20)
    assert [p[0] for p in packed_logs] == logs
    lane = packed.lane_state_dict(0)
    for net in ("G", "D_sketch", "D_image"):
        for name, t in state[net].items():
            assert torch.equal(lane[net][name], t), f"{net}.{name}"


def test_a_lane_checkpoint_resumes_as_a_separate_run_and_back(base):
    cfg = ObjectiveConfig()
    _, packed = packed_run(base, cfg, [0, 7], iterations=3)
    G, D_s, D_i = (copy.deepcopy(m) for m in base)
    alone = GANSketchingStep(G, D_s, D_i, build_sketcher("edges", None), cfg, seed=123)
    alone.load_state_dict(packed.lane_state_dict(1))  # a separate step takes a lane's checkpoint
    fresh = PackedGANSketchingStep(copy.deepcopy(base[0]), [copy.deepcopy(base[1]) for _ in range(2)],
                                   [copy.deepcopy(base[2]) for _ in range(2)], build_sketcher("edges", None), cfg,
                                   seeds=[1, 2])
    fresh.load_lane_state_dict(1, alone.state_dict())  # and a lane takes a separate step's
    assert_states_close(fresh.lane_state_dict(1), packed.lane_state_dict(1), 0.0, "round trip")


def test_what_cannot_pack_is_refused(base):
    G, D_s, D_i = base
    with pytest.raises(PackingError, match="trained='all' cannot be packed"):
        PackedGANSketchingStep(copy.deepcopy(G), [D_s], [D_i], build_sketcher("edges", None),
                               ObjectiveConfig(trained="all"))
    other = factory.build_generator(ARCH)  # another base: its synthesis differs
    _, packed = packed_run(base, ObjectiveConfig(), [0], iterations=1)
    stranger = PackedGANSketchingStep(other, [copy.deepcopy(D_s)], [copy.deepcopy(D_i)],
                                      build_sketcher("edges", None), ObjectiveConfig(), seeds=[0])
    with pytest.raises(PackingError, match="only customisations of one base pack together"):
        stranger.load_lane_state_dict(0, packed.lane_state_dict(0))
