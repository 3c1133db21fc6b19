"""The per-worker training loop shared by `pretrain`, `train`, Tune trials and the benchmarks.

Pure PyTorch apart from its edges: real images arrive through ``make_epoch(epoch)`` (see `streams`), user
sketches as one in-memory tensor, and progress goes to a ``report(metrics, checkpoint_uri)`` callback
(``ray.train.report`` inside Ray Train). Rank 0 writes checkpoints, samples, metrics and the final output
(`run_store`). A checkpoint holds networks, optimisers, RNG states and the position in the image stream, so a
restarted worker group or a resumed run continues exactly where the checkpoint left off.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch

from pipeline.models import factory
from pipeline.train import run_store
from pipeline.train.objective import GANSketchingStep
from pipeline.train.spec import RunSpec, TestHooks
from pipeline.train.step_base import process_group_size
from pipeline.train.step_factory import broadcast_from_rank0, build_step, final_generator, published_discriminators
from pipeline.train.streams import ImageStream, MakeEpoch, SketchSampler

log = logging.getLogger("sketchgan.train")

SAMPLE_SEED = 1234  # fixed latents of the sample grids, so grids of one run are comparable over time
SAMPLE_COUNT = 16

Report = Callable[[dict, "str | None"], None]


class _Interval:
    """Timing and throughput since the last report (wall time, CPU time, time spent waiting for images)."""

    def __init__(self):
        self.t0, self.cpu0, self.steps, self.data_wait = time.perf_counter(), time.process_time(), 0, 0.0

    def metrics(self, global_batch: int) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return {"it_per_s": round(self.steps / dt, 4), "img_per_s": round(self.steps * global_batch / dt, 3),
                # the share of the interval spent waiting for (and decoding) real images: input-bound?
                "data_wait_frac": round(self.data_wait / dt, 4),
                # CPU time of this whole process over wall time: how many cores the worker actually got
                "cpu_cores": round((time.process_time() - self.cpu0) / dt, 3)}


def run_worker(spec: RunSpec, make_epoch: MakeEpoch | None, sketches: torch.Tensor | None,
               report: Report | None = None, rank: int = 0, world_size: int = 1,
               resume_checkpoint: str | None = None, hooks: TestHooks | None = None,
               device: torch.device | None = None) -> dict:
    """Train one run on this worker and return its last reported metrics.

    ``make_epoch(epoch)`` yields this worker's share of the real images (batches of ``batch_size //
    world_size``). The starting point is, in order: ``resume_checkpoint`` (Ray Train's after a failure),
    the run's own latest checkpoint, ``spec.resume_from``, else iteration 0.
    """
    cfg, run = spec.cfg, spec.section
    device = device or factory.device_default()
    total_iters, global_batch = run.iterations, run.batch_size
    if global_batch % world_size:
        raise ValueError(f"{spec.kind}.batch_size {global_batch} is not divisible by {world_size} workers")
    batch = global_batch // world_size
    if world_size > 1 and process_group_size() == 0:
        # without a process group every worker would train its own copy and only rank 0's would be published
        raise RuntimeError(f"{spec.run_name}: {world_size} workers but no torch.distributed process group")
    eval_every = getattr(run, "eval_every", None) if spec.evalset_uri else None
    step = build_step(spec, device, seed=run.seed * 1000 + rank)
    broadcast_from_rank0(step)
    is_gs = isinstance(step, GANSketchingStep)
    sampler = SketchSampler(sketches, spec.sketch_set.get("name", "?"), batch) if is_gs else None

    start, history, resumed_at, position, best = 0, [], [], {"epoch": 0, "index": 0}, None
    ckpt_uri = resume_checkpoint or run_store.latest_checkpoint(spec.run_uri) or spec.resume_from
    if ckpt_uri is not None:
        state = run_store.load_checkpoint(ckpt_uri)
        step.load_state_dict(state["step"])
        start = int(state["iteration"])
        history, resumed_at = list(state.get("history", [])), list(state.get("resumed_at", [])) + [start]
        position, best = state.get("data_position", position), state.get("best")
        if rank == 0:
            log.info("%s: resuming from %s at iteration %d", spec.run_name, ckpt_uri, start)

    images = None
    if not is_gs or step.D_image is not None:
        if make_epoch is None:
            raise ValueError(f"{spec.run_name}: this run needs real images but no image dataset was given")
        images = ImageStream(make_epoch, cfg.model.size, batch, position["epoch"], position["index"])

    evaluator = None
    if rank == 0 and eval_every:
        from pipeline.train.evaluate import FidEvaluator

        evaluator = FidEvaluator(cfg, spec.evalset_uri, device)

    sample_z = torch.randn(SAMPLE_COUNT, cfg.model.style_dim, generator=torch.Generator().manual_seed(SAMPLE_SEED))
    if rank == 0 and start == 0:
        run_store.write_samples(spec.run_uri, final_generator(step), sample_z, 0, device)

    interval, logs = _Interval(), {}
    for it in range(start, total_iters):
        if hooks and hooks.crash_at == it and hooks.crash_marker:
            _crash_once(hooks.crash_marker)
        t_data = time.perf_counter()
        real = next(images) if images is not None else None
        interval.data_wait += time.perf_counter() - t_data
        logs = step.step(it, real, sampler.sample(step.rng) if sampler is not None else None)
        interval.steps += 1
        n_done = it + 1
        last = n_done == total_iters
        ckpt_now = n_done % run.checkpoint_every == 0 or last
        eval_now = bool(eval_every) and (n_done % eval_every == 0 or last)
        metrics = None
        if n_done % run.log_every == 0 or ckpt_now or eval_now:  # from the config alone: every rank alike
            metrics = {"iteration": n_done, **{k: round(float(v), 6) for k, v in logs.items()},
                       **interval.metrics(global_batch)}
            if eval_now and evaluator is not None:
                metrics["fid"] = round(evaluator(final_generator(step)), 4)
            history.append(metrics)
            if rank == 0:  # the driver shows progress from these rows: no need to print them here too
                run_store.write_metrics(spec.run_uri, history)
                log.debug("%s: %s", spec.run_name, " ".join(f"{k}={v}" for k, v in metrics.items()))
        new_best = metrics is not None and "fid" in metrics and (best is None or metrics["fid"] < best["fid"])
        if new_best:
            best = {"fid": metrics["fid"], "iteration": n_done}
        saved = None
        if rank == 0 and (ckpt_now or new_best):
            position = images.position() if images is not None else position
            state = {"format": run_store.CHECKPOINT_FORMAT, "kind": spec.kind, "iteration": n_done,
                     "step": step.state_dict(), "history": history, "resumed_at": resumed_at,
                     "data_position": position, "best": best, "config": spec.config,
                     "fingerprints": spec.fingerprints()}
            if ckpt_now:
                saved = run_store.save_checkpoint(spec.run_uri, n_done, state, keep=run.keep_checkpoints)
            if new_best:  # kept beside the rotating latest ones, with its generator ready to publish
                run_store.save_best_generator(spec.run_uri, n_done, final_generator(step))
                run_store.save_checkpoint(spec.run_uri, n_done, state, keep=run.keep_checkpoints, name="best")
        if rank == 0 and n_done % run.sample_every == 0 and not last:
            run_store.write_samples(spec.run_uri, final_generator(step), sample_z, n_done, device)
        if metrics is not None:
            if report is not None:
                report(metrics, saved)  # every rank reports at the same iterations (a barrier in Ray Train)
            interval = _Interval()

    final_metrics = history[-1] if history else {}
    if rank == 0:
        run_store.write_samples(spec.run_uri, final_generator(step), sample_z, total_iters, device)
        run_store.write_final(spec, final_generator(step), published_discriminators(step), final_metrics,
                              resumed_at, best)
    return final_metrics


def _crash_once(marker: str) -> None:
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write("crashed\n")
        os._exit(17)  # a worker process dying without cleanup, as on a node loss or OOM kill
