"""The per-worker training loop shared by `pretrain`, `train`, Tune trials and the benchmarks.

Pure PyTorch apart from its edges: real images arrive through ``make_epoch(epoch)`` (an iterator of numpy
batches with an ``image`` column of PNG bytes: a Ray Data shard inside Ray Train, a plain Parquet reader in
benchmarks), user sketches as one in-memory tensor, and progress goes to a ``report(metrics, checkpoint_uri)``
callback (``ray.train.report`` inside Ray Train). Rank 0 writes checkpoints, samples, metrics and the final
outputs to storage. Checkpoints hold everything a bit-exact continuation needs (networks, optimisers, RNG
states, the position in the image stream), so a restarted worker group or a resumed run picks up exactly
where the checkpoint left off.
"""

from __future__ import annotations

import io
import json
import logging
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
from pipeline.models.checkpoints import load_into, load_state_dict, save_state_dict, sha256_of
from pipeline.models.sketchers import build_sketcher
from pipeline.train.objective import GANSketchingStep, ObjectiveConfig, StyleGAN2Step, ema_beta_for, process_group_size

log = logging.getLogger("sketchgan.train")

SAMPLE_SEED = 1234  # fixed latents of the sample grids, so grids of one run are comparable over time
SAMPLE_COUNT = 16
CHECKPOINT_FORMAT = 1

MakeEpoch = Callable[[int], Iterator[dict]]
Report = Callable[[dict, "str | None"], None]


@dataclass
class RunSpec:
    """Everything a worker needs for one training run (plain data: it crosses process boundaries)."""

    kind: str  # "pretrain" | "train"
    run_name: str
    run_uri: str
    config: dict[str, Any]
    sketch_set: dict[str, Any] = field(default_factory=dict)  # name, uri, id (train only)
    dataset_manifest_id: str | None = None
    base_g_sha256: str | None = None
    resume_from: str | None = None  # a checkpoint URI to start from when the run has none of its own
    evalset_uri: str | None = None  # real images for FID at intervals (train.eval_every)

    @property
    def cfg(self) -> Config:
        return Config.model_validate(self.config)

    @property
    def section(self):
        cfg = self.cfg
        return cfg.pretrain if self.kind == "pretrain" else cfg.train


@dataclass
class TestHooks:
    """Fault injection for tests only (never part of the public config): die once at an iteration."""

    crash_at: int | None = None
    crash_marker: str | None = None  # the crash happens only while this file does not exist


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


# -- data streams ------------------------------------------------------------------------------------------
class ImageStream:
    """Endless batches of real images from ``make_epoch(epoch)``, with a resumable position.

    The position is (epoch, batches served in that epoch); resuming re-opens that epoch (same shuffle seed)
    and skips the served batches without decoding them.
    """

    def __init__(self, make_epoch: MakeEpoch, size: int, batch: int, epoch: int = 0, index: int = 0):
        self.make_epoch, self.size, self.batch = make_epoch, size, batch
        self.epoch, self.index = epoch, index
        self._it: Iterator[dict] | None = None

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def _open(self) -> None:
        self._it = iter(self.make_epoch(self.epoch))
        for _ in range(self.index):
            if next(self._it, None) is None:
                raise ValueError(f"the image stream has fewer than {self.index} batches per epoch: it cannot be "
                                 "resumed at this position (was the dataset changed?)")

    def __next__(self) -> torch.Tensor:
        empty_epochs = 0
        while True:
            if self._it is None:
                self._open()
            b = next(self._it, None)
            if b is not None:
                self.index += 1
                return decode_png_batch(b["image"], 3, self.size)
            if self.index == 0:
                empty_epochs += 1
                if empty_epochs > 1:
                    raise ValueError(f"the image dataset has fewer rows per worker than one batch ({self.batch})")
            self.epoch, self.index, self._it = self.epoch + 1, 0, None

    def __iter__(self):
        return self


class SketchSampler:
    """The user's sketches, held in memory; each batch is drawn by the step's RNG (part of its checkpoint)."""

    def __init__(self, sketches: torch.Tensor, name: str, batch: int):
        if sketches is None or sketches.shape[0] == 0:
            raise ValueError(f"sketch set {name!r} is empty")
        self.replace = sketches.shape[0] < batch
        if self.replace:
            log.warning("sketch set %r has %d sketch(es), fewer than the per-worker batch of %d: sampling with "
                        "replacement", name, sketches.shape[0], batch)
        self.sketches, self.batch = sketches, batch

    def sample(self, rng: torch.Generator) -> torch.Tensor:
        n = self.sketches.shape[0]
        if self.replace:
            idx = torch.randint(0, n, (self.batch,), generator=rng)
        else:
            idx = torch.randperm(n, generator=rng)[: self.batch]
        return self.sketches[idx]


