"""Plain StyleGAN2 training from scratch (`sketchgan pretrain`), in pure PyTorch."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pipeline.train.losses import d_loss, g_loss, r1_penalty
from pipeline.train.step_base import ObjectiveConfig, StepBase, adam, requires_grad, sync_grads, update_ema


class StyleGAN2Step(StepBase):
    """Plain StyleGAN2 training from scratch: non-saturating loss, lazy R1, EMA copy of G."""

    def __init__(self, G: nn.Module, D: nn.Module, cfg: ObjectiveConfig, device: torch.device | str = "cpu",
                 seed: int = 0):
        super().__init__(G, cfg, device, seed)
        self.D = self._prepare(D)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        reg_every = cfg.r1_every if cfg.r1_gamma > 0 else None
        self.opt_g = adam(list(self.G.parameters()), cfg.lr, (cfg.beta1, cfg.beta2), device=self.device)
        self.opt_d = adam(list(self.D.parameters()), cfg.lr, (cfg.beta1, cfg.beta2), reg_every=reg_every,
                           device=self.device)

    def step(self, iteration: int, real_images: torch.Tensor, user_sketches=None) -> dict:
        cfg, kind = self.cfg, self.cfg.gan_loss
        real = self.layout(real_images.to(self.device))
        batch = real.shape[0]
        logs: dict[str, float] = {}
        requires_grad(self.D, True)
        with torch.no_grad(), self.autocast():
            fake = self.generate(batch)
        self.opt_d.zero_grad(set_to_none=True)
        with self.autocast():
            loss_d = d_loss(self.D(self.layout(self.augment(real, self.rng))),
                            self.D(self.layout(self.augment(fake, self.rng))), kind)
        loss_d.backward()
        sync_grads(list(self.D.parameters()))
        self.opt_d.step()
        logs["loss_d"] = loss_d.item()
        if cfg.r1_gamma > 0 and iteration % cfg.r1_every == 0:
            self.opt_d.zero_grad(set_to_none=True)
            real_in = real.detach().requires_grad_(True)
            r1 = r1_penalty(self.D(self.layout(self.augment(real_in, self.rng))), real_in)
            (cfg.r1_gamma / 2 * r1 * cfg.r1_every).backward()
            sync_grads(list(self.D.parameters()))
            self.opt_d.step()
            logs["r1"] = r1.item()

        requires_grad(self.D, False)
        self.opt_g.zero_grad(set_to_none=True)
        with self.autocast():
            loss_g = g_loss(self.D(self.layout(self.augment(self.generate(batch), self.rng))), kind)
        loss_g.backward()
        sync_grads(list(self.G.parameters()))
        self.opt_g.step()
        logs["loss_g"] = loss_g.item()

        update_ema(self.G_ema, self.G, cfg.ema_beta if cfg.ema_beta is not None else 0.999)
        return logs

    def state_dict(self) -> dict:
        return {"G": self.G.state_dict(), "G_ema": self.G_ema.state_dict(), "D": self.D.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(), "rng": self._rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.G.load_state_dict(state["G"])
        self.G_ema.load_state_dict(state["G_ema"])
        self.D.load_state_dict(state["D"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self._load_rng_state(state["rng"])
