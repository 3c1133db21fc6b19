"""The per-worker training loop shared by `pretrain`, `train` and every Tune trial.

Pure PyTorch apart from its edges: data arrives as iterators of numpy batches (Ray Data shards inside Ray
Train, or plain iterators in benchmarks), and progress goes to a ``report`` callback (``ray.train.report``
inside Ray Train). Rank 0 writes checkpoints, samples, metrics and the final outputs to storage; storage
is the source of truth, so a restarted worker group (after a failure) or a re-run of the same command
resumes from the latest checkpoint.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline import storage
from pipeline.config import Config
from pipeline.models import factory
from pipeline.models.checkpoints import load_into, load_state_dict, save_state_dict, sha256_of, to_bytes
from pipeline.models.sketchers import build_sketcher
from pipeline.train.objective import GANSketchingStep, ObjectiveConfig, StyleGAN2Step

log = logging.getLogger("sketchgan.train")

CRASH_ENV = "SKETCHGAN_TEST_CRASH_AT"  # test hook: "ITER:MARKER_FILE" -> die once at ITER (kill tests)
SAMPLE_SEED = 1234


@dataclass
class RunSpec:
    """Everything a worker needs to run one training run (plain data: it crosses process boundaries)."""

    kind: str  # "pretrain" | "train"
    run_name: str
    run_uri: str
    config: dict[str, Any]
    sketch_set: dict[str, Any] = field(default_factory=dict)  # name, uri, id (train only)
    dataset_manifest_id: str | None = None
    resume_from: str | None = None  # another run's URI to start from (its latest checkpoint)

    @property
    def cfg(self) -> Config:
        return Config.model_validate(self.config)


# -- images ------------------------------------------------------------------------------------------------
def decode_png_batch(blobs, channels: int, size: int) -> torch.Tensor:
    """PNG bytes -> float tensor in [-1, 1], B×C×size×size (resized when the stored size differs)."""
    mode = "RGB" if channels == 3 else "L"
    arrays = []
    for blob in blobs:
        with Image.open(io.BytesIO(blob)) as im:
            im = im.convert(mode)
            if im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
        arrays.append(arr if arr.ndim == 3 else arr[:, :, None])
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8_grid(images: torch.Tensor, nrow: int) -> Image.Image:
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, normalize=True, value_range=(-1, 1))
    return Image.fromarray((grid.permute(1, 2, 0).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# -- data iterators ------------------------------------------------------------------------------------------
def cycle_batches(make_iter: Callable[[int], Iterator[dict]], column: str, batch: int, channels: int, size: int,
                  skip_batches: int = 0) -> Iterator[torch.Tensor]:
    """Endless batches of ``column`` from ``make_iter(epoch)``; skips the first ``skip_batches`` (resume)."""
    epoch, served = 0, 0
    while True:
        got_any = False
        for b in make_iter(epoch):
            got_any = True
            if served < skip_batches:
                served += 1
                continue
            served += 1
            yield decode_png_batch(b[column], channels, size)
        if not got_any:
            raise ValueError(f"the dataset has fewer rows than one batch ({batch}) of column {column!r}")
        epoch += 1


class SketchSampler:
    """The user's sketches, held in memory, sampled with replacement by the step's RNG."""

    def __init__(self, sketches: torch.Tensor, name: str, batch: int):
        if sketches.shape[0] == 0:
            raise ValueError(f"sketch set {name!r} is empty")
        if sketches.shape[0] < batch:
            log.warning("sketch set %r has %d sketches, fewer than the batch of %d: sampling with replacement",
                        name, sketches.shape[0], batch)
        self.sketches, self.batch = sketches, batch

    def sample(self, rng: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, self.sketches.shape[0], (self.batch,), generator=rng)
        return self.sketches[idx]


# -- checkpoints -------------------------------------------------------------------------------------------
def latest_checkpoint(run_uri: str) -> str | None:
    pointer = storage.join(run_uri, "checkpoints", "latest.json")
    if not storage.exists(pointer):
        return None
    uri = storage.read_json(pointer)["uri"]
    return uri if storage.exists(uri) else None


def save_checkpoint(run_uri: str, iteration: int, state: dict, keep: int) -> str:
    """Write ckpt-<iter>.pt, then move the latest.json pointer to it, then drop checkpoints beyond ``keep``."""
    ckpt_dir = storage.join(run_uri, "checkpoints")
    uri = storage.join(ckpt_dir, f"ckpt-{iteration:08d}.pt")
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(uri, buf.getvalue())
    storage.write_json(storage.join(ckpt_dir, "latest.json"), {"uri": uri, "iteration": iteration})
    old = sorted(u for u in storage.list_files(ckpt_dir, suffix=".pt") if "/ckpt-" in u)[:-keep]
    for u in old:
        storage.delete(u)
    return uri


def load_checkpoint(uri: str) -> dict:
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)


# -- building the step ----------------------------------------------------------------------------------------
def _device() -> torch.device:
    return factory.device_default()


def build_step(spec: RunSpec, device: torch.device, seed: int):
    """The objective's step object with networks initialised from the base checkpoints (train) or at random."""
    cfg = spec.cfg
    arch = factory.generator_kwargs(cfg.model)
    torch.manual_seed(cfg.train.seed if spec.kind == "train" else cfg.pretrain.seed)  # same init on all ranks
    G = factory.build_generator(arch)
    if spec.kind == "pretrain":
        p = cfg.pretrain
        D = factory.build_discriminator(arch)
        ocfg = ObjectiveConfig(lr=p.lr, r1_gamma=p.r1_gamma, r1_every=p.r1_every, mixing=p.mixing,
                               augment=p.augment, trained="all",
                               ema_beta=StyleGAN2Step.ema_beta_for(p.batch_size, p.ema_half_life_kimg))
        return StyleGAN2Step(G, D, ocfg, device=device, seed=seed)
    t = cfg.train
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
    ocfg = ObjectiveConfig.from_config(t)
    return GANSketchingStep(G, D_sketch, D_image, sketcher, ocfg, device=device, seed=seed)


