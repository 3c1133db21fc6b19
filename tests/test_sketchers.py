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
