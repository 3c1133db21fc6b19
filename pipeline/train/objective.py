"""The GANSketching objective and training step, and plain StyleGAN2 training, in pure PyTorch.

One `step()` is one iteration: a discriminator step (with lazy R1 every ``r1_every`` iterations) and a
generator step. All randomness (latents, mixing, augmentation, noise) comes from RNGs whose state is part
of ``state_dict()``, so a run stopped and resumed ends with the same weights as one run straight through.
Data parallel training averages gradients over ``torch.distributed`` workers when a process group exists.
"""

from __future__ import annotations

import copy
import random
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.diffaug import DiffAugment

GAN_LOSSES = ("softplus", "hinge", "lsgan")


# -- losses --------------------------------------------------------------------------------------------
def d_loss(real_pred: torch.Tensor, fake_pred: torch.Tensor, kind: str = "softplus") -> torch.Tensor:
    if kind == "softplus":
        return F.softplus(-real_pred).mean() + F.softplus(fake_pred).mean()
    if kind == "hinge":
        return F.relu(1 - real_pred).mean() + F.relu(1 + fake_pred).mean()
    if kind == "lsgan":  # GANSketching's "ls": mean squared error to the labels 1 and 0
        return (real_pred - 1).square().mean() + fake_pred.square().mean()
    raise ValueError(f"unknown GAN loss {kind!r} (known: {', '.join(GAN_LOSSES)})")


def g_loss(fake_pred: torch.Tensor, kind: str = "softplus") -> torch.Tensor:
    if kind == "softplus":
        return F.softplus(-fake_pred).mean()
    if kind == "hinge":
        return -fake_pred.mean()
    if kind == "lsgan":
        return (fake_pred - 1).square().mean()
    raise ValueError(f"unknown GAN loss {kind!r} (known: {', '.join(GAN_LOSSES)})")