def _final_generator(step) -> torch.nn.Module:
    return step.G_ema if isinstance(step, StyleGAN2Step) else step.G


# -- the loop ------------------------------------------------------------------------------------------------
def run_worker(spec: RunSpec, image_iter_factory: Callable[[int], Iterator[dict]] | None,
               sketches: torch.Tensor | None, report: Callable[[dict], None] | None = None,
               rank: int = 0, world_size: int = 1) -> dict:
    """Train one run on this worker; returns the final metrics. ``image_iter_factory(epoch)`` yields dicts of
    numpy batches with an ``image`` column of PNG bytes (this worker's share of the global batch)."""
    cfg = spec.cfg
    device = _device()
    section = cfg.pretrain if spec.kind == "pretrain" else cfg.train
    total_iters, global_batch = section.iterations, section.batch_size
    if global_batch % world_size:
        raise ValueError(f"{spec.kind}.batch_size {global_batch} is not divisible by {world_size} workers")
    batch = global_batch // world_size
    size = cfg.model.size
    seed = section.seed * 1000 + rank
    step = build_step(spec, device, seed)
    is_gs = isinstance(step, GANSketchingStep)
    needs_images = not is_gs or step.D_image is not None
    sampler = SketchSampler(sketches, spec.sketch_set.get("name", "?"), batch) if is_gs else None

    start, history = 0, []
    ckpt_uri = latest_checkpoint(spec.run_uri)
    if ckpt_uri is None and spec.resume_from:
        ckpt_uri = latest_checkpoint(spec.resume_from)
        if ckpt_uri is None:
            raise ValueError(f"cannot resume from {spec.resume_from}: it has no checkpoint")
    if ckpt_uri is not None:
        state = load_checkpoint(ckpt_uri)
        step.load_state_dict(state["step"])
        start, history = int(state["iteration"]), list(state.get("history", []))
        if rank == 0:
            log.info("%s: resuming from %s (iteration %d)", spec.run_name, ckpt_uri, start)

    images = cycle_batches(image_iter_factory, "image", batch, 3, size, skip_batches=start) \
        if needs_images and image_iter_factory is not None else None
    if needs_images and images is None:
        raise ValueError(f"{spec.run_name}: this run needs real images but no image dataset was given")

    every = cfg.train.log_every
    sample_z = torch.randn(16, cfg.model.style_dim, generator=torch.Generator().manual_seed(SAMPLE_SEED))
    crash = os.environ.get(CRASH_ENV)
    t0, done_since = time.perf_counter(), 0
    logs: dict[str, float] = {}
    if rank == 0 and start == 0:
        _write_samples(spec, step, sample_z, 0, device)

    for it in range(start, total_iters):
        if crash:
            at, marker = crash.split(":", 1)
            if it == int(at) and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(17)  # simulate a worker dying mid-run
        real = next(images) if images is not None else None
        sk = sampler.sample(step.rng) if sampler is not None else None
        logs = step.step(it, real, sk)
        done_since += 1
        n_done = it + 1
        if n_done % every == 0 or n_done == total_iters:
            dt = time.perf_counter() - t0
            metrics = {"iteration": n_done, **{k: round(v, 6) for k, v in logs.items()},
                       "it_per_s": round(done_since / dt, 4), "img_per_s": round(done_since * global_batch / dt, 3)}
            history.append(metrics)
            if rank == 0:
                storage.write_text(storage.join(spec.run_uri, "metrics.jsonl"),
                                   "".join(json.dumps(m) + "\n" for m in history))
                log.info("%s: %s", spec.run_name, " ".join(f"{k}={v}" for k, v in metrics.items()))
            if report is not None:
                report(metrics)
            t0, done_since = time.perf_counter(), 0
        ckpt_every = cfg.train.checkpoint_every
        if rank == 0 and (n_done % ckpt_every == 0 or n_done == total_iters):
            save_checkpoint(spec.run_uri, n_done, {"iteration": n_done, "step": step.state_dict(),
                                                   "history": history, "config": spec.config},
                            keep=cfg.train.keep_checkpoints)
        if rank == 0 and n_done % cfg.train.sample_every == 0:
            _write_samples(spec, step, sample_z, n_done, device)

    if rank == 0:
        _write_samples(spec, step, sample_z, total_iters, device)
        _write_final(spec, step, history)
    return history[-1] if history else {}


