import io

import pytest
import torch

from pipeline.models.sketchers import build_sketcher
from pipeline.models.stylegan2 import Discriminator, Generator
from pipeline.train.losses import apply_transform, d_loss, g_loss, parse_transform, r1_penalty, weight_loss
from pipeline.train.objective import GANSketchingStep
from pipeline.train.step_base import ObjectiveConfig
from pipeline.train.stylegan2_step import StyleGAN2Step

SIZE = 32


@pytest.fixture(autouse=True)
def one_thread():
    # tiny networks gain nothing from a second thread, and the suite shares the machine
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def tiny(seed=0, w_shift=False):
    torch.manual_seed(seed)
    G = Generator(SIZE, style_dim=32, n_mlp=2, channel_max=16, w_shift=w_shift)
    return G, Discriminator(SIZE, channel_max=16), Discriminator(SIZE, channel_max=16)


def make_step(seed=0, **kw):
    G, Ds, Di = tiny(seed, w_shift=kw.get("trained") == "w_shift")
    cfg = ObjectiveConfig(**{"r1_every": 4, **kw})
    return GANSketchingStep(G, Ds, Di, build_sketcher("edges"), cfg, seed=seed)


def batch(seed=1, n=4):
    g = torch.Generator().manual_seed(seed)
    real = torch.rand(n, 3, SIZE, SIZE, generator=g) * 2 - 1
    sketches = torch.where(torch.rand(n, 1, SIZE, SIZE, generator=g) > 0.9, -1.0, 1.0)
    return real, sketches


def test_r1_matches_autograd_by_hand():
    D = Discriminator(SIZE, channel_max=8)
    x = torch.randn(4, 3, SIZE, SIZE, requires_grad=True)
    ours = r1_penalty(D(x), x)
    # by hand: per-sample gradient norms, one sample at a time (stddev layer mixes samples, so use a linear D)
    lin = torch.nn.Linear(3 * SIZE * SIZE, 1)
    y = torch.randn(4, 3 * SIZE * SIZE, requires_grad=True)
    expected = lin.weight.square().sum()  # ∇_y (w·y + b) = w for each sample
    assert torch.allclose(r1_penalty(lin(y), y), expected, rtol=1e-5)
    (grad,) = torch.autograd.grad(D(x).sum(), x)
    assert torch.allclose(ours, grad.square().sum([1, 2, 3]).mean(), rtol=1e-5)


def test_weight_loss_value():
    a, b = torch.ones(2, 3), torch.zeros(4)
    assert weight_loss([a, b + 2], [torch.zeros(2, 3), b]).item() == pytest.approx((1 + 2) / 2)


def test_loss_kinds():
    real, fake = torch.tensor([2.0, 3.0]), torch.tensor([-1.0, 0.5])
    assert d_loss(real, fake, "hinge").item() == pytest.approx(0 + (0 + 1.5) / 2)
    assert g_loss(fake, "hinge").item() == pytest.approx(0.25)
    assert d_loss(real, fake, "softplus").item() == pytest.approx(
        (torch.nn.functional.softplus(-real).mean() + torch.nn.functional.softplus(fake).mean()).item())
    # least squares as GANSketching's "ls": MSE to the labels 1 (real) and 0 (fake)
    assert d_loss(real, fake, "lsgan").item() == pytest.approx((1 + 4) / 2 + (1 + 0.25) / 2)
    assert g_loss(fake, "lsgan").item() == pytest.approx((4 + 0.25) / 2)
    with pytest.raises(ValueError, match="'wasserstein'"):
        d_loss(real, fake, "wasserstein")


def test_transform_chains():
    assert parse_transform("down2,toSketch,up2,to3ch") == [("down", 2), ("toSketch", 0), ("up", 2), ("to3ch", 0)]
    with pytest.raises(ValueError, match="'blur'"):
        parse_transform("toSketch,blur")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = apply_transform(x, parse_transform("down2,toSketch,up2,to3ch"), build_sketcher("edges"))
    assert out.shape == (2, 3, 64, 64)
    assert torch.equal(out[:, 0], out[:, 1])


