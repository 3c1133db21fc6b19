"""FID and KID as clean-fid computes them, from images held in memory (no PNG round trip).

- ``frechet_distance``: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) with scipy's sqrtm; when the product
  is singular, eps is added to both diagonals; the real part is kept (a large imaginary part is an error).
- ``kernel_distance``: KID, the unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3, averaged
  over random subsets of min(n1, n2, max_subset_size) rows.
- Images: uint8 N x H x W x 3 (or model output in [-1, 1], N x 3 x H x W) -> clean-fid's clean resize ->
  the extractor -> float features.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy import linalg

from pipeline.eval.features import FeatureExtractor
from pipeline.eval.resize import default_threads, resize_batch
from pipeline.models.sampling import to_uint8

log = logging.getLogger(__name__)


def feature_statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are samples) of a feature matrix, computed as clean-fid does.

    The mean is taken in the features' own precision (float32 from the extractors), like clean-fid's
    ``np.mean``; at FIDs in the hundreds a float64 mean alone moves the score by ~1e-4.
    """
    feats = np.asarray(feats)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows N x D to estimate statistics, got {feats.shape}")
    return np.mean(feats, axis=0).astype(np.float64), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics of different dimension: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
            f"{sigma2.shape} (were they computed with the same feature extractor?)"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # a singular product (features that never fire have zero variance) still has a usable square root, as
        # clean-fid and pytorch-fid find; a non-finite one is handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        log.warning("FID: singular covariance product; adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has a large imaginary component ({np.max(np.abs(covmean.imag)):g})")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def kernel_distance(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100,
                    max_subset_size: int = 1000, seed: int = 0) -> float:
    """KID between two feature sets (clean-fid's estimator; subsets drawn with a seeded generator)."""
    feats1 = np.asarray(feats1, dtype=np.float64)
    feats2 = np.asarray(feats2, dtype=np.float64)
    if feats1.shape[1] != feats2.shape[1]:
        raise ValueError(f"KID: features of different dimension {feats1.shape[1]} vs {feats2.shape[1]}")
    d = feats1.shape[1]
    m = min(feats1.shape[0], feats2.shape[0], max_subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = feats2[rng.choice(feats2.shape[0], m, replace=False)]
        y = feats1[rng.choice(feats1.shape[0], m, replace=False)]
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        b = (x @ y.T / d + 1) ** 3
        total += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(total / num_subsets / m)


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(feats1), *feature_statistics(feats2))


def _as_uint8_batch(batch) -> np.ndarray:
    if isinstance(batch, torch.Tensor):
        if batch.dtype == torch.uint8:
            return batch.cpu().numpy()
        return to_uint8(batch)
    batch = np.asarray(batch)
    if batch.dtype != np.uint8:
        raise ValueError(f"expected uint8 image batches N x H x W x 3, got {batch.dtype}")
    return batch


def extract_features(images, extractor: FeatureExtractor, batch_size: int = 50,
                     threads: int | None = None) -> np.ndarray:
    """Features of images in memory: a uint8 N x H x W x 3 array, or an iterable of such batches (numpy
    or tensors; float tensors are model output in [-1, 1], N x 3 x H x W)."""
    batches: Iterable
    if isinstance(images, np.ndarray | torch.Tensor) and images.ndim == 4:
        batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    else:
        batches = images
    out = []
    n_threads = threads or extractor.resize_threads or default_threads()
    with ThreadPoolExecutor(n_threads) as pool:
        for batch in batches:
            array = _as_uint8_batch(batch)
            if len(array) == 0:
                continue
            for i in range(0, len(array), batch_size):
                resized = resize_batch(array[i:i + batch_size], extractor.input_size, pool=pool)
                feats = extractor(torch.from_numpy(resized))
                out.append(feats.detach().cpu().numpy().astype(np.float32))
    if not out:
        raise ValueError("no images to compute features of")
    return np.concatenate(out)


def fid_from_images(images1, images2, extractor: FeatureExtractor, batch_size: int = 50) -> float:
    """FID between two in-memory image sets (see ``extract_features`` for the accepted forms)."""
    return fid_from_features(extract_features(images1, extractor, batch_size),
                             extract_features(images2, extractor, batch_size))
