"""Build networks from the `model` config section and rebuild a finished run's generator."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.models.stylegan2 import Discriminator, Generator

GENERATOR_KEYS = ("size", "style_dim", "n_mlp", "channel_multiplier", "lr_mlp", "w_shift", "channel_max")


def generator_kwargs(model_cfg) -> dict[str, Any]:
    """The architecture of G as a plain dict (stored in run metadata so any run can be rebuilt)."""
    return {k: getattr(model_cfg, k) for k in GENERATOR_KEYS}


def discriminator_kwargs(arch: dict[str, Any]) -> dict[str, Any]:
    return {k: arch[k] for k in ("size", "channel_multiplier", "channel_max") if k in arch}


def build_generator(arch: dict[str, Any]) -> Generator:
    unknown = set(arch) - set(GENERATOR_KEYS)
    if unknown:
        raise ValueError(f"generator architecture has unknown keys: {sorted(unknown)}")
    return Generator(**arch)


def build_discriminator(arch: dict[str, Any]) -> Discriminator:
    return Discriminator(**discriminator_kwargs(arch))


def device_default() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_generator(g_uri: str, arch: dict[str, Any], device: torch.device | str | None = None) -> Generator:
    """A generator of architecture ``arch`` with the weights at ``g_uri`` (strictly checked), in eval mode."""
    from pipeline.models.checkpoints import load_into, load_state_dict

    G = build_generator(arch)
    load_into(G, load_state_dict(g_uri), source=g_uri)
    return G.to(device or device_default()).eval().requires_grad_(False)


def load_run_generator(run_uri: str, device: torch.device | str | None = None) -> tuple[Generator, dict]:
    """The final generator of a finished training run and the run's final metadata."""
    from pipeline import layout

    run = layout.open_finished_run(run_uri)
    arch = run.metadata.get("arch") or run.metadata.get("model")
    if not isinstance(arch, dict):
        raise ValueError(f"{layout.final_metadata_uri(run_uri)}: no generator architecture ('arch') recorded")
    return load_generator(run.g_uri, arch, device), run.metadata
