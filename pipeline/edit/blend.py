"""Interpolation between two models customised from the same base (GANSketching's model interpolation).

- ``weights``: every weight of G is ``(1 - α)·A + α·B``; at a given α that is one generator, which can be
  published as a run and registered with both parents, α and the space as its lineage.
- ``w``: for each z, ``w = (1 - α)·map_A(z) + α·map_B(z)`` rendered by the weight blend of the two synthesis
  networks (the same network when only the mappings were customised, the paper's default).
At α = 0 and α = 1 both reproduce the parents exactly.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import layout, storage
from pipeline.config import Config

SPACES = ("w", "weights")


@dataclass
class Parent:
    ref: str
    resolved: object  # ResolvedModel
    G: torch.nn.Module


def load_parents(cfg: Config, a: str, b: str, device) -> tuple[Parent, Parent]:
    """Both models, refused unless they share an architecture and (where recorded) a base."""
    from pipeline.edit.bases import base_of
    from pipeline.registry.mlflow_registry import resolve_model

    parents = []
    for ref in (a, b):
        resolved = resolve_model(ref, cfg)
        parents.append(Parent(ref, resolved, resolved.load_generator(cfg, device)))
    pa, pb = parents
    if pa.G.arch != pb.G.arch:
        raise ValueError(f"--a {a} and --b {b} have different architectures ({pa.G.arch} vs {pb.G.arch}): "
                         "only models of the same base blend")
    try:
        base_a, base_b = base_of(pa.resolved)[1], base_of(pb.resolved)[1]
    except LookupError:
        base_a = base_b = None  # not recorded: the architecture check is all we can do
    if base_a != base_b:
        raise ValueError(f"--a {a} and --b {b} come from different bases (sha256 {base_a[:12]} vs "
                         f"{base_b[:12]}): only models of the same base blend")
    return pa, pb


def blend_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - α)·a + α·b`` for every tensor (exactly ``a`` at α = 0 and ``b`` at α = 1)."""
    if a.keys() != b.keys():
        raise ValueError(f"the two generators' keys differ: {sorted(set(a) ^ set(b))[:5]}")
    if alpha == 0:
        return {k: v.clone() for k, v in a.items()}
    if alpha == 1:
        return {k: v.clone() for k, v in b.items()}
    return {k: torch.lerp(a[k].float(), b[k].float(), alpha).to(a[k].dtype) for k in a}


def blended_generator(pa: Parent, pb: Parent, alpha: float) -> torch.nn.Module:
    from pipeline.models.factory import build_generator

    G = build_generator(dict(pa.G.arch)).to(next(pa.G.parameters()).device)
    G.load_state_dict(blend_state(pa.G.state_dict(), pb.G.state_dict(), alpha))
    return G.eval().requires_grad_(False)


@torch.no_grad()
def render_blend(pa: Parent, pb: Parent, space: str, alphas: list[float], seeds: list[int], psi: float,
                 device) -> np.ndarray:
    """Images row by row: one row per seed, one column per α (uint8 N x H x W x 3)."""
    from pipeline.models import sampling

    if space not in SPACES:
        raise ValueError(f"--space must be one of {SPACES}, got {space!r}")
    z = sampling.latents_for_seeds(seeds, pa.G.style_dim).to(device)
    columns = []
    for alpha in alphas:
        G = blended_generator(pa, pb, alpha)
        if space == "weights":
            w = G.get_latent(z)
        else:  # lerp is exact at its ends: alpha 0 and 1 give the parents' own w
            w = torch.lerp(pa.G.get_latent(z), pb.G.get_latent(z), alpha)
        if psi < 1:
            centre = sampling.mean_w(G, device)
            w = centre + psi * (w - centre)
        columns.append(sampling.synthesize(G, w))
    return np.stack(columns, axis=1).reshape(-1, *columns[0].shape[1:])


def alphas_for(steps: int) -> list[float]:
    if steps < 2:
        raise ValueError(f"--steps must be at least 2 (the two parents), got {steps}")
    return [i / (steps - 1) for i in range(steps)]