@torch.no_grad()
def _write_samples(spec: RunSpec, step, z: torch.Tensor, iteration: int, device) -> None:
    G = _final_generator(step)
    was_training = G.training
    G.eval()
    imgs = G([z.to(device)], randomize_noise=False)[0]
    G.train(was_training)
    storage.write_bytes(storage.join(spec.run_uri, "samples", f"iter-{iteration:08d}.png"),
                        png_bytes(to_uint8_grid(imgs, nrow=4)))


def _write_final(spec: RunSpec, step, history: list[dict]) -> None:
    cfg = spec.cfg
    final = storage.join(spec.run_uri, "final")
    G = _final_generator(step)
    g_sha = save_state_dict(G, storage.join(final, "G.pth"))
    if isinstance(step, StyleGAN2Step):
        save_state_dict(step.D, storage.join(final, "D.pth"))
    else:
        save_state_dict(step.D_sketch, storage.join(final, "D_sketch.pth"))
        if step.D_image is not None:
            save_state_dict(step.D_image, storage.join(final, "D_image.pth"))
    base_sha = sha256_of(cfg.model.base_g) if (spec.kind == "train" and cfg.model.base_g) else None
    metadata = {
        "run_name": spec.run_name, "run_uri": spec.run_uri, "kind": spec.kind,
        "arch": factory.generator_kwargs(cfg.model), "config": spec.config,
        "category": cfg.data.category, "sketch_set": spec.sketch_set or None,
        "base_g_sha256": base_sha, "g_sha256": g_sha, "dataset_manifest_id": spec.dataset_manifest_id,
        "iterations": (cfg.pretrain if spec.kind == "pretrain" else cfg.train).iterations,
        "final_metrics": history[-1] if history else {}, "fid": None,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_json(storage.join(final, "metadata.json"), metadata)  # last: marks the run finished


def final_state_bytes(step) -> bytes:
    return to_bytes(_final_generator(step))
