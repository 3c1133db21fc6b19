"""FID/KID maths, the clean resize and the extractors against clean-fid itself and scipy."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from pipeline.config import EvalConfig
from pipeline.eval import features as feats_mod
from pipeline.eval.features import (
    INCEPTION_FILE,
    FeatureExtractorError,
    InceptionExtractor,
    ModuleExtractor,
    RandConvExtractor,
    build_extractor,
    build_inception,
)
from pipeline.eval.fid import (
    extract_features,
    feature_statistics,
    fid_from_images,
    frechet_distance,
    kernel_distance,
    to_uint8,
)
from pipeline.eval.resize import clean_resize, resize_batch

torch.set_num_threads(2)


def _random_spd(rng, d):
    a = rng.normal(size=(d, 2 * d))
    return a @ a.T / (2 * d)


def test_frechet_distance_matches_direct_scipy():
    rng = np.random.default_rng(1)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-9)
    # identical Gaussians are at distance 0; a shifted mean adds exactly its squared norm
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(mu1, s1, mu1 + 0.5, s1) == pytest.approx(0.25 * d, rel=1e-6)


def test_frechet_distance_singular_covariances_use_eps_fallback(caplog):
    # rank-1 covariances: the product's sqrtm is not finite, so eps goes on the diagonals (clean-fid's fix)
    from cleanfid.fid import frechet_distance as cleanfid_fd

    v = np.zeros(4)
    v[0] = 1.0
    s = np.outer(v, v)
    mu = np.zeros(4)
    with caplog.at_level(logging.WARNING):
        ours = frechet_distance(mu, s, mu + 1, s * 4)
    assert np.isfinite(ours)
    assert ours == pytest.approx(cleanfid_fd(mu, s, mu + 1, s * 4), abs=1e-6)


def test_frechet_distance_refuses_mismatched_dimensions():
    with pytest.raises(ValueError, match="different dimension"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_kernel_distance_matches_cleanfid():
    from cleanfid.fid import kernel_distance as cleanfid_kid

    rng = np.random.default_rng(2)
    f1 = rng.normal(size=(60, 8))
    f2 = rng.normal(loc=1.0, size=(60, 8))
    f3 = rng.normal(size=(60, 8))
    # With subsets as large as the sets, every subset is a permutation: the estimate is deterministic.
    ours = kernel_distance(f1, f2, num_subsets=3, max_subset_size=1000, seed=5)
    assert ours == pytest.approx(cleanfid_kid(f1, f2, num_subsets=3, max_subset_size=1000), rel=1e-10)
    assert ours > 0
    same = kernel_distance(f1, f3, num_subsets=2, max_subset_size=1000)  # same distribution
    assert abs(same) < ours / 10
    # subsets are drawn reproducibly from the seed
    a = kernel_distance(f1, f2, num_subsets=4, max_subset_size=20, seed=1)
    assert a == kernel_distance(f1, f2, num_subsets=4, max_subset_size=20, seed=1)


def test_clean_resize_is_bit_identical_to_cleanfid():
    from cleanfid.resize import build_resizer

    rng = np.random.default_rng(3)
    ref = build_resizer("clean")
    for shape in [(64, 64, 3), (37, 50, 3), (320, 300, 3)]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        ours = clean_resize(img)
        assert ours.dtype == np.float32 and ours.shape == (299, 299, 3)
        np.testing.assert_array_equal(ours, ref(img))
    batch = rng.integers(0, 256, (5, 40, 40, 3), dtype=np.uint8)
    out = resize_batch(batch, threads=2)
    assert out.shape == (5, 3, 299, 299)
    np.testing.assert_array_equal(out[3], ref(batch[3]).transpose(2, 0, 1))


def test_resize_refuses_non_uint8_and_grey():
    with pytest.raises(ValueError, match="uint8"):
        clean_resize(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="HxWx3"):
        clean_resize(np.zeros((8, 8), np.uint8))


def test_to_uint8_rounds_like_saving_a_png():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 3.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = to_uint8(x)
    assert out.shape == (1, 1, 6, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255, 255]


def _blobs(seed: int, n: int, size: int = 48, shift: float = 0.0) -> np.ndarray:
    """Images with some structure (smooth colour blobs), so features vary between sets."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        cx, cy = rng.uniform(0.2, 0.8, 2)
        r = rng.uniform(0.1, 0.3)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / r ** 2)[..., None]
        colour = rng.uniform(0, 255, 3) * (1 - shift) + shift * np.array([255, 40, 40])
        img = blob * colour + (1 - blob) * rng.uniform(0, 80, 3) + rng.normal(0, 10, (size, size, 3))
        out[i] = img.clip(0, 255).astype(np.uint8)
    return out


def _write_pngs(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:04d}.png")


