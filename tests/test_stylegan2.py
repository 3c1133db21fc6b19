"""Behaviour of the StyleGAN2 building blocks and networks on tiny models (the published-size parity checks
against the reference vectors are in test_reference_vectors.py)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.models.stylegan2 import Discriminator, Generator, ModulatedConv2d
from pipeline.models.stylegan2_layers import make_kernel, upfirdn2d

STYLE = 32


def tiny_g(**kw):
    torch.manual_seed(0)
    G = Generator(32, style_dim=STYLE, n_mlp=2, channel_max=16, **kw)
    with torch.no_grad():  # as after training: noise strengths and biases away from their zero init
        for name, p in G.named_parameters():
            if name.endswith("noise.weight") or name.endswith("activate.bias"):
                p.uniform_(0.1, 0.5)
    return G


def tiny_d():
    torch.manual_seed(1)
    return Discriminator(32, channel_max=16)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def naive_upfirdn2d(x: np.ndarray, k: np.ndarray, up: int, down: int, pad: tuple[int, int]) -> np.ndarray:
    """The definition, one channel at a time: zero insertion, padding, true convolution, decimation."""
    c, h, w = x.shape
    u = np.zeros((c, h * up, w * up))
    u[:, ::up, ::up] = x
    p0, p1 = pad
    u = np.pad(u, ((0, 0), (p0, p1), (p0, p1)))
    kh, kw = k.shape
    oh, ow = u.shape[1] - kh + 1, u.shape[2] - kw + 1
    out = np.zeros((c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            # convolution: the kernel is applied flipped
            out[:, i, j] = (u[:, i:i + kh, j:j + kw] * k[::-1, ::-1]).sum((1, 2))
    return out[:, ::down, ::down]


@pytest.mark.parametrize("up, down, pad", [(1, 1, (1, 1)), (2, 1, (2, 1)), (1, 2, (2, 2)), (1, 2, (1, 1)),
                                           (1, 1, (2, 1))])
def test_upfirdn2d_matches_definition(up, down, pad):
    rng = np.random.RandomState(0)
    x = rng.standard_normal((2, 3, 7, 7))
    k = rng.standard_normal((4, 4))  # asymmetric, so a missing flip would show
    ours = upfirdn2d(torch.tensor(x, dtype=torch.float64), torch.tensor(k), up=up, down=down, pad=pad)
    ref = np.stack([naive_upfirdn2d(xi, k, up, down, pad) for xi in x])
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10, atol=1e-10)


def test_fir_kernels_keep_constant_images_constant():
    k = make_kernel([1, 3, 3, 1])
    assert math.isclose(k.sum().item(), 1.0, rel_tol=1e-6)
    ones = torch.ones(1, 2, 8, 8)
    up = upfirdn2d(ones, k * 4, up=2, pad=(2, 1))  # Upsample's padding for a 4-tap kernel
    assert up.shape[-2:] == (16, 16)
    assert torch.allclose(up[..., 2:-2, 2:-2], torch.ones(1), atol=1e-6)


def grouped_modulated_conv(conv: ModulatedConv2d, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """The published per-sample-weight (grouped convolution) form, written out as a reference."""
    b, i, h, w = x.shape
    o, k = conv.out_channels, conv.kernel_size
    s = conv.modulation(style).view(b, 1, i, 1, 1)
    weight = conv.scale * conv.weight * s
    if conv.demodulate:
        weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(b, o, 1, 1, 1)
    if conv.upsample:
        weight = weight.transpose(1, 2).reshape(b * i, o, k, k)
        out = F.conv_transpose2d(x.reshape(1, b * i, h, w), weight, stride=2, groups=b)
        return conv.blur(out.view(b, o, out.shape[-2], out.shape[-1]))
    out = F.conv2d(x.reshape(1, b * i, h, w), weight.view(b * o, i, k, k), padding=conv.padding, groups=b)
    return out.view(b, o, h, w)


@pytest.mark.parametrize("kernel, upsample, demodulate", [(3, False, True), (3, True, True), (1, False, False)])
def test_non_fused_modulated_conv_equals_grouped_form(kernel, upsample, demodulate):
    torch.manual_seed(0)
    conv = ModulatedConv2d(6, 5, kernel, STYLE, demodulate=demodulate, upsample=upsample).double()
    with torch.no_grad():
        conv.modulation.bias.normal_()  # per-sample styles that differ a lot
    x, style = torch.randn(3, 6, 8, 8, dtype=torch.float64), torch.randn(3, STYLE, dtype=torch.float64)
    ours, ref = conv(x, style), grouped_modulated_conv(conv, x, style)
    assert ours.shape == ref.shape == (3, 5, 16 if upsample else 8, 16 if upsample else 8)
    assert rel(ours, ref) < 1e-10
    # gradients too (the training step differentiates through styles and inputs)
    x.requires_grad_(True)
    g_ours = torch.autograd.grad(conv(x, style).square().sum(), [x, conv.modulation.weight])
    g_ref = torch.autograd.grad(grouped_modulated_conv(conv, x, style).square().sum(), [x, conv.modulation.weight])
    for a, b in zip(g_ours, g_ref):
        assert rel(a, b) < 1e-10


def test_generator_forward_backward_and_call_convention():
    G = tiny_g()
    assert G.n_latent == 8
    z1, z2 = torch.randn(2, STYLE), torch.randn(2, STYLE)
    img, latent = G([z1], return_latents=True)
    assert img.shape == (2, 3, 32, 32) and latent.shape == (2, 8, STYLE)
    assert G([z1])[1] is None
    assert torch.allclose(latent[:, 0], G.get_latent(z1)) and torch.allclose(latent[:, 0], latent[:, -1])

    mixed, lat = G([z1, z2], inject_index=3, return_latents=True)
    assert torch.equal(lat[:, :3], latent[:, :3])
    assert torch.allclose(lat[:, 3:], G.get_latent(z2).unsqueeze(1).expand(-1, 5, -1))

    # fixed noise buffers: deterministic; fresh noise: not
    a = G([z1], randomize_noise=False)[0]
    assert torch.equal(a, G([z1], randomize_noise=False)[0])
    assert not torch.allclose(G([z1])[0], G([z1])[0])
    explicit = [getattr(G.noises, f"noise_{i}") for i in range(G.num_layers)]
    assert torch.equal(G([z1], noise=explicit)[0], a)

    # w input, and truncation 0 collapses onto the truncation latent
    assert torch.allclose(G([G.get_latent(z1)], input_is_latent=True, randomize_noise=False)[0], a, atol=1e-6)
    mean = G.mean_latent(64)
    assert mean.shape == (1, STYLE)
    t0 = G([z1], truncation=0.0, truncation_latent=mean, randomize_noise=False)[0]
    t0_ref = G([mean.expand(2, -1)], input_is_latent=True, randomize_noise=False)[0]
    assert torch.allclose(t0, t0_ref, atol=1e-6)

    # backward reaches the mapping network through the frozen synthesis network
    for name, p in G.named_parameters():
        p.requires_grad_(name.startswith("style."))
    G([z1])[0].square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in G.mapping_parameters())
    assert all(p.grad is None for n, p in G.named_parameters() if not n.startswith("style."))


def test_trained_subsets():
    G = tiny_g(w_shift=True)
    names = lambda subset: [n for n, _ in G.named_trainable(subset)]  # noqa: E731
    assert names("w_shift") == ["style.3.w_shift"]  # n_mlp 2: PixelNorm, 2 linears, then the shift
    assert all(n.startswith("style.") for n in names("mapping")) and "style.3.w_shift" in names("mapping")
    assert len(names("mapping")) == 5
    assert names("all") == [n for n, _ in G.named_parameters()]
    with pytest.raises(ValueError, match="'synthesis'"):
        list(G.named_trainable("synthesis"))
    with pytest.raises(ValueError, match="w_shift=True"):
        list(tiny_g().named_trainable("w_shift"))


def test_w_shift_is_added_after_mapping():
    G = tiny_g(w_shift=True)
    z = torch.randn(3, STYLE)
    before = G.get_latent(z)
    with torch.no_grad():
        G.style[-1].w_shift.fill_(0.25)
    assert torch.allclose(G.get_latent(z), before + 0.25)


def test_discriminator_forward_backward_and_minibatch_stddev():
    D = tiny_d()
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    out = D(x)
    assert out.shape == (4, 1)
    out.sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is not None for p in D.parameters())
    # the stddev feature makes each logit depend on the other images of its group
    y = x.detach().clone()
    y[3] += 1.0
    changed = D(y) - D(x.detach())
    assert changed[:3].abs().max() > 0
    # batches that are not a multiple of the group size still work
    assert D(torch.randn(3, 3, 32, 32)).shape == (3, 1)
    assert D(torch.randn(1, 3, 32, 32)).shape == (1, 1)


def test_sizes_and_widths():
    with pytest.raises(ValueError, match="power of two"):
        Generator(48)
    with pytest.raises(ValueError, match="power of two"):
        Discriminator(2048)
    G = Generator(64, style_dim=16, n_mlp=1, channel_max=8)
    assert max(G.channels.values()) == 8
    assert G([torch.randn(1, 16)])[0].shape == (1, 3, 64, 64)
    assert Discriminator(64, channel_max=8)(torch.randn(2, 3, 64, 64)).shape == (2, 1)


def test_state_dict_round_trip_strict():
    G = tiny_g(w_shift=True)
    G2 = Generator(32, style_dim=STYLE, n_mlp=2, channel_max=16, w_shift=True)
    G2.load_state_dict(G.state_dict(), strict=True)
    z = torch.randn(2, STYLE)
    assert torch.equal(G([z], randomize_noise=False)[0], G2([z], randomize_noise=False)[0])
    assert {f"noises.noise_{i}" for i in range(G.num_layers)} <= set(G.state_dict())


def test_bf16_autocast_forward_and_backward():
    G, D = tiny_g(), tiny_d()
    z = torch.randn(4, STYLE)
    ref_img = G([z], randomize_noise=False)[0]
    ref_logits = D(ref_img)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img = G([z], randomize_noise=False)[0]
        logits = D(img)
    assert img.dtype == torch.bfloat16 and torch.isfinite(img.float()).all()
    assert rel(img.float(), ref_img) < 0.05
    assert rel(logits.float(), ref_logits) < 0.1
    logits.float().sum().backward()
    grads = [p.grad for p in G.mapping_parameters()] + [p.grad for p in D.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_gradients_are_exact_including_second_order():
    # the in-place activations and folded gains must not break autograd: R1 differentiates D twice
    torch.manual_seed(0)
    D = Discriminator(8, channel_max=2).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64).expand(2, 3, 8, 8).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(D, (x,))
    assert torch.autograd.gradgradcheck(D, (x,))
    G = Generator(8, style_dim=4, n_mlp=1, channel_max=4).double()
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith(("noise.weight", "activate.bias")):
                p.uniform_(0.1, 0.5)
    z = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: G([z], randomize_noise=False)[0], (z,))
