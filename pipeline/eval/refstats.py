"""Reference statistics of an evaluation set, cached in storage.

The cache key hashes the evaluation set's content id, the extractor's name and version and the resize
protocol, so any change to one of them gives a new entry. An entry is one npz (``mu``, ``sigma``, ``feats``
for KID, and the key's inputs) published atomically with ``storage.write_bytes``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass

import numpy as np

from pipeline import layout, storage
from pipeline.config import Config
from pipeline.eval.features import FeatureExtractor
from pipeline.eval.fid import extract_features, feature_statistics
from pipeline.eval.resize import PROTOCOL
from pipeline.layout import EvalSetError

log = logging.getLogger(__name__)


@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    feats: np.ndarray
    key: str
    uri: str
    cached: bool  # True when read from the cache rather than computed


def evalset_id(evalset_uri: str) -> str:
    """The evaluation set's content id: its manifest's ``id`` (a content hash), else a hash of its images."""
    stored = layout.open_evalset(evalset_uri)
    if isinstance(stored.id, str) and stored.id:
        return stored.id
    return "sha256:" + hashlib.sha256(storage.read_bytes(stored.images_uri)).hexdigest()


def stats_key(set_id: str, extractor: FeatureExtractor, protocol: str = PROTOCOL, part: str | None = None) -> str:
    fields = {"evalset": set_id, "extractor": extractor.name, "version": extractor.version, "protocol": protocol}
    if part is not None:  # the whole set keeps the key it always had
        fields["part"] = part
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:40]


def load_evalset_images(evalset_uri: str, part: str | None = None) -> np.ndarray:
    """The evaluation set's images (or its ``validation`` / ``test`` part) as uint8 N x H x W x 3 (at least two)."""
    from pipeline.data.evalsets import load_evalset

    images = load_evalset(evalset_uri, part)[1]
    if len(images) < 2:
        what = f"its {part} part" if part else "it"
        raise EvalSetError(f"evaluation set {evalset_uri}: {what} needs at least 2 images, has {len(images)}")
    return images


def _read_cached(uri: str, key: str) -> ReferenceStats | None:
    try:
        with np.load(io.BytesIO(storage.read_bytes(uri))) as npz:
            stats = ReferenceStats(npz["mu"], npz["sigma"], npz["feats"], key, uri, cached=True)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("reference statistics %s are unreadable (%s); computing them again", uri, exc)
        return None
    d = stats.mu.shape[0]
    if stats.sigma.shape != (d, d) or stats.feats.ndim != 2 or stats.feats.shape[1] != d:
        log.warning("reference statistics %s have inconsistent shapes; computing them again", uri)
        return None
    return stats


def reference_stats(cfg: Config, evalset_uri: str, extractor: FeatureExtractor,
                    compute_features=None, part: str | None = None) -> ReferenceStats:
    """Cached statistics of an evaluation set (or of its ``validation`` / ``test`` part) for ``extractor``;
    computed and published on a miss.

    ``compute_features(evalset_uri, part) -> feats`` replaces the local feature computation (the benchmark runs
    it in a Ray actor); by default the images are read and featurised here.
    """
    set_id = evalset_id(evalset_uri)
    key = stats_key(set_id, extractor, part=part)
    uri = layout.fid_stats_uri(cfg, key)
    if storage.exists(uri):
        stats = _read_cached(uri, key)
        if stats is not None:
            log.info("reusing cached reference statistics for %s%s (%s, %d images) from %s",
                     evalset_uri, f" ({part} part)" if part else "", extractor.cache_id, len(stats.feats), uri)
            return stats
    where = f"{evalset_uri} ({part} part)" if part else evalset_uri
    log.info("computing reference statistics for %s with %s", where, extractor.cache_id)
    if compute_features is None:
        feats = extract_features(load_evalset_images(evalset_uri, part), extractor, cfg.eval.batch_size)
    else:
        feats = np.asarray(compute_features(evalset_uri, part), dtype=np.float32)
    mu, sigma = feature_statistics(feats)
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, feats=feats, evalset=evalset_uri, evalset_id=set_id, part=part or "all",
             extractor=extractor.name, extractor_version=extractor.version, protocol=PROTOCOL)
    storage.write_bytes(uri, buf.getvalue())
    log.info("published reference statistics for %s to %s", evalset_uri, uri)
    return ReferenceStats(mu, sigma, feats, key, uri, cached=False)
