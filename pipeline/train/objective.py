"""The GANSketching training step, in pure PyTorch.

One `step()` is one iteration: a discriminator step on user sketches against sketches of generated images (and,
with ``lambda_image``, real images against generated ones), lazy R1 every ``r1_every`` iterations, then a
generator step; only the ``trained`` subset of G learns. All randomness comes from RNGs kept in
``state_dict()``, so a run stopped and resumed ends with the same weights as one run straight through.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from pipeline.train.losses import apply_transform, d_loss, g_loss, parse_transform, r1_penalty, weight_loss
from pipeline.train.step_base import ObjectiveConfig, StepBase, adam, requires_grad, sync_grads, update_ema


class GANSketchingStep(StepBase):
    """Fine-tune G so that sketches of its images match the user's sketches (GANSketching)."""

    def __init__(self, G: nn.Module, D_sketch: nn.Module, D_image: nn.Module | None, sketcher: nn.Module,
                 cfg: ObjectiveConfig, device: torch.device | str = "cpu", seed: int = 0):
        super().__init__(G, cfg, device, seed)
        self.D_sketch = self._prepare(D_sketch)
        self.D_image = self._prepare(D_image) if (D_image is not None and cfg.lambda_image > 0) else None
        self.sketcher = self._prepare(sketcher).eval().requires_grad_(False)
        self.t_fake = parse_transform(cfg.transform_fake)
        self.t_real = parse_transform(cfg.transform_real)

        named = list(G.named_trainable(cfg.trained))
        if not named:
            raise ValueError(f"trained subset {cfg.trained!r} selects no generator parameters")
        self.trained_names = [n for n, _ in named]
        self.g_params = [p for _, p in named]
        requires_grad(self.G, False)
        for p in self.g_params:
            p.requires_grad_(True)
        self.g_originals = [p.detach().clone() for p in self.g_params]
        self.d_modules = [m for m in (self.D_sketch, self.D_image) if m is not None]
        self.d_params = [p for m in self.d_modules for p in m.parameters()]
        reg_every = cfg.r1_every if cfg.r1_gamma > 0 else None
        g_groups = self.g_params
        if cfg.lr_mapping is not None:  # a group of its own only then: checkpoints without it load as before
            mapping = {n for n, _ in G.named_trainable("mapping")}
            g_groups = [g for g in ({"params": [p for n, p in named if n not in mapping]},
                                    {"params": [p for n, p in named if n in mapping], "lr": cfg.lr_mapping})
                        if g["params"]]
        self.opt_g = adam(g_groups, cfg.lr, (cfg.beta1, cfg.beta2), device=self.device)
        lr_d = cfg.lr if cfg.lr_d is None else cfg.lr_d
        self.opt_d = adam(self.d_params, lr_d, (cfg.beta1, cfg.beta2), reg_every=reg_every, device=self.device)
        # Optional, not part of GANSketching: a running average of G damps the step-to-step wander of a
        # high learning rate (what the run publishes when on).
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False) if cfg.ema_beta else None

    def sketch_fake(self, images: torch.Tensor) -> torch.Tensor:
        return self.layout(self.augment(apply_transform(images, self.t_fake, self.sketcher), self.rng))

    def sketch_real(self, sketches: torch.Tensor) -> torch.Tensor:
        return self.layout(self.augment(apply_transform(sketches, self.t_real, self.sketcher), self.rng))

    def _plus_image_term(self, total: torch.Tensor, loss_image: torch.Tensor, logs: dict, key: str) -> torch.Tensor:
        """``total`` plus the image discriminator's loss weighted by ``lambda_image`` (logged under ``key``)."""
        logs[key] = loss_image.item()
        return total + self.cfg.lambda_image * loss_image

    def step(self, iteration: int, real_images: torch.Tensor | None, user_sketches: torch.Tensor) -> dict:
        cfg, loss_kind = self.cfg, self.cfg.gan_loss
        user_sketches = user_sketches.to(self.device)
        batch = user_sketches.shape[0]
        if self.D_image is not None:
            if real_images is None:
                raise ValueError("lambda_image > 0 needs real images")
            real_images = self.layout(real_images.to(self.device))
        logs: dict[str, float] = {}

        # discriminator step
        for m in self.d_modules:
            requires_grad(m, True)
        with torch.no_grad(), self.autocast():
            fake = self.generate(batch)
        self.opt_d.zero_grad(set_to_none=True)
        with self.autocast():
            loss_sk = d_loss(self.D_sketch(self.sketch_real(user_sketches)),
                             self.D_sketch(self.sketch_fake(fake)), loss_kind)
            total = loss_sk
            if self.D_image is not None:
                total = self._plus_image_term(total, d_loss(self.D_image(real_images), self.D_image(fake), loss_kind),
                                              logs, "loss_d_image")
        total.backward()
        sync_grads(self.d_params)
        self.opt_d.step()
        logs["loss_d_sketch"] = loss_sk.item()

        if cfg.r1_gamma > 0 and iteration % cfg.r1_every == 0:
            self.opt_d.zero_grad(set_to_none=True)
            real_sk = user_sketches.detach().requires_grad_(True)
            r1_sk = r1_penalty(self.D_sketch(self.sketch_real(real_sk)), real_sk)
            reg = cfg.r1_gamma / 2 * r1_sk * cfg.r1_every
            logs["r1_sketch"] = r1_sk.item()
            if self.D_image is not None:
                real_im = real_images.detach().requires_grad_(True)
                r1_im = r1_penalty(self.D_image(real_im), real_im)
                reg = reg + cfg.lambda_image * cfg.r1_gamma / 2 * r1_im * cfg.r1_every
                logs["r1_image"] = r1_im.item()
            reg.backward()
            sync_grads(self.d_params)
            self.opt_d.step()

        # generator step
        for m in self.d_modules:
            requires_grad(m, False)
        self.opt_g.zero_grad(set_to_none=True)
        with self.autocast():
            fake = self.generate(batch)
            loss_g_sk = g_loss(self.D_sketch(self.sketch_fake(fake)), loss_kind)
            total = loss_g_sk
            if self.D_image is not None:
                total = self._plus_image_term(total, g_loss(self.D_image(fake), loss_kind), logs, "loss_g_image")
        if cfg.lambda_weight > 0:
            loss_w = weight_loss(self.g_params, self.g_originals)
            total = total + cfg.lambda_weight * loss_w
            logs["loss_weight"] = loss_w.item()
        total.backward()
        sync_grads(self.g_params)
        self.opt_g.step()
        logs["loss_g_sketch"] = loss_g_sk.item()
        logs["loss_sketch"] = logs["loss_g_sketch"]
        if self.G_ema is not None:
            update_ema(self.G_ema, self.G, self.cfg.ema_beta)
        return logs

    def state_dict(self) -> dict:
        return {"G": self.G.state_dict(), "D_sketch": self.D_sketch.state_dict(),
                "D_image": self.D_image.state_dict() if self.D_image is not None else {},
                "G_originals": {n: t for n, t in zip(self.trained_names, self.g_originals)},
                **({"G_ema": self.G_ema.state_dict()} if self.G_ema is not None else {}),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(), "rng": self._rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.G.load_state_dict(state["G"])
        self.D_sketch.load_state_dict(state["D_sketch"])
        if self.D_image is not None:
            self.D_image.load_state_dict(state["D_image"])
        self.g_originals = [state["G_originals"][n].to(self.device) for n in self.trained_names]
        if self.G_ema is not None:
            if "G_ema" not in state:
                raise ValueError("checkpoint has no G_ema: it was written by a run without an EMA of G "
                                 "(train.ema_half_life_kimg)")
            self.G_ema.load_state_dict(state["G_ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self._load_rng_state(state["rng"])
