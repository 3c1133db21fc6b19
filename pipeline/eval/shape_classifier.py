"""A small shape classifier for the generated ``shapes`` category, and its penultimate features for FID.

Used by ``benchmarks/shape_customisation.py``: trained on real rendered shapes (`pipeline.data.synthetic`),
it says which shape a generated image shows (the share of the target shape before and after
customisation), and its penultimate layer is a domain feature space for the Fréchet distance
(`pipeline.eval.fid`), through the ordinary feature-extractor interface (`pipeline.eval.features`):

- `ShapeFeatureExtractor(classifier)` is a `FeatureExtractor` (float N x 3 x S x S in [0, 255] -> N x D);
- ``eval.feature_extractor = "pipeline.eval.shape_classifier:extractor_from_env"`` loads the classifier
  saved at ``$SKETCHGAN_SHAPE_CLASSIFIER`` (see `save_classifier`).

Inputs are images of ``input_size`` px (32 for the benchmark), uint8 N x H x W x 3 or float in [0, 255].
"""

from __future__ import annotations

import io
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.eval.features import FeatureExtractor, state_dict_digest

log = logging.getLogger(__name__)

CLASSIFIER_ENV = "SKETCHGAN_SHAPE_CLASSIFIER"


class ShapeClassifier(nn.Module):
    """Three conv blocks (each halving the resolution), global average pooling, a ``feature_dim`` hidden
    layer (the penultimate features) and a linear head over ``classes``."""

    def __init__(self, classes: tuple[str, ...], input_size: int = 32, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.classes = tuple(classes)
        self.input_size = input_size
        self.width, self.feature_dim = width, feature_dim

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                    nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                    nn.MaxPool2d(2)]

        self.body = nn.Sequential(*block(3, width), *block(width, 2 * width), *block(2 * width, 4 * width),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(4 * width, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(feature_dim, len(self.classes))

    @staticmethod
    def normalise(x: torch.Tensor) -> torch.Tensor:
        """Float [0, 255] -> [-1, 1]."""
        return x / 127.5 - 1.0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Float N x 3 x S x S in [0, 255] -> penultimate features N x feature_dim."""
        return self.hidden(self.body(self.normalise(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float N x 3 x S x S in [0, 255] -> logits N x K."""
        return self.head(self.features(x))


def to_float_batch(images) -> torch.Tensor:
    """uint8 N x H x W x 3 (numpy or tensor) -> float N x 3 x H x W in [0, 255]; float input passes through."""
    if isinstance(images, torch.Tensor) and images.dtype != torch.uint8:
        return images.float()
    array = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 images N x H x W x 3, got shape {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float()


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Label-preserving changes: flips, 90° rotations, a small shift, brightness/contrast jitter, and blur or
    noise on some images (generated images are softer than rendered ones)."""
    n = x.shape[0]
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(3)
    x = torch.rot90(x, int(torch.randint(0, 4, (), generator=gen)), dims=(2, 3))
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    gain = 1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    bias = 30 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    x = (x - 127.5) * gain + 127.5 + bias
    blur = torch.rand(n, generator=gen) < 0.3
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
        soft = F.conv2d(F.pad(x[blur], [1] * 4, mode="replicate"), k, groups=3)
        x = x.clone()
        x[blur] = soft
    noisy = (torch.rand(n, 1, 1, 1, generator=gen) < 0.3).float()
    x = x + noisy * 8 * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 255)


@dataclass
class TrainResult:
    classifier: ShapeClassifier
    train_accuracy: float
    seconds: float


def train_classifier(images: np.ndarray, labels: list[str], classes: tuple[str, ...], epochs: int = 3,
                     batch_size: int = 64, lr: float = 2e-3, seed: int = 0, width: int = 32,
                     feature_dim: int = 64, progress: bool = False) -> TrainResult:
    """Train a `ShapeClassifier` on uint8 images N x S x S x 3 labelled with names from ``classes``."""
    t0 = time.time()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_all = to_float_batch(images)
    index = {c: i for i, c in enumerate(classes)}
    y_all = torch.tensor([index[label] for label in labels])
    model = ShapeClassifier(classes, input_size=x_all.shape[-1], width=width, feature_dim=feature_dim)
    steps_per_epoch = max(1, len(x_all) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    model.train()
    correct = seen = 0
    for epoch in range(epochs):
        order = torch.randperm(len(x_all), generator=gen)
        correct = seen = 0
        for s in range(steps_per_epoch):
            idx = order[s * batch_size:(s + 1) * batch_size]
            x, y = _augment(x_all[idx], gen), y_all[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        if progress:
            print(f"  classifier epoch {epoch + 1}/{epochs}: train accuracy {correct / seen:.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    return TrainResult(model, correct / max(seen, 1), time.time() - t0)


@torch.no_grad()
def predict_proba(model: ShapeClassifier, images, batch_size: int = 256) -> np.ndarray:
    """Class probabilities N x K of uint8 images N x S x S x 3 (or float N x 3 x S x S in [0, 255])."""
    model.eval()
    x = to_float_batch(images)
    if x.shape[-1] != model.input_size or x.shape[-2] != model.input_size:
        x = F.interpolate(x, size=(model.input_size, model.input_size), mode="bilinear", antialias=True,
                          align_corners=False)
    return np.concatenate([F.softmax(model(x[i:i + batch_size]), 1).numpy() for i in range(0, len(x), batch_size)])


def predict(model: ShapeClassifier, images, batch_size: int = 256) -> list[str]:
    """The predicted class name of every image."""
    return [model.classes[i] for i in predict_proba(model, images, batch_size).argmax(1)]


def accuracy(model: ShapeClassifier, images, labels: list[str]) -> float:
    pred = predict(model, images)
    return float(np.mean([p == t for p, t in zip(pred, labels)])) if labels else float("nan")


class _Penultimate(nn.Module):
    def __init__(self, classifier: ShapeClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)


class ShapeFeatureExtractor(FeatureExtractor):
    """The classifier's penultimate features as a FID feature extractor (input resized to its input size)."""

    def __init__(self, classifier: ShapeClassifier, device=None, resize_threads: int | None = None):
        super().__init__(device or "cpu", resize_threads)
        self.net = _Penultimate(classifier).to(self.device).eval()
        self.name = "shape-classifier"
        self.input_size = classifier.input_size
        self.dim = classifier.feature_dim
        self.version = state_dict_digest(classifier)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def save_classifier(model: ShapeClassifier, path: str) -> None:
    """Save the architecture and weights (a plain dict of tensors and primitives)."""
    from pipeline import storage

    buf = io.BytesIO()
    torch.save({"classes": list(model.classes), "input_size": model.input_size, "width": model.width,
                "feature_dim": model.feature_dim, "state_dict": model.state_dict()}, buf)
    storage.write_bytes(path, buf.getvalue())


def load_classifier(path: str) -> ShapeClassifier:
    """A classifier saved by `save_classifier` (path or URI); a missing or unusable file is a
    ``FeatureExtractorError`` naming it."""
    from pipeline import storage
    from pipeline.eval.features import FeatureExtractorError

    if not storage.exists(path):
        raise FeatureExtractorError(f"classifier {path}: no such file (save one with "
                                    "pipeline.eval.shape_classifier.save_classifier)")
    try:
        blob = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
        model = ShapeClassifier(tuple(blob["classes"]), int(blob["input_size"]), int(blob["width"]),
                                int(blob["feature_dim"]))
        model.load_state_dict(blob["state_dict"])
    except Exception as exc:  # noqa: BLE001 - any failure means the file is not a usable classifier
        raise FeatureExtractorError(f"classifier {path}: not a classifier saved by save_classifier ({exc})") from None
    return model.eval()


def extractor_from_env() -> ShapeFeatureExtractor:
    """Factory for ``eval.feature_extractor``: the classifier saved at ``$SKETCHGAN_SHAPE_CLASSIFIER``."""
    path = os.environ.get(CLASSIFIER_ENV)
    if not path:
        raise ValueError(f"set {CLASSIFIER_ENV} to a classifier saved by save_classifier")
    return ShapeFeatureExtractor(load_classifier(path))
