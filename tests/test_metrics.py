"""Precision and recall, perceptual path length and sketch fidelity (pipeline.eval.metrics) against independent
computations: brute force, closed forms, drawings with known distances."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.eval import metrics


def brute_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # index 0 is the point itself

    def covered(points, centres, r):
        d = np.sqrt(((points[:, None, :] - centres[None, :, :]) ** 2).sum(-1))
        return (d <= r[None, :]).any(1).mean()

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(70, 6))
    fake = rng.normal(loc=0.7, scale=1.3, size=(55, 6))
    got = metrics.precision_recall(real, fake, k=k, block=16)  # blocks smaller than the sets
    want = brute_precision_recall(real, fake, k)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0 < got[0] < 1 and 0 < got[1] < 1  # a case where both are informative


def test_identical_sets_score_one_and_far_apart_sets_zero():
    x = np.random.default_rng(0).normal(size=(40, 8))
    assert metrics.precision_recall(x, x.copy()) == (1.0, 1.0)
    assert metrics.precision_recall(x, x + 100.0) == (0.0, 0.0)
    with pytest.raises(ValueError, match="needs more than 3 points"):
        metrics.precision_recall(x[:3], x)
    with pytest.raises(ValueError, match="one width"):
        metrics.precision_recall(x, x[:, :4])


def test_path_length_of_a_linear_generator_is_known_in_closed_form():
    """G(w) = c·w (as an image), identity mapping, distance = mean squared difference over P values: each pair
    gives c²·|w1 - w0|²/P exactly; PPL is the mean of those inside the 1st-99th percentiles."""
    d, c = 12, 3.0
    pixels = d  # a 3 x 2 x 2 image per w

    def synthesis(w):
        return c * w.reshape(-1, 3, 2, 2)

    def mse(a, b):
        return (a - b).pow(2).flatten(1).mean(1)

    n, batch, seed = 400, 64, 7
    got = metrics.path_length(lambda z: z.double(), synthesis, mse, d, n=n, batch=batch, seed=seed)
    gen, per_pair = torch.Generator().manual_seed(seed), []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        z = torch.randn(2 * m, d, generator=gen).double()
        per_pair.append((c**2 * (z[m:] - z[:m]).pow(2).sum(1) / pixels).numpy())
    vals = np.concatenate(per_pair)
    lo, hi = np.percentile(vals, 1, method="lower"), np.percentile(vals, 99, method="higher")
    assert got == pytest.approx(vals[(vals >= lo) & (vals <= hi)].mean(), rel=1e-6)
    assert got == pytest.approx(c**2 * 2, rel=0.15)  # E|z1 - z0|² per coordinate is 2


def drawing(size: int, columns: list[int]) -> np.ndarray:
    img = np.full((size, size), 255, np.uint8)
    for col in columns:
        img[4:-4, col] = 0
    return img


def test_sketch_fidelity_measures_line_distance_in_image_widths():
    user = np.stack([drawing(32, [10]), drawing(32, [20, 26])])
    assert metrics.sketch_fidelity(user[:1], user) == 0.0  # a user sketch is its own nearest
    moved = drawing(32, [14])  # 4 px from the first user sketch's line, 6 px from the second's nearer one
    assert metrics.sketch_fidelity(moved[None], user) == pytest.approx(4 / 32)
    blank = np.full((1, 32, 32), 255, np.uint8)
    assert metrics.sketch_fidelity(blank, user) == pytest.approx(np.sqrt(2))
    both = np.stack([drawing(32, [10]), moved])
    assert metrics.sketch_fidelity(both, user) == pytest.approx((0 + 4 / 32) / 2)
    with pytest.raises(ValueError, match="one size"):
        metrics.sketch_fidelity(blank, np.full((1, 16, 16), 255, np.uint8))


def test_lpips_matches_its_definition_and_refuses_foreign_files(tmp_path):
    import torchvision

    from pipeline.eval.lpips import CHANNELS, LAYERS, LPIPS
    from pipeline.models.checkpoints import save_state_dict

    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    save_state_dict(vgg, tmp_path / "vgg16.pth")
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(CHANNELS)}
    save_state_dict(lins, tmp_path / "lpips_vgg.pth")
    lp = LPIPS(str(tmp_path / "vgg16.pth"), str(tmp_path / "lpips_vgg.pth"))
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        got = lp(a, b)
        # the definition, step by step on the torchvision network itself
        shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        x, y, want, layer = (a - shift) / scale, (b - shift) / scale, torch.zeros(2), 0
        for i, module in enumerate(vgg.features[:30]):
            x, y = module(x), module(y)
            if i in LAYERS:
                nx = x / (x.norm(dim=1, keepdim=True) + 1e-10)
                ny = y / (y.norm(dim=1, keepdim=True) + 1e-10)
                w = lins[f"lin{layer}.model.1.weight"]
                want += ((nx - ny) ** 2 * w).sum(1).mean((1, 2))
                layer += 1
        assert torch.allclose(got, want, rtol=1e-5) and torch.all(got > 0)
        assert torch.allclose(lp(a, a), torch.zeros(2)) and torch.allclose(lp(b, a), got, rtol=1e-5)
    save_state_dict({"lin0.model.1.weight": torch.ones(1, 3, 1, 1)}, tmp_path / "bad_lin.pth")
    with pytest.raises(ValueError, match=r"bad_lin.pth: not LPIPS's VGG linear weights \(lin0.model.1.weight"):
        LPIPS(str(tmp_path / "vgg16.pth"), str(tmp_path / "bad_lin.pth"))
    with pytest.raises(ValueError, match="lpips_vgg.pth: not torchvision's vgg16 state dict"):
        LPIPS(str(tmp_path / "lpips_vgg.pth"))


def test_vgg16_fc2_features_are_torchvision_s_own(tmp_path):
    import torchvision

    from pipeline.eval.vgg import VGG16Features
    from pipeline.models.checkpoints import save_state_dict

    torch.manual_seed(1)
    vgg = torchvision.models.vgg16(weights=None).eval()
    save_state_dict(vgg, tmp_path / "vgg16.pth")
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    got = VGG16Features(str(tmp_path / "vgg16.pth"))(images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():  # fc2 after its ReLU: torchvision's classifier up to (not including) the second dropout
        h = torch.flatten(vgg.avgpool(vgg.features(x)), 1)
        want = torch.relu(vgg.classifier[3](torch.relu(vgg.classifier[0](h)))).numpy()
    assert got.shape == (2, 4096) and np.allclose(got, want, atol=1e-5)
