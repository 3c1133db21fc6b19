"""Which base a model comes from, and that base's GANSpace components (computed once, kept beside the base)."""

from __future__ import annotations

import logging
import time

from pipeline import layout, storage
from pipeline.config import Config
from pipeline.edit import ganspace

log = logging.getLogger("sketchgan.edit")


def base_of(resolved) -> tuple[str, str]:
    """(base G URI, its sha256) of a resolved model: its recorded base when customised, itself when a base."""
    from pipeline.models.checkpoints import sha256_of

    meta = resolved.metadata or {}
    if meta.get("base_g") and meta.get("base_g_sha256"):
        return str(meta["base_g"]), str(meta["base_g_sha256"])
    if resolved.g_uri and not meta.get("base_g"):
        return resolved.g_uri, sha256_of(resolved.g_uri)
    raise LookupError(f"{resolved.name}: its base is not recorded (metadata base_g / base_g_sha256): pass "
                      "the components file with --ganspace")


def compute_components(cfg: Config, base: str, n_samples: int = ganspace.DEFAULT_SAMPLES,
                       n_components: int | None = None, seed: int = ganspace.DEFAULT_SEED,
                       force: bool = False) -> str:
    """Compute a base's GANSpace components unless already there; returns the npz's URI."""
    from pipeline.models import factory
    from pipeline.registry.mlflow_registry import resolve_model

    resolved = resolve_model(base, cfg)
    g_uri, sha = base_of(resolved)
    if g_uri != resolved.g_uri:
        raise ValueError(f"{base} is customised from {g_uri}: compute components for the base itself")
    out = layout.ganspace_uri(g_uri, sha)
    if storage.exists(out) and not force:
        log.info("components for %s already at %s", base, out)
        return out
    t0 = time.time()
    G = resolved.load_generator(cfg, factory.device_default())
    comps = ganspace.compute(G, n_samples, n_components, seed)
    info = {"base_g": g_uri, "base_g_sha256": sha, "n_samples": n_samples, "seed": seed,
            "components": int(comps.comp.shape[0])}
    storage.write_bytes(out, ganspace.to_npz(comps, info))  # one object: visible whole or not at all
    log.info("%d components of %s from %d samples in %.1fs -> %s", comps.comp.shape[0], base, n_samples,
             time.time() - t0, out)
    return out


def components_for(resolved, explicit: str | None = None) -> ganspace.Components:
    """The components an edit of ``resolved`` uses: ``explicit`` when given, else those beside its base."""
    if explicit:
        return ganspace.load(explicit)
    g_uri, sha = base_of(resolved)
    uri = layout.ganspace_uri(g_uri, sha)
    if not storage.exists(uri):
        raise FileNotFoundError(f"no GANSpace components for the base {g_uri} (looked for {uri}): run "
                                f"`sketchgan ganspace compute --base {g_uri.rsplit('/', 1)[0]}` or pass --ganspace")
    return ganspace.load(uri)
