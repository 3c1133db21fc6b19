"""Projection of an image into a base generator's latent space, after StyleGAN2's projector (Karras et al.
2020, appendix D): optimise a latent (W: one w for every layer; W+: one per layer; Z: the mapping's input) and
the per-layer noise maps with Adam, a learning rate ramped up then down, Gaussian noise on the latent that
fades out over the first 3/4 of the steps, and a penalty on the noise maps' autocorrelation at every scale
(renormalised after each step) so that the noise cannot paint the image.

The distance is LPIPS (`pipeline.eval.lpips`) when VGG-16 weights are given (torchvision's layout, by path or
URI; with LPIPS's linear weights when those are given too, else every channel weighing 1). Without them it
falls back to pixels: the mean squared error at full size plus at 1/2 and 1/4 size (the coarse terms pull
colours and layout first).

A Z latent is the one to render through a customised model whose mapping network changed (the paper's default
customisation); a W or W+ latent bypasses the mapping, so it renders differently only through a model whose
synthesis network changed (``train.trained=all``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import layout, storage

SPACES = ("w", "w+", "z")
MAX_PIXELS = 40_000_000
_NOT_PHOTO_MODES = ("F", "I", "I;16", "I;16B", "I;16L", "I;16N")


@dataclass
class ProjectSettings:
    steps: int = 1000
    space: str = "w+"
    lr: float = 0.1
    noise_regularize: float = 1e5
    initial_noise_factor: float = 0.05
    noise_ramp: float = 0.75
    lr_rampup: float = 0.05
    lr_rampdown: float = 0.25
    seed: int = 0

    def check(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"--space must be one of {SPACES}, got {self.space!r}")
        if not 1 <= self.steps <= 100_000:
            raise ValueError(f"--steps must be between 1 and 100000, got {self.steps}")


def load_target(uri: str, size: int) -> torch.Tensor:
    """The image at ``uri`` as 1 x 3 x size x size in [-1, 1] (centre crop, bicubic resize); unreadable,
    oversized and non-photographic (16-bit, 32-bit, float) images are refused, naming the file."""
    from pipeline.data.images import BadRecord, center_crop_resize, open_image, to_mode

    data = storage.read_bytes(uri)  # a missing file: a StorageError naming it
    try:
        im = open_image(data, MAX_PIXELS)
    except BadRecord as exc:
        raise ValueError(f"--image {uri}: {exc.reason}") from None
    if im.mode in _NOT_PHOTO_MODES:
        raise ValueError(f"--image {uri}: mode {im.mode} holds 16-bit, 32-bit or float samples, not a photo; "
                         "convert it to 8-bit RGB first")
    arr = np.asarray(center_crop_resize(to_mode(im, "RGB"), size), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)[None] / 127.5 - 1


def pixel_distance(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE at full, 1/2 and 1/4 size (the documented fallback when no VGG weights are given)."""
    total = F.mse_loss(x, target)
    for k in (2, 4):
        if x.shape[-1] >= 4 * k:
            total = total + F.mse_loss(F.avg_pool2d(x, k), F.avg_pool2d(target, k))
    return total


def noise_regularisation(noises: list[torch.Tensor]) -> torch.Tensor:
    """Squared autocorrelation of each noise map at one-pixel shifts, at every scale down to 8 x 8."""
    loss = torch.zeros(())
    for noise in noises:
        n = noise
        while True:
            loss = loss + (n * torch.roll(n, 1, dims=3)).mean().pow(2) + (n * torch.roll(n, 1, dims=2)).mean().pow(2)
            if n.shape[-1] <= 8:
                break
            n = F.avg_pool2d(n, 2)
    return loss


def _lr_at(t: float, s: ProjectSettings) -> float:
    ramp = min(1.0, (1.0 - t) / s.lr_rampdown)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    return s.lr * ramp * min(1.0, t / s.lr_rampup)


def project(G: torch.nn.Module, target: torch.Tensor, settings: ProjectSettings, distance=None,
            progress=None) -> dict:
    """Optimise a latent (and noise maps) so that G renders ``target``; returns the latent record
    (``space``, ``latent``, ``noise``, ``size``, ``style_dim``, ``n_latent``) for `render_latent`."""
    settings.check()
    device = next(G.parameters()).device
    target = target.to(device)
    gen = torch.Generator().manual_seed(settings.seed)
    with torch.no_grad():
        z_stats = torch.randn(10_000, G.style_dim, generator=gen).to(device)
        w_samples = G.get_latent(z_stats)
        w_mean = w_samples.mean(0, keepdim=True)
        w_std = ((w_samples - w_mean).pow(2).sum() / w_samples.shape[0]).sqrt().item()
    if settings.space == "z":
        start, latent_std = torch.zeros(1, G.style_dim, device=device), 1.0
    elif settings.space == "w":
        start, latent_std = w_mean.clone(), w_std
    else:
        start, latent_std = w_mean[:, None, :].repeat(1, G.n_latent, 1), w_std
    latent = start.clone().requires_grad_(True)
    noises = [torch.randn(b.shape, generator=gen).to(device).requires_grad_(True)
              for b in (getattr(G.noises, f"noise_{i}") for i in range(G.num_layers))]
    opt = torch.optim.Adam([latent, *noises], lr=settings.lr, betas=(0.9, 0.999))
    target_feats = [f.detach() for f in distance.feats(target)] if distance is not None else None
    for step in range(settings.steps):
        t = step / settings.steps
        for group in opt.param_groups:
            group["lr"] = _lr_at(t, settings)
        strength = latent_std * settings.initial_noise_factor * max(0.0, 1.0 - t / settings.noise_ramp) ** 2
        jitter = torch.randn(latent.shape, generator=gen).to(device) * strength
        image = synthesize_from(G, settings.space, latent + jitter, noises)
        if distance is not None:
            loss = distance.compare(distance.feats(image), target_feats).sum()
        else:
            loss = pixel_distance(image, target)
        loss = loss + settings.noise_regularize * noise_regularisation(noises)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # keep each noise map zero-mean, unit-variance
            for n in noises:
                n.sub_(n.mean()).div_(n.pow(2).mean().sqrt() + 1e-8)
        if progress is not None:
            progress(step + 1, loss.item())
    return {"space": settings.space, "latent": latent.detach().cpu(), "noise": [n.detach().cpu() for n in noises],
            "size": int(G.size), "style_dim": int(G.style_dim), "n_latent": int(G.n_latent)}


