"""What every training step shares (pure PyTorch): the step's settings, Adam with lazy regularisation, NHWC layout,
data-parallel gradient averaging, RNG state for bit-exact resume, and the running average of G."""

from __future__ import annotations

import random

import torch
from pydantic import Field
from torch import nn

from pipeline.config import ObjectiveSettings
from pipeline.models.diffaug import DiffAugment


class ObjectiveConfig(ObjectiveSettings):
    """A step's settings: the objective's (defaults in `pipeline.config.ObjectiveSettings`) plus two that no user
    sets. The step accepts a zero learning rate (a frozen run), which the user-facing config refuses."""

    lr: float = Field(ObjectiveSettings.model_fields["lr"].default, ge=0)
    # per-step decay of a running average of G; None or 0 = none (GANSketching); StyleGAN2 keeps one always
    ema_beta: float | None = Field(None, ge=0, lt=1)
    channels_last: bool = True  # NHWC activations: oneDNN/cuDNN convolutions skip layout reorders

    @classmethod
    def of(cls, settings: ObjectiveSettings, **extra) -> ObjectiveConfig:
        """The step's settings from a config section holding the objective's (``train``), ``extra`` on top."""
        return cls(**{**settings.model_dump(include=set(ObjectiveSettings.model_fields)), **extra})


def adam(params, lr: float, betas: tuple[float, float], reg_every: int | None = None,
          device: torch.device | None = None) -> torch.optim.Adam:
    if reg_every:
        # lazy regularisation: scale lr and betas so the effective step matches every-iteration R1
        ratio = reg_every / (reg_every + 1)
        lr, betas = lr * ratio, (betas[0] ** ratio, betas[1] ** ratio)
    # the fused kernel does Adam's five elementwise passes in one (D has ~25M parameters per network)
    fused = device is not None and device.type in ("cpu", "cuda")
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=fused or None)


def _contiguous_output(_module, _inputs, out):
    return out.contiguous()


def to_channels_last(module: nn.Module) -> nn.Module:
    """Store a module's 4-d parameters and buffers NHWC, so that activations flowing from them stay NHWC.

    ``Module.to(memory_format=...)`` refuses modules with 5-d parameters (the modulated convolutions' weight),
    hence the explicit walk. Values are unchanged.
    """
    for mod in module.modules():
        for p in mod._parameters.values():
            if p is not None and p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        for name, b in mod._buffers.items():
            if b is not None and b.dim() == 4:
                mod._buffers[name] = b.contiguous(memory_format=torch.channels_last)
    final = getattr(module, "final_conv", None)
    if final is not None and not getattr(module, "_nhwc_hook", False):
        # the StyleGAN2 D flattens final_conv's output with .view, which needs the default layout
        final.register_forward_hook(_contiguous_output)
        module._nhwc_hook = True
    return module


def process_group_size() -> int:
    """Workers in this process's ``torch.distributed`` group; 0 when there is none."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 0


def sync_grads(params) -> None:
    """Average gradients over data-parallel workers (the global batch is split across them)."""
    world = process_group_size()
    if world <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


class StepBase:
    """Shared machinery: RNGs, latent sampling with style mixing, precision, checkpoint state."""

    def __init__(self, G: nn.Module, cfg: ObjectiveConfig, device: torch.device | str = "cpu", seed: int = 0):
        self.cfg = cfg
        self.device = torch.device(device)
        self.G = self._prepare(G)
        self.augment = DiffAugment(cfg.augment)
        self.rng = torch.Generator().manual_seed(seed)
        self.py_rng = random.Random(seed)
        torch.manual_seed(seed)  # per-layer noise inside G uses the global RNG (saved in state_dict)

    def _prepare(self, module: nn.Module) -> nn.Module:
        module = module.to(self.device)
        return to_channels_last(module) if self.cfg.channels_last else module

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """A batch in the networks' memory layout (a no-op when it already is)."""
        if self.cfg.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    def sample_styles(self, batch: int) -> tuple[list[torch.Tensor], int | None]:
        dim = self.G.style_dim
        if self.cfg.mixing > 0 and torch.rand((), generator=self.rng).item() < self.cfg.mixing:
            z = torch.randn(2, batch, dim, generator=self.rng).to(self.device)
            return [z[0], z[1]], self.py_rng.randint(1, self.G.n_latent - 1)
        return [torch.randn(batch, dim, generator=self.rng).to(self.device)], None

    def generate(self, batch: int) -> torch.Tensor:
        styles, inject = self.sample_styles(batch)
        return self.G(styles, inject_index=inject)[0]

    def _rng_state(self) -> dict:
        return {"torch": torch.get_rng_state(), "gen": self.rng.get_state(),
                "py": self.py_rng.getstate(),
                **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})}

    def _load_rng_state(self, s: dict) -> None:
        torch.set_rng_state(s["torch"])
        self.rng.set_state(s["gen"])
        version, internal, gauss = s["py"]
        self.py_rng.setstate((version, tuple(internal), gauss))
        if "cuda" in s and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda"])


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """Move ``ema``'s parameters a ``1 - beta`` share towards ``model``'s; copy its buffers."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def ema_beta_for(batch: int, half_life_kimg: float) -> float:
    """Per-step EMA decay for a half-life counted in thousands of images (0 turns the average off)."""
    return 0.5 ** (batch / max(half_life_kimg * 1000, 1e-8)) if half_life_kimg > 0 else 0.0


def requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)
