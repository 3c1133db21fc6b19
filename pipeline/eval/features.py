"""Feature extractors for FID/KID: one interface, clean-fid's Inception, a small seeded net, any nn.Module.

An extractor is called like clean-fid's feature models, so the same object can be handed to
``cleanfid.fid.compute_fid(custom_feat_extractor=...)``:

- a float tensor N x 3 x S x S in [0, 255], already resized to ``input_size`` -> features N x D (tensor);
- a uint8 batch N x H x W x 3 (numpy or tensor) -> resized first with clean-fid's clean protocol.

``name`` and ``version`` identify the function it computes; they are part of the reference statistics'
cache key, so changing weights gives new statistics.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import platform
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.eval.resize import SIZE, resize_batch

log = logging.getLogger(__name__)

INCEPTION_FILE = "inception-2015-12-05.pt"
# Where clean-fid downloads the TorchScript port of the TF Inception (NVIDIA's StyleGAN2-ADA metrics file).
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
DOWNLOAD_TIMEOUT_S = 20


class FeatureExtractorError(ValueError):
    """An extractor that cannot be built (unknown name, missing or unreadable weights)."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class FeatureExtractor:
    """Base class: subclasses set ``name``, ``version``, ``dim`` and implement ``features``."""

    name: str = "extractor"
    version: str = "0"
    input_size: int = SIZE
    dim: int | None = None

    def __init__(self, device: torch.device | str | None = None, resize_threads: int | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.resize_threads = resize_threads

    @property
    def cache_id(self) -> str:
        return f"{self.name}@{self.version}"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Float N x 3 x input_size x input_size in [0, 255] on ``self.device`` -> N x D."""
        raise NotImplementedError

    def __call__(self, x: Any) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dtype != torch.uint8:
            if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (self.input_size, self.input_size):
                raise ValueError(
                    f"{self.name}: a float batch must be N x 3 x {self.input_size} x {self.input_size} in "
                    f"[0, 255] (resized already); got shape {tuple(x.shape)}"
                )
            batch = x
        else:
            array = x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            batch = torch.from_numpy(resize_batch(array, self.input_size, self.resize_threads))
        with torch.no_grad():
            out = self.features(batch.to(self.device, torch.float32))
        return out.reshape(out.shape[0], -1)


class ModuleExtractor(FeatureExtractor):
    """Any ``nn.Module`` mapping float N x 3 x S x S in [0, 255] to N x D (or N x D x 1 x 1) features."""

    def __init__(self, module: nn.Module, name: str, version: str | None = None, input_size: int = SIZE,
                 device: torch.device | str | None = None, resize_threads: int | None = None):
        super().__init__(device, resize_threads)
        self.module = module.to(self.device).eval()
        self.name = name
        self.input_size = input_size
        self.version = version or state_dict_digest(module)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def state_dict_digest(module: nn.Module) -> str:
    """A short content hash of a module's parameters and buffers (its version when none is given)."""
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(str(tuple(value.shape)).encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class RandomConvNet(nn.Module):
    """A small fixed convolutional net whose weights come from a seed: cheap, deterministic features."""

    def __init__(self, seed: int = 0, dim: int = 32):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 8, stride=4, padding=2), nn.LeakyReLU(0.2),  # 299 -> 74
            nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.LeakyReLU(0.2),  # -> 37
            nn.Conv2d(32, dim, 3, stride=2, padding=1),  # -> 19; linear: features may be negative
            nn.AdaptiveAvgPool2d(1),
        )
        with torch.no_grad():
            for name, p in self.body.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                else:  # He-scaled Gaussian weights
                    p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / p[0].numel()) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Spatial averaging shrinks the spread between images; the fixed gain makes FIDs readable (units to
        # hundreds). Scores are comparable only within this extractor: KID in particular is far from
        # Inception's scale, as the cubic kernel sees features of norm ~10 rather than ~1.
        return self.body((x - 128.0) / 128.0).flatten(1) * 10.0


class RandConvExtractor(ModuleExtractor):
    """The seeded small extractor the tests and benchmarks use (no weights to download)."""

    def __init__(self, seed: int = 0, dim: int = 32, device=None, resize_threads: int | None = None):
        super().__init__(RandomConvNet(seed, dim), name="randconv", version=f"v2-seed{seed}-d{dim}",
                         device=device, resize_threads=resize_threads)
        self.dim = dim


class InceptionExtractor(FeatureExtractor):
    """clean-fid's feature network: the 2015-12-05 TF Inception as TorchScript, 2048-d pool features.

    In clean mode clean-fid feeds the 299 x 299 float image through ``base.layers`` after (x - 128) / 128.
    """

    name = "inception-2015-12-05"
    dim = 2048

    def __init__(self, path: str | Path, device=None, resize_threads: int | None = None):
        super().__init__(device, resize_threads)
        path = Path(path)
        self.version = file_digest(path)[:16]
        try:
            # A TorchScript archive (not a pickle): torch.jit.load does not run arbitrary Python code.
            self.base = torch.jit.load(str(path), map_location=self.device).eval()
            self.layers = self.base.layers
        except Exception as exc:  # noqa: BLE001 - any load failure means the file is not usable
            raise FeatureExtractorError(
                f"Inception weights {path}: not a usable TorchScript {INCEPTION_FILE} ({exc})"
            ) from None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers.forward((x - 128) / 128).view(x.shape[0], -1)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cleanfid_cache_path() -> Path:
    """Where clean-fid keeps (and looks for) the Inception file: the current folder on Windows, else /tmp."""
    return Path("./" if platform.system() == "Windows" else "/tmp") / INCEPTION_FILE


def _download(dest: Path) -> None:
    tmp = None
    try:
        with urllib.request.urlopen(INCEPTION_URL, timeout=DOWNLOAD_TIMEOUT_S) as response:
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
            with os.fdopen(fd, "wb") as f:
                shutil.copyfileobj(response, f)
        os.replace(tmp, dest)
        tmp = None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _missing_weights_error(reason: str) -> FeatureExtractorError:
    return FeatureExtractorError(
        f"Inception weights not available ({reason}). Put {INCEPTION_FILE} (the 2015-12-05 TF Inception as "
        f"TorchScript, from {INCEPTION_URL}) at {cleanfid_cache_path()} (clean-fid's cache), or set "
        "eval.inception_weights to its local path or s3:// URI"
    )


def build_inception(weights: str | None, download: bool = True, device=None,
                    resize_threads: int | None = None) -> InceptionExtractor:
    """The Inception extractor from ``weights`` (path/URI), else clean-fid's cache, else a download."""
    from pipeline import storage

    if weights:
        if not storage.exists(weights):
            raise FeatureExtractorError(
                f"eval.inception_weights {weights}: no such file (expected {INCEPTION_FILE}, the 2015-12-05 "
                f"TF Inception as TorchScript from {INCEPTION_URL})"
            )
        with storage.local_copy(weights) as local:
            return InceptionExtractor(local, device, resize_threads)
    cached = cleanfid_cache_path()
    if not cached.is_file() and download:
        log.info("downloading %s to %s (clean-fid's cache)", INCEPTION_FILE, cached)
        try:
            _download(cached)
        except OSError as exc:
            raise _missing_weights_error(f"not in clean-fid's cache and the download failed: {exc}") from None
    if not cached.is_file():
        raise _missing_weights_error("not in clean-fid's cache and eval.inception_download is false")
    return InceptionExtractor(cached, device, resize_threads)


def build_extractor(eval_cfg, device=None) -> FeatureExtractor:
    """The extractor named by ``eval.feature_extractor`` (see ``EvalConfig``)."""
    spec = eval_cfg.feature_extractor
    threads = eval_cfg.resize_threads
    if spec == "inception":
        return build_inception(eval_cfg.inception_weights, eval_cfg.inception_download, device, threads)
    if spec == "randconv" or spec.startswith("randconv:"):
        parts = spec.split(":")[1:]
        try:
            seed = int(parts[0]) if parts else 0
            dim = int(parts[1]) if len(parts) > 1 else 32
        except ValueError:
            raise FeatureExtractorError(
                f"eval.feature_extractor {spec!r}: expected randconv[:SEED[:DIM]] with integers"
            ) from None
        return RandConvExtractor(seed, dim, device, threads)
    if spec == "classifier":
        from pipeline.eval.shape_classifier import ShapeFeatureExtractor, load_classifier

        if not eval_cfg.classifier:
            raise FeatureExtractorError("eval.feature_extractor 'classifier' needs eval.classifier (the classifier's "
                                        "path or URI)")
        return ShapeFeatureExtractor(load_classifier(eval_cfg.classifier), device, threads)
    if ":" in spec:
        module_name, attr = spec.split(":", 1)
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise FeatureExtractorError(f"eval.feature_extractor {spec!r}: cannot import ({exc})") from None
        made = factory()
        if isinstance(made, FeatureExtractor):
            return made
        if isinstance(made, nn.Module):
            return ModuleExtractor(made, name=spec, device=device, resize_threads=threads)
        raise FeatureExtractorError(
            f"eval.feature_extractor {spec!r}: the factory returned {type(made).__name__}, "
            "expected an nn.Module or a FeatureExtractor"
        )
    raise FeatureExtractorError(
        f"eval.feature_extractor {spec!r}: unknown (use inception, randconv[:SEED[:DIM]], classifier or module:factory)"
    )