def test_only_the_selected_subset_trains():
    step = make_step()
    before = {k: v.clone() for k, v in step.G.state_dict().items()}
    real, sk = batch()
    step.step(1, real, sk)
    changed = {k for k, v in step.G.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("style.") for k in changed)
    ws = make_step(trained="w_shift")
    assert ws.trained_names == ["style.3.w_shift"]


def test_steps_lower_the_losses():
    step = make_step(seed=3, augment="", mixing=0.0, lr=0.01, trained="all")
    real, sk = batch(n=4)

    def d_losses():
        with torch.no_grad():
            torch.manual_seed(7)
            fake = step.G([torch.randn(4, 32, generator=torch.Generator().manual_seed(9))])[0]
            return (d_loss(step.D_sketch(step.sketch_real(sk)), step.D_sketch(step.sketch_fake(fake))).item(),
                    d_loss(step.D_image(real), step.D_image(fake)).item())

    def g_losses():
        with torch.no_grad():
            torch.manual_seed(7)
            fake = step.G([torch.randn(4, 32, generator=torch.Generator().manual_seed(9))])[0]
            return g_loss(step.D_sketch(step.sketch_fake(fake))).item()

    d0 = d_losses()
    for i in range(1, 6):  # D only: freeze G's optimiser by zero lr
        for group in step.opt_g.param_groups:
            group["lr"] = 0.0
        step.step(i, real, sk)
    d1 = d_losses()
    assert d1[0] < d0[0] and d1[1] < d0[1]
    g0 = g_losses()
    for group in step.opt_g.param_groups:
        group["lr"] = 0.01
    for group in step.opt_d.param_groups:
        group["lr"] = 0.0
    for i in range(6, 12):
        step.step(i, real, sk)
    assert g_losses() < g0