def r1_penalty(real_pred: torch.Tensor, real_input: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ‖∇_x D(x)‖² (``real_input`` must be a leaf that requires grad)."""
    # backward(inputs=...) rather than autograd.grad: same graph, and FLOP counters can follow it
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        # patch outputs are averaged per sample first, as GANSketching's RegularizeD does
        real_pred.float().reshape(real_pred.shape[0], -1).mean(1).sum().backward(inputs=[real_input],
                                                                                 create_graph=True)
    grad, real_input.grad = real_input.grad, None  # drop the reference cycle backward() creates
    return grad.float().square().reshape(grad.shape[0], -1).sum(1).mean()


def weight_loss(params: list[torch.Tensor], originals: list[torch.Tensor]) -> torch.Tensor:
    """Average over the trained tensors of each tensor's mean |θ − θ₀|."""
    terms = [(p - p0).abs().mean() for p, p0 in zip(params, originals)]
    return torch.stack(terms).mean()


# -- transforms before the sketch discriminator --------------------------------------------------------
def parse_transform(chain: str) -> list[tuple[str, int]]:
    """``"down2,toSketch,up2,to3ch"`` -> [(down, 2), (toSketch, 0), (up, 2), (to3ch, 0)]; unknown tokens refused."""
    out = []
    for token in (t.strip() for t in chain.split(",") if t.strip()):
        if token in ("toSketch", "to3ch"):
            out.append((token, 0))
        elif token[:4] in ("down",) and token[4:].isdigit():
            out.append(("down", int(token[4:])))
        elif token[:2] == "up" and token[2:].isdigit():
            out.append(("up", int(token[2:])))
        else:
            raise ValueError(f"unknown transform {token!r} in {chain!r} (known: toSketch, to3ch, downN, upN)")
    return out


def apply_transform(x: torch.Tensor, steps: list[tuple[str, int]], sketcher: nn.Module | None) -> torch.Tensor:
    for name, n in steps:
        if name == "toSketch":
            if sketcher is None:
                raise ValueError("transform toSketch needs a sketcher")
            x = sketcher(x)
        elif name == "to3ch":
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        elif name == "down":
            x = F.interpolate(x, scale_factor=0.5**n, mode="bicubic", align_corners=False)
        elif name == "up":
            x = F.interpolate(x, scale_factor=2**n, mode="bicubic", align_corners=False)
    return x


# -- configuration ------------------------------------------------------------------------------------
@dataclass
class ObjectiveConfig:
    lambda_image: float = 0.7
    lambda_weight: float = 0.0
    r1_gamma: float = 10.0
    r1_every: int = 16
    gan_loss: str = "softplus"
    mixing: float = 0.9
    trained: str = "mapping"
    lr: float = 0.002
    beta1: float = 0.0
    beta2: float = 0.99
    augment: str = "translation"
    transform_fake: str = "toSketch,to3ch"
    transform_real: str = "to3ch"
    precision: str = "fp32"
    ema_beta: float | None = None  # StyleGAN2: EMA of G per step (default 0.999); GANSketching: None/0 = no EMA
    channels_last: bool = True  # NHWC activations: oneDNN/cuDNN convolutions skip layout reorders

    @classmethod
    def from_config(cls, section, **extra) -> ObjectiveConfig:
        names = {f for f in cls.__dataclass_fields__}
        values = {k: getattr(section, k) for k in names if hasattr(section, k)}
        values.update(extra)
        return cls(**values)


def _adam(params, lr: float, betas: tuple[float, float], reg_every: int | None = None,
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


def _sync_grads(params) -> None:
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


class _StepBase:
    """Shared machinery: RNGs, latent sampling with style mixing, precision, checkpoint state."""

    def __init__(self, G: nn.Module, cfg: ObjectiveConfig, device: torch.device | str = "cpu", seed: int = 0):
        if cfg.gan_loss not in GAN_LOSSES:
            raise ValueError(f"unknown GAN loss {cfg.gan_loss!r} (known: {', '.join(GAN_LOSSES)})")
        if cfg.precision not in ("fp32", "bf16"):
            raise ValueError(f"unknown precision {cfg.precision!r} (known: fp32, bf16)")
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


def _requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


class GANSketchingStep(_StepBase):
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
        _requires_grad(self.G, False)
        for p in self.g_params:
            p.requires_grad_(True)
        self.g_originals = [p.detach().clone() for p in self.g_params]
        self.d_modules = [m for m in (self.D_sketch, self.D_image) if m is not None]
        self.d_params = [p for m in self.d_modules for p in m.parameters()]
        reg_every = cfg.r1_every if cfg.r1_gamma > 0 else None
        self.opt_g = _adam(self.g_params, cfg.lr, (cfg.beta1, cfg.beta2), device=self.device)
        self.opt_d = _adam(self.d_params, cfg.lr, (cfg.beta1, cfg.beta2), reg_every=reg_every, device=self.device)
        # Optional, not part of GANSketching: a running average of G damps the step-to-step wander of a
        # high learning rate (what the run publishes when on).
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False) if cfg.ema_beta else None

    def sketch_fake(self, images: torch.Tensor) -> torch.Tensor:
        return self.layout(self.augment(apply_transform(images, self.t_fake, self.sketcher), self.rng))

    def sketch_real(self, sketches: torch.Tensor) -> torch.Tensor:
        return self.layout(self.augment(apply_transform(sketches, self.t_real, self.sketcher), self.rng))

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
            _requires_grad(m, True)
        with torch.no_grad(), self.autocast():
            fake = self.generate(batch)
        self.opt_d.zero_grad(set_to_none=True)
        with self.autocast():
            loss_sk = d_loss(self.D_sketch(self.sketch_real(user_sketches)),
                             self.D_sketch(self.sketch_fake(fake)), loss_kind)
            total = loss_sk
            if self.D_image is not None:
                loss_im = d_loss(self.D_image(real_images), self.D_image(fake), loss_kind)
                total = total + cfg.lambda_image * loss_im
                logs["loss_d_image"] = loss_im.item()
        total.backward()
        _sync_grads(self.d_params)
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
            _sync_grads(self.d_params)
            self.opt_d.step()

        # generator step
        for m in self.d_modules:
            _requires_grad(m, False)
        self.opt_g.zero_grad(set_to_none=True)
        with self.autocast():
            fake = self.generate(batch)
            loss_g_sk = g_loss(self.D_sketch(self.sketch_fake(fake)), loss_kind)
            total = loss_g_sk
            if self.D_image is not None:
                loss_g_im = g_loss(self.D_image(fake), loss_kind)
                total = total + cfg.lambda_image * loss_g_im
                logs["loss_g_image"] = loss_g_im.item()
        if cfg.lambda_weight > 0:
            loss_w = weight_loss(self.g_params, self.g_originals)
            total = total + cfg.lambda_weight * loss_w
            logs["loss_weight"] = loss_w.item()
        total.backward()
        _sync_grads(self.g_params)
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


class StyleGAN2Step(_StepBase):
    """Plain StyleGAN2 training from scratch: non-saturating loss, lazy R1, EMA copy of G."""

    def __init__(self, G: nn.Module, D: nn.Module, cfg: ObjectiveConfig, device: torch.device | str = "cpu",
                 seed: int = 0):
        super().__init__(G, cfg, device, seed)
        self.D = self._prepare(D)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        reg_every = cfg.r1_every if cfg.r1_gamma > 0 else None
        self.opt_g = _adam(list(self.G.parameters()), cfg.lr, (cfg.beta1, cfg.beta2), device=self.device)
        self.opt_d = _adam(list(self.D.parameters()), cfg.lr, (cfg.beta1, cfg.beta2), reg_every=reg_every,
                           device=self.device)

    def step(self, iteration: int, real_images: torch.Tensor, user_sketches=None) -> dict:
        cfg, kind = self.cfg, self.cfg.gan_loss
        real = self.layout(real_images.to(self.device))
        batch = real.shape[0]
        logs: dict[str, float] = {}
        _requires_grad(self.D, True)
        with torch.no_grad(), self.autocast():
            fake = self.generate(batch)
        self.opt_d.zero_grad(set_to_none=True)
        with self.autocast():
            loss_d = d_loss(self.D(self.layout(self.augment(real, self.rng))),
                            self.D(self.layout(self.augment(fake, self.rng))), kind)
        loss_d.backward()
        _sync_grads(list(self.D.parameters()))
        self.opt_d.step()
        logs["loss_d"] = loss_d.item()
        if cfg.r1_gamma > 0 and iteration % cfg.r1_every == 0:
            self.opt_d.zero_grad(set_to_none=True)
            real_in = real.detach().requires_grad_(True)
            r1 = r1_penalty(self.D(self.layout(self.augment(real_in, self.rng))), real_in)
            (cfg.r1_gamma / 2 * r1 * cfg.r1_every).backward()
            _sync_grads(list(self.D.parameters()))
            self.opt_d.step()
            logs["r1"] = r1.item()

        _requires_grad(self.D, False)
        self.opt_g.zero_grad(set_to_none=True)
        with self.autocast():
            loss_g = g_loss(self.D(self.layout(self.augment(self.generate(batch), self.rng))), kind)
        loss_g.backward()
        _sync_grads(list(self.G.parameters()))
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