# -- checkpoints ---------------------------------------------------------------------------------------------
def checkpoint_dir(run_uri: str) -> str:
    return storage.join(run_uri, "checkpoints")


def latest_checkpoint(run_uri: str) -> str | None:
    """The URI of a run's latest complete checkpoint, or None."""
    pointer = storage.join(checkpoint_dir(run_uri), "latest.json")
    if not storage.exists(pointer):
        return None
    uri = storage.read_json(pointer)["uri"]
    return uri if storage.exists(uri) else None


def save_checkpoint(run_uri: str, iteration: int, state: dict, keep: int, name: str | None = None) -> str:
    """Write ``ckpt-<iter>.pt`` atomically, move ``latest.json`` to it, then drop all but the last ``keep``.

    ``name`` (e.g. ``best``) writes ``<name>.pt`` and ``<name>.json`` instead, outside the rotation.
    """
    d = checkpoint_dir(run_uri)
    uri = storage.join(d, f"{name}.pt" if name else f"ckpt-{iteration:08d}.pt")
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(uri, buf.getvalue())
    storage.write_json(storage.join(d, f"{name or 'latest'}.json"), {"uri": uri, "iteration": iteration})
    if name is None:
        rotated = sorted(u for u in storage.list_files(d, suffix=".pt") if u.rsplit("/", 1)[-1].startswith("ckpt-"))
        for old in rotated[:-keep]:
            storage.delete(old)
    return uri


def load_checkpoint(uri: str) -> dict:
    """A checkpoint written by `save_checkpoint` (tensors and plain containers only)."""
    try:
        return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except (OSError, ValueError):
        raise
    except Exception as exc:
        raise ValueError(f"checkpoint {uri}: not readable ({exc})") from None


# -- building the step -----------------------------------------------------------------------------------
def build_step(spec: RunSpec, device: torch.device, seed: int):
    """The objective's step with networks from the base checkpoints (train) or at random (pretrain)."""
    cfg = spec.cfg
    arch = factory.generator_kwargs(cfg.model)
    torch.manual_seed(spec.section.seed)  # identical initial weights on every rank
    G = factory.build_generator(arch)
    if spec.kind == "pretrain":
        p = cfg.pretrain
        D = factory.build_discriminator(arch)
        ocfg = ObjectiveConfig(lr=p.lr, r1_gamma=p.r1_gamma, r1_every=p.r1_every, mixing=p.mixing,
                               augment=p.augment, trained="all", precision=p.precision,
                               ema_beta=ema_beta_for(p.batch_size, p.ema_half_life_kimg))
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
    ocfg = ObjectiveConfig.from_config(t, ema_beta=ema_beta_for(t.batch_size, t.ema_half_life_kimg))
    return GANSketchingStep(G, D_sketch, D_image, sketcher, ocfg, device=device, seed=seed)


def step_modules(step) -> list[torch.nn.Module]:
    names = ("G", "G_ema", "D", "D_sketch", "D_image")
    return [m for m in (getattr(step, n, None) for n in names) if m is not None]


def broadcast_from_rank0(step) -> None:
    """Start every data-parallel worker from rank 0's weights (as DDP does)."""
    if process_group_size() <= 1:
        return
    with torch.no_grad():
        for module in step_modules(step):
            for t in list(module.parameters()) + list(module.buffers()):
                torch.distributed.broadcast(t.data, src=0)


def final_generator(step) -> torch.nn.Module:
    """What the run publishes: the EMA generator when the run keeps one (always for pretraining), else G."""
    return step.G_ema if getattr(step, "G_ema", None) is not None else step.G


