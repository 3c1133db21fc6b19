"""Building a run's training step from its config: networks (from the base checkpoints, or at random for
pretraining), the sketcher, the objective's settings; and what the run publishes from it."""

from __future__ import annotations

import copy

import torch

from pipeline import layout
from pipeline.models import factory
from pipeline.models.checkpoints import load_into, load_state_dict
from pipeline.models.sketchers import build_sketcher
from pipeline.train.objective import GANSketchingStep
from pipeline.train.packed import PackedGANSketchingStep, PackingError
from pipeline.train.spec import RunSpec
from pipeline.train.step_base import ObjectiveConfig, ema_beta_for, process_group_size
from pipeline.train.stylegan2_step import StyleGAN2Step

TrainingStep = GANSketchingStep | StyleGAN2Step


def build_step(spec: RunSpec, device: torch.device, seed: int) -> TrainingStep:
    """The objective's step with networks from the base checkpoints (train) or at random (pretrain)."""
    cfg = spec.cfg
    arch = factory.generator_kwargs(cfg.model)
    torch.manual_seed(spec.section.seed)  # identical initial weights on every rank
    G = factory.build_generator(arch)
    if spec.kind == "pretrain":
        p = cfg.pretrain
        ocfg = ObjectiveConfig(lr=p.lr, r1_gamma=p.r1_gamma, r1_every=p.r1_every, mixing=p.mixing,
                               augment=p.augment, trained="all", precision=p.precision,
                               ema_beta=ema_beta_for(p.batch_size, p.ema_half_life_kimg))
        return StyleGAN2Step(G, factory.build_discriminator(arch), ocfg, device=device, seed=seed)
    G, D_sketch, D_image, sketcher, ocfg = customisation_parts(spec, G, device)
    return GANSketchingStep(G, D_sketch, D_image, sketcher, ocfg, device=device, seed=seed)


def customisation_parts(spec: RunSpec, G: torch.nn.Module, device: torch.device):
    """What a GANSketching step is made of: G (just built, after ``torch.manual_seed``) loaded with the base,
    the two discriminators (from the base D, or the sketch one at random), the sketcher and the settings."""
    cfg, t = spec.cfg, spec.cfg.train
    arch = factory.generator_kwargs(cfg.model)
    if cfg.model.base_g:
        load_into(G, load_state_dict(cfg.model.base_g), source=cfg.model.base_g)
    D_image = factory.build_discriminator(arch)
    D_sketch = factory.build_discriminator(arch)
    if cfg.model.base_d:
        base_d = load_state_dict(cfg.model.base_d)
        load_into(D_image, base_d, source=cfg.model.base_d)
        if t.dsketch_init == "base":
            load_into(D_sketch, base_d, source=cfg.model.base_d)
    sketcher = build_sketcher(cfg.data.sketcher, cfg.data.sketcher_weights, norm="batch", device=device)
    ocfg = ObjectiveConfig.of(t, ema_beta=ema_beta_for(t.batch_size, t.ema_half_life_kimg))
    return G, D_sketch, D_image, sketcher, ocfg


def build_packed_step(specs: list[RunSpec], device: torch.device) -> PackedGANSketchingStep:
    """One packed step for the runs of a group (`plan.pack_groups`): each lane starts as its separate run would
    (the same seeded networks, the same random streams)."""
    from pipeline.train.plan import pack_key

    keys = {pack_key(s) for s in specs}
    if len(keys) != 1:
        raise PackingError(f"runs {', '.join(s.run_name for s in specs)} differ in base, architecture or "
                           "settings: they cannot share one step")
    spec = specs[0]
    torch.manual_seed(spec.section.seed)  # as `build_step`: every lane starts from a separate run's weights
    G = factory.build_generator(factory.generator_kwargs(spec.cfg.model))
    G, D_sketch, D_image, sketcher, ocfg = customisation_parts(spec, G, device)
    n = len(specs)
    return PackedGANSketchingStep(G, [copy.deepcopy(D_sketch) for _ in range(n)],
                                  [copy.deepcopy(D_image) for _ in range(n)], sketcher, ocfg, device=device,
                                  seeds=[s.section.seed * 1000 for s in specs])


def step_modules(step: TrainingStep) -> list[torch.nn.Module]:
    names = ("G", "G_ema", "D", "D_sketch", "D_image")
    return [m for m in (getattr(step, n, None) for n in names) if m is not None]


def broadcast_from_rank0(step: TrainingStep) -> None:
    """Start every data-parallel worker from rank 0's weights (as DDP does)."""
    if process_group_size() <= 1:
        return
    with torch.no_grad():
        for module in step_modules(step):
            for t in list(module.parameters()) + list(module.buffers()):
                torch.distributed.broadcast(t.data, src=0)


def final_generator(step: TrainingStep) -> torch.nn.Module:
    """What the run publishes: the EMA generator when the run keeps one (always for pretraining), else G."""
    return step.G_ema if getattr(step, "G_ema", None) is not None else step.G


def published_discriminators(step: TrainingStep) -> dict[str, torch.nn.Module]:
    """The discriminators a run publishes beside G, by file name."""
    if isinstance(step, StyleGAN2Step):
        return {layout.D_FILE: step.D}
    return discriminator_files(step.D_sketch, step.D_image)


def discriminator_files(D_sketch: torch.nn.Module, D_image: torch.nn.Module | None) -> dict[str, torch.nn.Module]:
    """A customisation's discriminators by published file name (the image one only when it trains)."""
    out = {layout.D_SKETCH_FILE: D_sketch}
    if D_image is not None:
        out[layout.D_IMAGE_FILE] = D_image
    return out
