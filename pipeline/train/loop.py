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
from pipeline.train.ledger import RunLedger
from pipeline.train.objective import GANSketchingStep
from pipeline.train.spec import RunSpec, TestHooks
from pipeline.train.step_base import process_group_size
from pipeline.train.step_factory import broadcast_from_rank0, build_step, final_generator, published_discriminators
from pipeline.train.streams import ImageStream, MakeEpoch, SketchSampler

log = logging.getLogger("sketchgan.train")

Report = Callable[[dict, "str | None"], None]


class Interval:
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
    step = build_step(spec, device, seed=run.seed * 1000 + rank)
    broadcast_from_rank0(step)
    is_gs = isinstance(step, GANSketchingStep)
    sampler = SketchSampler(sketches, spec.sketch_set.get("name", "?"), batch) if is_gs else None

    ledger = RunLedger(spec, writes=rank == 0)
    ckpt_uri = resume_checkpoint or run_store.latest_checkpoint(spec.run_uri) or spec.resume_from
    if ckpt_uri is not None:
        step.load_state_dict(ledger.resume(ckpt_uri))

    images = None
    if not is_gs or step.D_image is not None:
        if make_epoch is None:
            raise ValueError(f"{spec.run_name}: this run needs real images but no image dataset was given")
        images = ImageStream(make_epoch, cfg.model.size, batch, ledger.position["epoch"], ledger.position["index"])

    evaluator = None
    if rank == 0 and ledger.eval_every:
        from pipeline.train.evaluate import FidEvaluator

        evaluator = FidEvaluator(cfg, spec.evalset_uri, device)

    if rank == 0 and ledger.start == 0:
        ledger.samples(final_generator(step), 0, device)

    interval = Interval()
    for it in range(ledger.start, total_iters):
        crash_if_asked(hooks, it)
        t_data = time.perf_counter()
        real = next(images) if images is not None else None
        interval.data_wait += time.perf_counter() - t_data
        logs = step.step(it, real, sampler.sample(step.rng) if sampler is not None else None)
        interval.steps += 1
        n_done = it + 1
        due = ledger.due(n_done)
        metrics = None
        if due.metrics:
            timing = interval.metrics(global_batch)  # before the FID, which is not training time
            fid = evaluator(final_generator(step)) if due.fid and evaluator is not None else None
            metrics = ledger.record(n_done, logs, timing, fid)
        new_best = ledger.is_new_best(metrics)
        saved = None
        if rank == 0 and (due.checkpoint or new_best):
            position = images.position() if images is not None else ledger.position
            state = ledger.checkpoint_state(n_done, step.state_dict(), position)
            saved = ledger.save(n_done, state, due.checkpoint, new_best, final_generator(step))
        if rank == 0 and due.samples:
            ledger.samples(final_generator(step), n_done, device)
        if metrics is not None:
            if report is not None:
                report(metrics, saved)  # every rank reports at the same iterations (a barrier in Ray Train)
            interval = Interval()

    if rank == 0:
        return ledger.finish(final_generator(step), published_discriminators(step), device)
    return ledger.history[-1] if ledger.history else {}


def crash_if_asked(hooks: TestHooks | None, iteration: int) -> None:
    """Tests only: die once at the hooked iteration."""
    if hooks and hooks.crash_at == iteration and hooks.crash_marker:
        _crash_once(hooks.crash_marker)


def _crash_once(marker: str) -> None:
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write("crashed\n")
        os._exit(17)  # a worker process dying without cleanup, as on a node loss or OOM kill
