import pytest
import torch
from reference_weights import deterministic_state_dict

from pipeline.models.sketchers import build_sketcher, sketcher_fingerprint


def square_image(size=32):
    x = -torch.ones(1, 3, size, size)
    x[:, :, 8:24, 8:24] = 1.0
    return x


def test_edges_draws_dark_lines_on_white():
    sk = build_sketcher("edges")(square_image())
    assert sk.shape == (1, 1, 32, 32)
    assert sk.min() >= -1 and sk.max() <= 1
    assert sk[0, 0, 16, 16] > 0.9 and sk[0, 0, 2, 2] > 0.9  # flat areas are white
    assert sk[0, 0, 16, 8] < -0.5  # the square's border is a dark line


def test_edges_is_differentiable():
    x = square_image().requires_grad_(True)
    build_sketcher("edges")(x).sum().backward()
    assert x.grad.abs().sum() > 0


def test_photosketch_needs_weights_and_loads_them(tmp_path):
    with pytest.raises(ValueError, match="data.sketcher_weights"):
        build_sketcher("photosketch")
    with pytest.raises(ValueError, match="--sketcher-weights"):
        sketcher_fingerprint("photosketch")
    path = tmp_path / "photosketch.pth"
    torch.save(deterministic_state_dict("PhotoSketch"), path)
    net = build_sketcher("photosketch", str(path), norm="per_image")
    out = net(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert out.shape == (2, 1, 32, 32) and out.abs().max() <= 1
    assert sketcher_fingerprint("photosketch", str(path)).startswith("photosketch:")
    assert len(sketcher_fingerprint("photosketch", str(path))) == len("photosketch:") + 64


@pytest.mark.reliability
def test_unknown_sketcher_named():
    with pytest.raises(ValueError, match="unknown sketcher 'crayon'"):
        build_sketcher("crayon")
    assert sketcher_fingerprint("edges") == "edges:none"


def test_sketch_precision_resolution(monkeypatch):
    from pipeline.models import sketchers

    assert sketchers.resolve_sketch_precision("edges", "bf16") == "fp32"  # edges always fp32
    assert sketchers.resolve_sketch_precision("photosketch", "fp32", gpus=True) == "fp32"
    assert sketchers.resolve_sketch_precision("photosketch", "bf16") == "bf16"
    assert sketchers.resolve_sketch_precision("photosketch", "auto", gpus=True) == "bf16"
    for amx, avx512_bf16, expected in ((False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        assert sketchers.resolve_sketch_precision("photosketch", "auto") == expected
    with pytest.raises(ValueError, match="data.sketch_precision 'fp16'"):
        sketchers.resolve_sketch_precision("photosketch", "fp16")


def test_photosketch_in_bf16_is_within_one_grey_level_of_fp32_on_average():
    from pipeline.models.photosketch import PhotoSketch

    torch.manual_seed(0)
    net = PhotoSketch(norm="per_image", ngf=8, n_blocks=2).eval().requires_grad_(False)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        y32 = net(x)
        y16 = net.to(torch.bfloat16)(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and y16.shape == y32.shape == (2, 1, 32, 32)
    # measured: mean 0.55 grey levels (0.0043 in [-1, 1]), at most 3.0; allowed: one grey level on average
    diff = (y16.float() - y32).abs() * 127.5
    assert diff.mean() < 1.0 and diff.max() < 8
