"""K customisations of one base in one training step (pure PyTorch): what a separate `GANSketchingStep` does for
each, with the frozen parts done once for all.

With the paper's default (only the mapping network trains, or only ``w_shift``), customisations of one base
differ only in their mapping networks, their two discriminators and their optimiser states; the synthesis
network and the sketcher F are the same frozen modules. A packed step keeps one synthesis network and one F,
and per customisation (a *lane*) its mapping network, discriminators, optimisers and random streams. Each
iteration runs one synthesis pass over all K×B samples (each sample with its own lane's styles and noise), one F
pass, then each lane's discriminators on its slice; the losses are summed (lanes share no trained parameter,
so each lane's gradients are its own) and every lane's optimisers step.

A lane draws exactly what a separate run draws, in the same order: latents, mixing and augmentation from its
own generators, and the noise a separate run takes from torch's global generator from a generator standing in
for it. So each lane's losses and weights follow a separate run's up to floating-point reassociation in the
batched passes, and a lane's `state_dict` has a separate step's format: a packed run can resume alone and
the other way round. ``trained=all`` cannot pack (each lane would need its own synthesis network). A running
average of G (``ema_beta``) is kept per lane for its mapping network only: the rest of G is frozen, so its
average is the base itself. On a GPU a separate run draws its noise from the CUDA generator and a lane from a CPU
one: there lanes follow separate runs in distribution, not draw for draw (checkpoints still load either way).
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.train.losses import apply_transform, d_loss, g_loss, parse_transform, r1_penalty, weight_loss
from pipeline.train.step_base import ObjectiveConfig, StepBase, adam, requires_grad, update_ema

PACKABLE = ("mapping", "w_shift")


class PackingError(ValueError):
    """Customisations that cannot share one step; the message says why."""


@dataclass
class Lane:
    """One customisation inside a packed step."""

    style: nn.Module  # its own mapping network (G.style)
    D_sketch: nn.Module
    D_image: nn.Module | None
    trained: list[tuple[str, nn.Parameter]]  # (name in G, parameter) of the trained subset
    originals: list[torch.Tensor]
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    rng: torch.Generator  # latents, mixing, augmentation: a separate step's ``rng``
    py_rng: random.Random  # the mixing layer: a separate step's ``py_rng``
    noise_rng: torch.Generator  # G's per-layer noise: what a separate run draws from torch's global generator
    style_ema: nn.Module | None = None  # the running average of ``style`` (train.ema_half_life_kimg > 0)

    @property
    def d_modules(self) -> list[nn.Module]:
        return [m for m in (self.D_sketch, self.D_image) if m is not None]


class PackedGANSketchingStep(StepBase):
    """GANSketching for K sketch sets of one base at once; ``step`` takes one batch of user sketches per lane."""

    def __init__(self, G: nn.Module, D_sketches: list[nn.Module], D_images: list[nn.Module | None],
                 sketcher: nn.Module, cfg: ObjectiveConfig, device: torch.device | str = "cpu",
                 seeds: list[int] | None = None):
        if cfg.trained not in PACKABLE:
            raise PackingError(f"train.trained={cfg.trained!r} cannot be packed: every customisation would need "
                               f"its own synthesis network (packable: {', '.join(PACKABLE)})")
        seeds = list(seeds if seeds is not None else range(len(D_sketches)))
        if not (len(D_sketches) == len(D_images) == len(seeds)) or not seeds:
            raise PackingError(f"a packed step needs one D_sketch, D_image and seed per lane, got "
                               f"{len(D_sketches)}, {len(D_images)} and {len(seeds)}")
        super().__init__(G, cfg, device, seeds[0])
        requires_grad(self.G, False)
        self.sketcher = self._prepare(sketcher).eval().requires_grad_(False)
        self.t_fake = parse_transform(cfg.transform_fake)
        self.t_real = parse_transform(cfg.transform_real)
        self.lanes = [self._lane(D_s, D_i, seed) for D_s, D_i, seed in zip(D_sketches, D_images, seeds)]

    def _lane(self, D_sketch: nn.Module, D_image: nn.Module | None, seed: int) -> Lane:
        cfg = self.cfg
        style = copy.deepcopy(self.G.style)
        prefix = "style."
        names = {n for n, _ in self.G.named_trainable(cfg.trained)}
        trained = [(prefix + n, p) for n, p in style.named_parameters() if prefix + n in names]
        style.requires_grad_(False)
        for _, p in trained:
            p.requires_grad_(True)
        D_sketch = self._prepare(D_sketch)
        D_image = self._prepare(D_image) if (D_image is not None and cfg.lambda_image > 0) else None
        params = [p for _, p in trained]
        groups = params if cfg.lr_mapping is None else [{"params": params, "lr": cfg.lr_mapping}]
        d_params = [p for m in (D_sketch, D_image) if m is not None for p in m.parameters()]
        reg_every = cfg.r1_every if cfg.r1_gamma > 0 else None
        lr_d = cfg.lr if cfg.lr_d is None else cfg.lr_d
        return Lane(style=style, D_sketch=D_sketch, D_image=D_image, trained=trained,
                    originals=[p.detach().clone() for p in params],
                    opt_g=adam(groups, cfg.lr, (cfg.beta1, cfg.beta2), device=self.device),
                    opt_d=adam(d_params, lr_d, (cfg.beta1, cfg.beta2), reg_every=reg_every, device=self.device),
                    rng=torch.Generator().manual_seed(seed), py_rng=random.Random(seed),
                    noise_rng=torch.Generator().manual_seed(seed),
                    style_ema=copy.deepcopy(style).eval().requires_grad_(False) if cfg.ema_beta else None)

    # -- generation: one synthesis pass for every lane -----------------------------------------------------
    def _latent(self, lane: Lane, batch: int) -> torch.Tensor:
        """The lane's W+ (batch × n_latent × D), sampled as a separate step samples and mixes."""
        G, dim = self.G, self.G.style_dim
        if self.cfg.mixing > 0 and torch.rand((), generator=lane.rng).item() < self.cfg.mixing:
            z = torch.randn(2, batch, dim, generator=lane.rng).to(self.device)
            inject = lane.py_rng.randint(1, G.n_latent - 1)
            w1, w2 = lane.style(z[0]), lane.style(z[1])
            return torch.cat([w1.unsqueeze(1).repeat(1, inject, 1),
                              w2.unsqueeze(1).repeat(1, G.n_latent - inject, 1)], 1)
        w = lane.style(torch.randn(batch, dim, generator=lane.rng).to(self.device))
        return w.unsqueeze(1).repeat(1, G.n_latent, 1)

    def _noise(self, lane: Lane, batch: int) -> list[torch.Tensor]:
        """Per-layer noise in the order and shapes G draws it when none is given."""
        shapes = [getattr(self.G.noises, f"noise_{i}").shape[-2:] for i in range(self.G.num_layers)]
        return [torch.empty(batch, 1, *hw).normal_(generator=lane.noise_rng).to(self.device) for hw in shapes]

    def generate_all(self, batch: int) -> torch.Tensor:
        """K×batch images, lane by lane."""
        latents, noises = [], []
        for lane in self.lanes:
            latents.append(self._latent(lane, batch))
            noises.append(self._noise(lane, batch))
        noise = [torch.cat(per_layer) for per_layer in zip(*noises)]
        return self.G([torch.cat(latents)], input_is_latent=True, noise=noise)[0]

    def _augmented(self, x: torch.Tensor, lane: Lane) -> torch.Tensor:
        return self.layout(self.augment(x, lane.rng))

    # -- one iteration ----------------------------------------------------------------------------------------
    def step(self, iteration: int, real_images: list[torch.Tensor | None], user_sketches: list[torch.Tensor]
             ) -> list[dict]:
        """One iteration of every lane: real images and user sketches one batch per lane; logs per lane."""
        cfg, kind, lanes = self.cfg, self.cfg.gan_loss, self.lanes
        if len(user_sketches) != len(lanes) or len(real_images) != len(lanes):
            raise ValueError(f"a packed step of {len(lanes)} lanes needs a batch of sketches and of real images "
                             f"per lane, got {len(user_sketches)} and {len(real_images)}")
        sketches = [s.to(self.device) for s in user_sketches]
        batch = sketches[0].shape[0]
        reals = [None if lane.D_image is None else self.layout(self._needs_real(r).to(self.device))
                 for lane, r in zip(lanes, real_images)]
        logs: list[dict[str, float]] = [{} for _ in lanes]

        # discriminator steps
        for lane in lanes:
            for m in lane.d_modules:
                requires_grad(m, True)
        with torch.no_grad(), self.autocast():
            fake = self.generate_all(batch)
        total = 0.0
        with self.autocast():
            fake_sketches = apply_transform(fake, self.t_fake, self.sketcher)  # one F pass for every lane
            for k, lane in enumerate(lanes):
                part = slice(k * batch, (k + 1) * batch)
                real_sk = self._augmented(apply_transform(sketches[k], self.t_real, self.sketcher), lane)
                loss_sk = d_loss(lane.D_sketch(real_sk), lane.D_sketch(self._augmented(fake_sketches[part], lane)),
                                 kind)
                logs[k]["loss_d_sketch"] = loss_sk.item()
                total = total + loss_sk
                if lane.D_image is not None:
                    loss_im = d_loss(lane.D_image(reals[k]), lane.D_image(fake[part]), kind)
                    logs[k]["loss_d_image"] = loss_im.item()
                    total = total + cfg.lambda_image * loss_im
        for lane in lanes:
            lane.opt_d.zero_grad(set_to_none=True)
        total.backward()
        for lane in lanes:
            lane.opt_d.step()

        if cfg.r1_gamma > 0 and iteration % cfg.r1_every == 0:
            reg = 0.0
            for k, lane in enumerate(lanes):
                lane.opt_d.zero_grad(set_to_none=True)
                real_sk = sketches[k].detach().requires_grad_(True)
                r1_sk = r1_penalty(lane.D_sketch(self._augmented(apply_transform(real_sk, self.t_real,
                                                                                  self.sketcher), lane)), real_sk)
                reg = reg + cfg.r1_gamma / 2 * r1_sk * cfg.r1_every
                logs[k]["r1_sketch"] = r1_sk.item()
                if lane.D_image is not None:
                    real_im = reals[k].detach().requires_grad_(True)
                    r1_im = r1_penalty(lane.D_image(real_im), real_im)
                    reg = reg + cfg.lambda_image * cfg.r1_gamma / 2 * r1_im * cfg.r1_every
                    logs[k]["r1_image"] = r1_im.item()
            reg.backward()
            for lane in lanes:
                lane.opt_d.step()

        # generator steps: one synthesis pass, gradients into each lane's mapping network
        for lane in lanes:
            for m in lane.d_modules:
                requires_grad(m, False)
            lane.opt_g.zero_grad(set_to_none=True)
        total = 0.0
        with self.autocast():
            fake = self.generate_all(batch)
            fake_sketches = apply_transform(fake, self.t_fake, self.sketcher)
            for k, lane in enumerate(lanes):
                part = slice(k * batch, (k + 1) * batch)
                loss_g_sk = g_loss(lane.D_sketch(self._augmented(fake_sketches[part], lane)), kind)
                logs[k]["loss_g_sketch"] = logs[k]["loss_sketch"] = loss_g_sk.item()
                total = total + loss_g_sk
                if lane.D_image is not None:
                    loss_im = g_loss(lane.D_image(fake[part]), kind)
                    logs[k]["loss_g_image"] = loss_im.item()
                    total = total + cfg.lambda_image * loss_im
        if cfg.lambda_weight > 0:
            for k, lane in enumerate(lanes):
                loss_w = weight_loss([p for _, p in lane.trained], lane.originals)
                logs[k]["loss_weight"] = loss_w.item()
                total = total + cfg.lambda_weight * loss_w
        total.backward()
        for lane in lanes:
            lane.opt_g.step()
            if lane.style_ema is not None:
                update_ema(lane.style_ema, lane.style, cfg.ema_beta)
        return [dict(sorted(d.items())) for d in logs]

    @staticmethod
    def _needs_real(images: torch.Tensor | None) -> torch.Tensor:
        if images is None:
            raise ValueError("lambda_image > 0 needs real images for every lane")
        return images

    # -- per-lane state, in a separate step's format ------------------------------------------------------
    def lane_generator_state(self, k: int, average: bool = False) -> dict[str, torch.Tensor]:
        """G's state dict with lane ``k``'s mapping network (its running average with ``average``): what a
        separate run's G (``G_ema``) holds."""
        lane = self.lanes[k]
        style = lane.style_ema if average else lane.style
        own = {f"style.{n}": t for n, t in style.state_dict().items()}
        return {n: own.get(n, t) for n, t in self.G.state_dict().items()}

    @contextlib.contextmanager
    def lane_generator(self, k: int, average: bool | None = None) -> Iterator[nn.Module]:
        """G with lane ``k``'s mapping network in place (the running average when the lane keeps one, unless
        ``average`` says otherwise): what a separate run would sample or publish. Restored on exit."""
        lane, frozen = self.lanes[k], self.G.style
        use_average = lane.style_ema is not None if average is None else average
        self.G.style = lane.style_ema if use_average else lane.style
        try:
            yield self.G
        finally:
            self.G.style = frozen

    def lane_state_dict(self, k: int) -> dict:
        """Lane ``k`` as `GANSketchingStep.state_dict` writes a separate run (loadable by either)."""
        lane = self.lanes[k]
        return {"G": self.lane_generator_state(k), "D_sketch": lane.D_sketch.state_dict(),
                "D_image": lane.D_image.state_dict() if lane.D_image is not None else {},
                "G_originals": {n: t for (n, _), t in zip(lane.trained, lane.originals)},
                **({"G_ema": self.lane_generator_state(k, average=True)} if lane.style_ema is not None else {}),
                "opt_g": lane.opt_g.state_dict(), "opt_d": lane.opt_d.state_dict(),
                "rng": {"torch": lane.noise_rng.get_state(), "gen": lane.rng.get_state(),
                        "py": lane.py_rng.getstate()}}

    def load_lane_state_dict(self, k: int, state: dict) -> None:
        lane = self.lanes[k]
        style = {n[len("style."):]: t for n, t in state["G"].items() if n.startswith("style.")}
        lane.style.load_state_dict(style)
        frozen = {n: t for n, t in state["G"].items() if not n.startswith("style.")}
        mine = {n: t for n, t in self.G.state_dict().items() if not n.startswith("style.")}
        if any(not torch.equal(frozen[n], mine[n]) for n in mine):
            raise PackingError(f"lane {k}: the checkpoint's synthesis network differs from this step's base: "
                               "only customisations of one base pack together")
        lane.D_sketch.load_state_dict(state["D_sketch"])
        if lane.D_image is not None:
            lane.D_image.load_state_dict(state["D_image"])
        lane.originals = [state["G_originals"][n].to(self.device) for n, _ in lane.trained]
        if lane.style_ema is not None:
            if "G_ema" not in state:
                raise ValueError("checkpoint has no G_ema: it was written by a run without an EMA of G "
                                 "(train.ema_half_life_kimg)")
            lane.style_ema.load_state_dict({n[len("style."):]: t for n, t in state["G_ema"].items()
                                            if n.startswith("style.")})
        lane.opt_g.load_state_dict(state["opt_g"])
        lane.opt_d.load_state_dict(state["opt_d"])
        lane.noise_rng.set_state(state["rng"]["torch"])
        lane.rng.set_state(state["rng"]["gen"])
        version, internal, gauss = state["rng"]["py"]
        lane.py_rng.setstate((version, tuple(internal), gauss))