def check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0 <= alpha <= 1:
        raise ValueError(f"--alpha must be in [0, 1], got {alpha}")
    return alpha


def publish_blend(cfg: Config, pa: Parent, pb: Parent, alpha: float, space: str) -> str:
    """Write the weight blend at α as a finished run (its final G and metadata naming both parents, α and the
    space) so that the registry takes it like any customisation; returns the run's URI."""
    from pipeline.models.checkpoints import to_bytes

    if space != "weights":
        raise ValueError("--register needs --space weights: a blend in W is two mapping networks, not one "
                         "generator that can be registered")
    ma, mb = pa.resolved.metadata or {}, pb.resolved.metadata or {}
    sa = (ma.get("sketch_set") or {}).get("name") or pa.resolved.name
    sb = (mb.get("sketch_set") or {}).get("name") or pb.resolved.name
    name = f"blend-{sa}-{sb}-{round(alpha * 100):03d}"
    run_uri = layout.run_uri(cfg, name)
    G = blended_generator(pa, pb, alpha)
    data = to_bytes(G.cpu())
    lineage = {"a": pa.ref, "a_version": pa.resolved.version, "b": pb.ref, "b_version": pb.resolved.version,
               "alpha": alpha, "space": space}
    meta = {**{k: v for k, v in ma.items() if k in ("arch", "base_g", "base_g_sha256", "category", "config")},
            "kind": "blend", "run_name": name, "blend": lineage, "g_sha256": hashlib.sha256(data).hexdigest(),
            "sketch_set": {"name": f"blend-{sa}-{sb}"}, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                     time.gmtime())}
    meta["arch"] = dict(G.arch)
    with storage.staged_publish(layout.final_uri(run_uri), marker=layout.FINAL_METADATA) as staging:
        storage.write_bytes(storage.join(staging, layout.G_FILE), data)
        storage.write_text(storage.join(staging, layout.FINAL_METADATA), json.dumps(meta, indent=2, sort_keys=True))
    return run_uri


def run_blend(cfg: Config, a: str, b: str, space: str, steps: int, out: str | None, n: int, seed: int,
              truncation: float, alpha: float | None, register: bool) -> list[str]:
    """`sketchgan blend`: a strip (rows: seeds, columns: α from 0 to 1) or the images at one α, and with
    ``register`` the weight blend at α registered; returns the lines to print."""
    from pipeline.data.images import grid_png
    from pipeline.models import factory, sampling

    if space not in SPACES:
        raise ValueError(f"--space must be one of {SPACES}, got {space!r}")
    if not 1 <= n <= 64:
        raise ValueError(f"--n (seeds, one row each) must be between 1 and 64, got {n}")
    if register and alpha is None:
        raise ValueError("--register needs --alpha: the blend to register")
    if register and space != "weights":
        raise ValueError("--register needs --space weights: a blend in W is two mapping networks, not one "
                         "generator that can be registered")
    if out is None and not register:
        raise ValueError("give --out (the picture) or --alpha with --register")
    alphas = [check_alpha(alpha)] if alpha is not None else alphas_for(steps)
    psi = sampling.check_truncation(truncation, "--truncation")
    device = factory.device_default()
    pa, pb = load_parents(cfg, a, b, device)
    lines = []
    if out:
        images = render_blend(pa, pb, space, alphas, list(range(seed, seed + n)), psi, device)
        storage.write_bytes(out, grid_png(images, len(alphas)))
        lines.append(f"{out}: {n} seed(s) x alpha {', '.join(f'{x:.2f}' for x in alphas)} in {space} space")
    if register:
        from pipeline.registry.mlflow_registry import register_run

        run_uri = publish_blend(cfg, pa, pb, alphas[0], space)
        name, version = register_run(cfg, run_uri)
        lines.append(f"registered {name} version {version}: {a} x {1 - alphas[0]:.2f} + {b} x {alphas[0]:.2f} "
                     f"({space}) from {run_uri}")
    return lines