# -- the loop --------------------------------------------------------------------------------------------------
def run_worker(spec: RunSpec, make_epoch: MakeEpoch | None, sketches: torch.Tensor | None,
               report: Report | None = None, rank: int = 0, world_size: int = 1,
               resume_checkpoint: str | None = None, hooks: TestHooks | None = None,
               device: torch.device | None = None) -> dict:
    """Train one run on this worker and return its last reported metrics.

    ``make_epoch(epoch)`` yields this worker's share of the real images (batches of ``batch_size //
    world_size``). The starting point is, in order: ``resume_checkpoint`` (Ray Train's after a failure),
    the run's own latest checkpoint, ``spec.resume_from``, else iteration 0.
    """
    cfg, section = spec.cfg, spec.section
    device = device or factory.device_default()
    total_iters, global_batch = section.iterations, section.batch_size
    if global_batch % world_size:
        raise ValueError(f"{spec.kind}.batch_size {global_batch} is not divisible by {world_size} workers")
    batch = global_batch // world_size
    if world_size > 1 and process_group_size() == 0:
        # without a process group every worker would train its own copy and only rank 0's would be published
        raise RuntimeError(f"{spec.run_name}: {world_size} workers but no torch.distributed process group")
    t = cfg.train  # the run machinery (intervals, checkpoints) is shared by pretrain and train
    step = build_step(spec, device, seed=section.seed * 1000 + rank)
    broadcast_from_rank0(step)
    is_gs = isinstance(step, GANSketchingStep)
    sampler = SketchSampler(sketches, spec.sketch_set.get("name", "?"), batch) if is_gs else None

    start, history, resumed_at, position, best = 0, [], [], {"epoch": 0, "index": 0}, None
    ckpt_uri = resume_checkpoint or latest_checkpoint(spec.run_uri) or spec.resume_from
    if ckpt_uri is not None:
        state = load_checkpoint(ckpt_uri)
        step.load_state_dict(state["step"])
        start = int(state["iteration"])
        history, resumed_at = list(state.get("history", [])), list(state.get("resumed_at", [])) + [start]
        position, best = state.get("data_position", position), state.get("best")
        if rank == 0:
            log.info("%s: resuming from %s at iteration %d", spec.run_name, ckpt_uri, start)

    needs_images = not is_gs or step.D_image is not None
    images = None
    if needs_images:
        if make_epoch is None:
            raise ValueError(f"{spec.run_name}: this run needs real images but no image dataset was given")
        images = ImageStream(make_epoch, cfg.model.size, batch, position["epoch"], position["index"])

    evaluator = None
    if rank == 0 and spec.evalset_uri and t.eval_every:
        from pipeline.train.evaluate import FidEvaluator

        evaluator = FidEvaluator(cfg, spec.evalset_uri, device)

    sample_z = torch.randn(SAMPLE_COUNT, cfg.model.style_dim, generator=torch.Generator().manual_seed(SAMPLE_SEED))
    if rank == 0 and start == 0:
        write_samples(spec.run_uri, final_generator(step), sample_z, 0, device)

    t0, cpu0, done_since, logs, data_wait = time.perf_counter(), time.process_time(), 0, {}, 0.0
    for it in range(start, total_iters):
        if hooks and hooks.crash_at == it and hooks.crash_marker:
            _crash_once(hooks.crash_marker)
        t_data = time.perf_counter()
        real = next(images) if images is not None else None
        data_wait += time.perf_counter() - t_data
        sk = sampler.sample(step.rng) if sampler is not None else None
        logs = step.step(it, real, sk)
        done_since += 1
        n_done = it + 1
        last = n_done == total_iters
        log_now = n_done % t.log_every == 0 or last
        ckpt_now = n_done % t.checkpoint_every == 0 or last
        eval_now = bool(spec.evalset_uri and t.eval_every) and (n_done % (t.eval_every or 1) == 0 or last)
        metrics = None
        if log_now or ckpt_now or eval_now:  # decided from the config alone: every rank reports alike
            dt = max(time.perf_counter() - t0, 1e-9)
            metrics = {"iteration": n_done, **{k: round(float(v), 6) for k, v in logs.items()},
                       "it_per_s": round(done_since / dt, 4), "img_per_s": round(done_since * global_batch / dt, 3),
                       # the share of the interval spent waiting for (and decoding) real images: input-bound?
                       "data_wait_frac": round(data_wait / dt, 4),
                       # CPU time of this whole process over wall time: how many cores the worker actually got
                       "cpu_cores": round((time.process_time() - cpu0) / dt, 3)}
            if eval_now and evaluator is not None:
                metrics["fid"] = round(evaluator(final_generator(step)), 4)
            history.append(metrics)
        saved = None
        if rank == 0 and metrics is not None:
            storage.write_text(storage.join(spec.run_uri, "metrics.jsonl"),
                               "".join(json.dumps(m) + "\n" for m in history))
            log.info("%s: %s", spec.run_name, " ".join(f"{k}={v}" for k, v in metrics.items()))
        new_best = metrics is not None and "fid" in metrics and (best is None or metrics["fid"] < best["fid"])
        if new_best:
            best = {"fid": metrics["fid"], "iteration": n_done}
        if rank == 0 and (ckpt_now or new_best):
            position = images.position() if images is not None else position
            state = {"format": CHECKPOINT_FORMAT, "kind": spec.kind, "iteration": n_done,
                     "step": step.state_dict(), "history": history, "resumed_at": resumed_at,
                     "data_position": position, "best": best, "config": spec.config,
                     "fingerprints": fingerprints(spec)}
            if ckpt_now:
                saved = save_checkpoint(spec.run_uri, n_done, state, keep=t.keep_checkpoints)
            if new_best:  # kept beside the rotating latest ones
                save_checkpoint(spec.run_uri, n_done, state, keep=t.keep_checkpoints, name="best")
        if rank == 0 and n_done % t.sample_every == 0 and not last:
            write_samples(spec.run_uri, final_generator(step), sample_z, n_done, device)
        if metrics is not None:
            if report is not None:
                report(metrics, saved)  # every rank reports at the same iterations (a barrier in Ray Train)
            t0, cpu0, done_since, data_wait = time.perf_counter(), time.process_time(), 0, 0.0

    final_metrics = history[-1] if history else {}
    if rank == 0:
        write_samples(spec.run_uri, final_generator(step), sample_z, total_iters, device)
        write_final(spec, step, final_metrics, resumed_at, best)
    return final_metrics


