"""PhotoSketch's normalisation modes on small networks (the full-size parity check is in
test_reference_vectors.py)."""

import pytest
import torch

from pipeline.models.photosketch import PhotoSketch


def small(norm="per_image"):
    torch.manual_seed(0)
    net = PhotoSketch(norm=norm, ngf=8, n_blocks=2)
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        for name, t in net.state_dict().items():
            if name.endswith(("weight", "bias")) and t.ndim == 1:
                t.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                t.normal_()
            elif name.endswith("running_var"):
                t.uniform_(2.0, 3.0)
    return net


def images(n=3, size=32):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_shapes_and_range():
    out = small()(images())
    assert out.shape == (3, 1, 32, 32)
    assert out.min() >= -1 and out.max() <= 1


@torch.no_grad()
def test_per_image_is_one_image_at_a_time_and_batch_pools():
    net, x = small("per_image"), images()
    per_image = net(x)
    one_by_one = torch.cat([net(x[i:i + 1]) for i in range(len(x))])
    assert torch.allclose(per_image, one_by_one, atol=1e-5)
    # an image's sketch does not depend on its batch mates ...
    assert torch.allclose(net(torch.cat([x[:1], -x[1:]]))[0], per_image[0], atol=1e-5)
    net.norm = "batch"
    pooled = net(x)
    # ... with pooled statistics it does, and a single image is the same in both modes
    assert (pooled - per_image).abs().max() > 1e-2
    assert not torch.allclose(net(torch.cat([x[:1], -x[1:]]))[0], pooled[0], atol=1e-3)
    net_single = small("per_image")
    assert torch.allclose(net(x[:1]), net_single(x[:1]), atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("norm", ["per_image", "batch"])
def test_running_statistics_neither_used_nor_updated(norm):
    net, x = small(norm), images()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train_out = net.train()(x)
    eval_out = net.eval()(x)
    assert torch.equal(train_out, eval_out)  # eval mode does not switch to the running averages
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    # changing the stored averages changes nothing either
    for k, v in net.state_dict().items():
        if k.endswith(("running_mean", "running_var")):
            v.mul_(3.0)
    assert torch.equal(net(x), eval_out)


def test_differentiable_with_respect_to_the_image():
    net = small("batch").requires_grad_(False)
    x = images().requires_grad_(True)
    net(x).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_norm_mode_validation():
    with pytest.raises(ValueError, match="'group'"):
        PhotoSketch(norm="group")
    net = small()
    with pytest.raises(ValueError, match="'instance'"):
        net.norm = "instance"
    assert net.norm == "per_image"


def test_bf16_autocast():
    net, x = small("batch"), images()
    ref = net(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert torch.isfinite(out.float()).all()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.05