def test_fid_equals_cleanfid_compute_fid_in_folder_mode(tmp_path):
    from cleanfid import fid as cleanfid

    a, b = _blobs(10, 40), _blobs(11, 40, shift=0.5)
    _write_pngs(tmp_path / "a", a)
    _write_pngs(tmp_path / "b", b)
    extractor = RandConvExtractor(seed=0, dim=16, device="cpu")
    ref = cleanfid.compute_fid(str(tmp_path / "a"), str(tmp_path / "b"), mode="clean",
                               custom_feat_extractor=extractor, device=torch.device("cpu"),
                               num_workers=0, batch_size=16, verbose=False, use_dataparallel=False)
    ours = fid_from_images(a, b, extractor, batch_size=7)
    assert ref > 1.0  # the sets differ: a trivial zero would not pass
    assert abs(ours - ref) < 1e-3
    # generated tensors in [-1, 1] give the same answer as their uint8 images
    t = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert fid_from_images(t, b, extractor) == pytest.approx(ours, abs=1e-6)
    # and an iterable of batches does too
    assert fid_from_images([a[:13], a[13:]], [b], extractor) == pytest.approx(ours, abs=1e-6)


def test_randconv_is_deterministic_and_seed_dependent():
    x = torch.rand(3, 3, 299, 299) * 255
    e1, e2 = RandConvExtractor(seed=4, device="cpu"), RandConvExtractor(seed=4, device="cpu")
    torch.testing.assert_close(e1(x), e2(x), rtol=0, atol=0)
    assert e1(x).shape == (3, 32)
    assert not torch.allclose(e1(x), RandConvExtractor(seed=5, device="cpu")(x))
    assert e1.cache_id == "randconv@v2-seed4-d32"
    with pytest.raises(ValueError, match="299"):
        e1(torch.rand(2, 3, 64, 64))


def test_module_extractor_versions_by_content():
    m = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    lin = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 4))
    e = ModuleExtractor(lin, name="lin", device="cpu")
    with torch.no_grad():
        lin[2].weight.add_(1.0)
    assert ModuleExtractor(lin, name="lin", device="cpu").version != e.version
    feats = extract_features(np.zeros((3, 20, 20, 3), np.uint8), ModuleExtractor(m, "pool", device="cpu"))
    assert feats.shape == (3, 12)


class _FakeLayers(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 2048 features that depend on the normalised input (N x 2048 x 1 x 1 like the real network)
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)  # N x 3
        return pooled.repeat(1, 683)[:, :2048].reshape(-1, 2048, 1, 1)


class _FakeInception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = _FakeLayers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_inception_extractor_loads_torchscript_from_configured_path(tmp_path):
    path = tmp_path / INCEPTION_FILE
    torch.jit.script(_FakeInception()).save(str(path))
    cfg = EvalConfig(feature_extractor="inception", inception_weights=str(path))
    extractor = build_extractor(cfg, device="cpu")
    assert isinstance(extractor, InceptionExtractor)
    x = torch.full((2, 3, 299, 299), 192.0)
    out = extractor(x)
    # clean mode normalises (x - 128) / 128 before the layers
    assert out.shape == (2, 2048)
    torch.testing.assert_close(out, torch.full((2, 2048), 0.5))
    assert len(extractor.version) == 16


def test_inception_missing_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(feats_mod, "cleanfid_cache_path", lambda: tmp_path / INCEPTION_FILE)

    def offline(*a, **k):
        raise OSError("Name or service not known")

    monkeypatch.setattr(feats_mod.urllib.request, "urlopen", offline)
    with pytest.raises(FeatureExtractorError) as err:
        build_inception(None, download=True, device="cpu")
    msg = str(err.value)
    assert INCEPTION_FILE in msg and str(tmp_path / INCEPTION_FILE) in msg and "eval.inception_weights" in msg
    assert not list(tmp_path.iterdir())  # no partial file left behind
    with pytest.raises(FeatureExtractorError, match="no such file"):
        build_inception(str(tmp_path / "nope.pt"), device="cpu")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not torchscript")
    with pytest.raises(FeatureExtractorError, match="not a usable TorchScript"):
        build_inception(str(bad), device="cpu")


def test_build_extractor_names():
    assert build_extractor(EvalConfig(feature_extractor="randconv:3:8"), device="cpu").cache_id == \
        "randconv@v2-seed3-d8"
    with pytest.raises(FeatureExtractorError, match="unknown"):
        build_extractor(EvalConfig(feature_extractor="vgg"), device="cpu")
    with pytest.raises(FeatureExtractorError, match="cannot import"):
        build_extractor(EvalConfig(feature_extractor="no_such_mod:make"), device="cpu")
    plugged = build_extractor(EvalConfig(feature_extractor="torch.nn:Identity"), device="cpu")
    assert plugged.name == "torch.nn:Identity"


def test_feature_statistics_needs_two_rows():
    mu, sigma = feature_statistics(np.arange(6.0).reshape(3, 2))
    np.testing.assert_allclose(mu, [2.0, 3.0])
    assert sigma.shape == (2, 2)
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(np.zeros((1, 4)))