def _crash_once(marker: str) -> None:
    import os

    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write("crashed\n")
        os._exit(17)  # a worker process dying without cleanup, as on a node loss or OOM kill


def fingerprints(spec: RunSpec) -> dict[str, Any]:
    return {"sketch_set": spec.sketch_set.get("id"), "dataset": spec.dataset_manifest_id,
            "base_g_sha256": spec.base_g_sha256}


@torch.no_grad()
def write_samples(run_uri: str, G: torch.nn.Module, z: torch.Tensor, iteration: int, device) -> str:
    """A 4×4 grid of G's images for fixed latents and fixed noise (``samples/iter-<n>.png``)."""
    was_training = G.training
    G.eval()
    imgs = G([z.to(device)], randomize_noise=False)[0]
    G.train(was_training)
    uri = storage.join(run_uri, "samples", f"iter-{iteration:08d}.png")
    storage.write_bytes(uri, png_bytes(to_uint8_grid(imgs, nrow=4)))
    return uri


def write_final(spec: RunSpec, step, final_metrics: dict, resumed_at: list[int], best: dict | None) -> None:
    """The run contract's outputs; ``final/metadata.json`` goes last and means "this run finished"."""
    cfg = spec.cfg
    final = storage.join(spec.run_uri, "final")
    g_sha = save_state_dict(final_generator(step), storage.join(final, "G.pth"))
    if isinstance(step, StyleGAN2Step):
        save_state_dict(step.D, storage.join(final, "D.pth"))
    else:
        save_state_dict(step.D_sketch, storage.join(final, "D_sketch.pth"))
        if step.D_image is not None:
            save_state_dict(step.D_image, storage.join(final, "D_image.pth"))
    base_sha = spec.base_g_sha256
    if base_sha is None and spec.kind == "train" and cfg.model.base_g:
        base_sha = sha256_of(cfg.model.base_g)
    metadata = {
        "run_name": spec.run_name, "run_uri": spec.run_uri, "kind": spec.kind,
        "arch": factory.generator_kwargs(cfg.model), "config": spec.config, "category": cfg.data.category,
        "sketch_set": spec.sketch_set or None, "base_g": cfg.model.base_g if spec.kind == "train" else None,
        "base_g_sha256": base_sha, "g_sha256": g_sha, "dataset_manifest_id": spec.dataset_manifest_id,
        "evalset": spec.evalset_uri, "iterations": spec.section.iterations, "final_metrics": final_metrics,
        "fid": final_metrics.get("fid"), "best": best, "resumed_at": resumed_at,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_json(storage.join(final, "metadata.json"), metadata)