def _state_bytes(step):
    buf = io.BytesIO()
    torch.save(step.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kind", ["gansketching", "gansketching_ema", "stylegan2"])
def test_resume_is_bit_exact(kind):
    def build():
        if kind.startswith("gansketching"):
            ema = {"ema_beta": 0.9} if kind.endswith("ema") else {}
            return make_step(seed=5, augment="translation,cutout,color", lambda_weight=0.1, **ema)
        G, D, _ = tiny(5)
        return StyleGAN2Step(G, D, ObjectiveConfig(r1_every=2, augment="translation", ema_beta=0.9), seed=5)

    data = [batch(seed=s) for s in range(6)]
    straight = build()
    for i, (r, s) in enumerate(data):
        straight.step(i, r, s)
    first = build()
    for i, (r, s) in enumerate(data[:3]):
        first.step(i, r, s)
    saved = _state_bytes(first)
    del first
    torch.manual_seed(12345)  # the resumed process starts from unrelated RNG state
    resumed = build()
    resumed.load_state_dict(saved)
    for i, (r, s) in enumerate(data[3:], start=3):
        resumed.step(i, r, s)
    names = ("G", "G_ema") if kind != "gansketching" else ("G",)
    for name in names:
        a_state, b_state = straight.state_dict()[name], resumed.state_dict()[name]
        assert a_state.keys() == b_state.keys()
        for k in a_state:
            assert torch.equal(a_state[k], b_state[k]), (name, k)


def test_gansketching_ema_is_a_running_average_of_the_tuned_generator():
    step = make_step(seed=3, trained="all", ema_beta=0.75)
    before = {k: v.clone() for k, v in step.G.state_dict().items()}
    step.step(1, *batch())  # iteration 1: no R1
    after, ema = step.G.state_dict(), step.G_ema.state_dict()
    moved = [k for k in after if after[k].is_floating_point() and not torch.equal(after[k], before[k])]
    assert moved, "the step did not change G"
    for k in moved:
        expected = before[k] + 0.25 * (after[k] - before[k])
        assert torch.allclose(ema[k], expected, atol=1e-6), k
    assert make_step(seed=3).G_ema is None  # off by default, as in the paper


def test_gansketching_ema_refuses_a_checkpoint_without_one():
    plain, with_ema = make_step(seed=3), make_step(seed=3, ema_beta=0.9)
    with pytest.raises(ValueError, match="no G_ema"):
        with_ema.load_state_dict(_state_bytes(plain))


def test_bf16_autocast_runs_on_cpu():
    step = make_step(precision="bf16")
    real, sk = batch()
    logs = step.step(0, real, sk)
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert {"loss_d_sketch", "loss_d_image", "loss_g_sketch", "r1_sketch", "r1_image"} <= set(logs)


def test_channels_last_computes_the_same_step():
    # lr 0 keeps the weights fixed, so every phase sees the same networks; with beta1 = 0 Adam's first moment
    # is the last gradient (R1's for D, the G step's for G) and the second moment mixes in the others
    real, sk = batch()
    a, b = make_step(seed=2, channels_last=True, lr=0.0), make_step(seed=2, channels_last=False, lr=0.0)
    assert a.D_image.convs[1].conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not b.D_image.convs[1].conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    la, lb = a.step(0, real, sk), b.step(0, real, sk)  # iteration 0 includes R1
    assert la.keys() == lb.keys()
    for k in la:
        assert la[k] == pytest.approx(lb[k], rel=1e-4, abs=1e-6), k
    for opt_a, opt_b in ((a.opt_d, b.opt_d), (a.opt_g, b.opt_g)):
        for pa, pb in zip(opt_a.param_groups[0]["params"], opt_b.param_groups[0]["params"]):
            for key in ("exp_avg", "exp_avg_sq"):
                x, y = opt_a.state[pa][key], opt_b.state[pb][key]
                assert torch.allclose(x, y, rtol=1e-3, atol=1e-5 * float(y.abs().max())), key


def test_lazy_regularisation_adjusts_only_the_discriminator_optimiser():
    step = make_step()  # r1_every 4
    ratio = 4 / 5
    assert step.opt_g.param_groups[0]["lr"] == pytest.approx(0.002)
    assert step.opt_d.param_groups[0]["lr"] == pytest.approx(0.002 * ratio)
    assert step.opt_d.param_groups[0]["betas"] == pytest.approx((0.0, 0.99**ratio))
    no_r1 = make_step(r1_gamma=0.0)
    assert no_r1.opt_d.param_groups[0]["lr"] == pytest.approx(0.002)
    assert "r1_sketch" not in no_r1.step(0, *batch())


def test_lambda_image_zero_drops_the_image_discriminator():
    step = make_step(lambda_image=0.0)
    assert step.D_image is None
    logs = step.step(1, None, batch()[1])
    assert "loss_d_image" not in logs


def test_objective_config_of_a_config_section_with_extra_settings():
    from pipeline.config import load_config

    cfg = load_config(None, ["train.lambda_image=0.3", "train.precision=fp32"])
    oc = ObjectiveConfig.of(cfg.train, precision="bf16", ema_beta=0.5)
    assert (oc.lambda_image, oc.precision, oc.ema_beta, oc.lr, oc.trained) == (0.3, "bf16", 0.5, 0.002, "mapping")


def test_per_network_learning_rates():
    same = make_step(trained="all")
    assert len(same.opt_g.param_groups) == 1  # the paper's one rate: checkpoints keep their optimiser layout
    step = make_step(trained="all", lr=0.003, lr_mapping=0.3, lr_d=0.001)
    mapping = {id(p) for p in step.G.mapping_parameters()}
    by_lr = {round(g["lr"], 6): {id(p) for p in g["params"]} for g in step.opt_g.param_groups}
    assert by_lr == {0.3: mapping, 0.003: {id(p) for p in step.g_params} - mapping}
    assert step.opt_d.param_groups[0]["lr"] == pytest.approx(0.001 * 4 / 5)  # lazy R1 scales it as lr's
    # a step moves the mapping network by ~lr_mapping per weight (Adam's first step is ±lr), the rest by ~lr
    before = {n: p.detach().clone() for n, p in step.G.named_parameters()}
    step.step(1, *batch())
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in step.G.named_parameters()}
    assert max(v for n, v in moved.items() if n.startswith("style.")) == pytest.approx(0.3, rel=0.05)
    assert max(v for n, v in moved.items() if not n.startswith("style.")) == pytest.approx(0.003, rel=0.05)
    only_mapping = make_step(trained="mapping", lr_mapping=0.3)
    assert [g["lr"] for g in only_mapping.opt_g.param_groups] == [0.3]