def synthesize_from(G: torch.nn.Module, space: str, latent: torch.Tensor, noises: list[torch.Tensor]):
    """G's image (N x 3 x H x W in [-1, 1]) for a latent of ``space`` and explicit noise maps."""
    w = G.get_latent(latent) if space == "z" else latent
    return G([w], input_is_latent=True, noise=list(noises))[0]


def save_latent(record: dict, uri: str) -> None:
    import io

    buf = io.BytesIO()
    torch.save(record, buf)
    storage.write_bytes(uri, buf.getvalue())


def load_latent(uri: str, G: torch.nn.Module) -> dict:
    """A `project` latent record, checked against the generator it will be rendered with."""
    import io

    data = storage.read_bytes(uri)
    try:
        record = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise ValueError(f"--latent {uri}: not a latent file written by `sketchgan project` ({exc})") from None
    if not isinstance(record, dict) or record.get("space") not in SPACES or "latent" not in record:
        raise ValueError(f"--latent {uri}: not a latent file written by `sketchgan project` (no space/latent)")
    for key, have in (("size", G.size), ("style_dim", G.style_dim), ("n_latent", G.n_latent)):
        if record.get(key) != have:
            raise ValueError(f"--latent {uri}: projected for {key} {record.get(key)}, the model has {have}")
    return record


@torch.no_grad()
def render_latent(G: torch.nn.Module, record: dict, device) -> np.ndarray:
    """A projected latent through ``G`` with the projection's noise maps (uint8 1 x H x W x 3)."""
    from pipeline.models.sampling import to_uint8

    noises = [n.to(device) for n in record["noise"]]
    return to_uint8(synthesize_from(G, record["space"], record["latent"].to(device), noises))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def run_project(cfg, image: str, base: str, out: str, settings: ProjectSettings,
                vgg_weights: str | None = None, lpips_weights: str | None = None) -> list[str]:
    """`sketchgan project`: write into ``out`` the latent, the reconstruction (at the model's size) and
    a comparison (the target, the mean latent's image, the reconstruction), as `layout` names them; returns the
    lines to print."""
    import time

    from pipeline.data.images import encode_png, grid_png
    from pipeline.models import factory
    from pipeline.models.sampling import mean_w, to_uint8
    from pipeline.progress import Progress
    from pipeline.registry.mlflow_registry import resolve_model

    settings.check()
    device = factory.device_default()
    G = resolve_model(base, cfg).load_generator(cfg, device)
    target = load_target(image, G.size)
    if lpips_weights and not vgg_weights:
        raise ValueError("--lpips-weights needs --vgg-weights (LPIPS weighs VGG-16's features)")
    if vgg_weights:
        from pipeline.eval.lpips import LPIPS

        distance = LPIPS(vgg_weights, lpips_weights).to(device)
    else:
        distance = None
    t0 = time.time()
    bar = Progress("project", settings.steps, unit="step")
    try:
        record = project(G, target, settings, distance,
                         progress=lambda n, loss: bar.update_to(n, f"loss {loss:.4f}") if n % 25 == 0 else None)
    finally:
        bar.close()
    want = to_uint8(target)[0]
    got = render_latent(G, record, device)[0]
    with torch.no_grad():
        mean_image = to_uint8(G([mean_w(G, device)], input_is_latent=True, randomize_noise=False)[0])[0]
    latent_uri = storage.join(out, layout.PROJECTED_LATENT)
    recon_uri = storage.join(out, layout.RECONSTRUCTION)
    save_latent(record, latent_uri)
    storage.write_bytes(recon_uri, encode_png(got))
    storage.write_bytes(storage.join(out, layout.PROJECTION_COMPARE), grid_png(np.stack([want, mean_image, got]), 3))
    kind = ("LPIPS" if lpips_weights else "LPIPS, unweighted") if distance is not None else "pixel"
    return [f"{latent_uri}: {record['space']} latent after {settings.steps} steps in {time.time() - t0:.0f}s "
            f"({kind} distance)",
            f"{recon_uri}: PSNR {psnr(got, want):.2f} dB (the mean latent: {psnr(mean_image, want):.2f} dB)"]
