"""The worker loop of a packed group: the sketch sets of one group (`plan.pack_groups`) trained by one
`PackedGANSketchingStep` in one process, each set with its own ledger, so each run's folder holds what a separate
run's does (checkpoints in a separate step's format, sample grids, metrics, final output).

Every set of a group starts at the same checkpoint iteration and checkpoints at the same iterations. All sets'
checkpoints of an iteration are written before any older one is dropped, so a group killed at any moment
restarts from the newest iteration that every set still has.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from pipeline import layout, storage
from pipeline.models import factory
from pipeline.train import run_store
from pipeline.train.ledger import RunLedger
from pipeline.train.loop import Interval, crash_if_asked
from pipeline.train.packed import PackedGANSketchingStep
from pipeline.train.spec import RunSpec, TestHooks
from pipeline.train.step_factory import build_packed_step, discriminator_files
from pipeline.train.streams import ImageStream, MakeEpoch, SketchSampler

log = logging.getLogger("sketchgan.train")

GroupReport = Callable[[dict], None]


def group_start(specs: list[RunSpec]) -> int:
    """The iteration a (re)started group continues from: the newest one whose checkpoint every set has (a set
    whose latest checkpoint is gone counts as none, as for a separate run)."""
    starts = [run_store.resumable_iteration(s.run_uri) for s in specs]
    start = min(starts)
    missing = [s.run_name for s in specs if start and not storage.exists(layout.checkpoint_uri(s.run_uri, start))]
    if missing:  # older checkpoints are rotated only once every set has the newer one: not expected
        raise RuntimeError(f"packed group: no checkpoint of iteration {start} for {', '.join(missing)}, although "
                           "another set of the group needs to continue from it")
    if start != max(starts):
        log.warning("packed group: sets checkpointed at iterations %s; all continue from %d", starts, start)
    return start


def run_packed_worker(specs: list[RunSpec], make_epoch: MakeEpoch | None, sketches: list[torch.Tensor],
                      report: GroupReport | None = None, hooks: TestHooks | None = None,
                      device: torch.device | None = None) -> dict[str, dict]:
    """Train a group's runs together; returns each run's last metrics by run name."""
    cfg, run = specs[0].cfg, specs[0].section
    device = device or factory.device_default()
    step = build_packed_step(specs, device)
    ledgers = [RunLedger(spec) for spec in specs]
    samplers = [SketchSampler(sk, spec.sketch_set.get("name", "?"), run.batch_size)
                for spec, sk in zip(specs, sketches)]
    start = group_start(specs)
    if start:
        for k, (spec, ledger) in enumerate(zip(specs, ledgers)):
            step.load_lane_state_dict(k, ledger.resume(layout.checkpoint_uri(spec.run_uri, start)))

    images = None
    if any(lane.D_image is not None for lane in step.lanes):
        if make_epoch is None:
            raise ValueError(f"{specs[0].run_name}: these runs need real images but no image dataset was given")
        # separate runs of one config read the same stream of real images: one stream serves every set
        position = ledgers[0].position
        images = ImageStream(make_epoch, cfg.model.size, run.batch_size, position["epoch"], position["index"])

    evaluators = {}
    if any(ledger.eval_every for ledger in ledgers):
        from pipeline.eval.features import build_extractor
        from pipeline.train.evaluate import FidEvaluator

        extractor = build_extractor(cfg.eval, device=device)  # one feature network for every set
        evaluators = {spec.evalset_uri: FidEvaluator(cfg, spec.evalset_uri, device, extractor)
                      for spec, ledger in zip(specs, ledgers) if ledger.eval_every}
    if start == 0:
        _samples(step, ledgers, 0, device)

    interval = Interval()
    for it in range(start, run.iterations):
        crash_if_asked(hooks, it)
        t_data = time.perf_counter()
        real = next(images) if images is not None else None
        interval.data_wait += time.perf_counter() - t_data
        user = [sampler.sample(lane.rng) for sampler, lane in zip(samplers, step.lanes)]
        logs = step.step(it, [real] * len(specs), user)
        interval.steps += 1
        n_done = it + 1
        dues = [ledger.due(n_done) for ledger in ledgers]
        rows, saved = _record(step, ledgers, dues, evaluators, n_done, logs, interval), False
        position = images.position() if images is not None else ledgers[0].position
        for k, (ledger, due) in enumerate(zip(ledgers, dues)):
            new_best = ledger.is_new_best(rows.get(ledger.spec.run_name))
            if due.checkpoint or new_best:
                state = ledger.checkpoint_state(n_done, step.lane_state_dict(k), position)
                with step.lane_generator(k) as G:
                    saved |= ledger.save(n_done, state, due.checkpoint, new_best, G, rotate=False) is not None
        if saved:  # older checkpoints go only once every set has this iteration's
            for spec in specs:
                run_store.rotate_checkpoints(spec.run_uri, spec.section.keep_checkpoints)
        if dues[0].samples:
            _samples(step, ledgers, n_done, device)
        if rows:
            if report is not None:
                report(rows)
            interval = Interval()

    out = {}
    for k, ledger in enumerate(ledgers):
        lane, spec = step.lanes[k], ledger.spec
        with step.lane_generator(k) as G:
            out[spec.run_name] = ledger.finish(G, discriminator_files(lane.D_sketch, lane.D_image), device)
        # a group restarted at its last iteration saves nothing: drop what a kill left beyond keep_checkpoints
        run_store.rotate_checkpoints(spec.run_uri, spec.section.keep_checkpoints)
    return out


def _record(step: PackedGANSketchingStep, ledgers: list[RunLedger], dues: list, evaluators: dict, n_done: int,
            logs: list[dict], interval: Interval) -> dict[str, dict]:
    """Each due set's metrics row (its FID measured on its own evaluation set), by run name. The throughput
    fields describe the group's process (``cpu_cores``, ``data_wait_frac``) and each set's own progress
    (``it_per_s``, ``img_per_s``)."""
    rows = {}
    timing = None
    for k, (ledger, due) in enumerate(zip(ledgers, dues)):
        if not due.metrics:
            continue
        timing = timing or interval.metrics(ledger.spec.section.batch_size)  # one interval for the group
        fid = None
        if due.fid:
            with step.lane_generator(k) as G:
                fid = evaluators[ledger.spec.evalset_uri](G)
        rows[ledger.spec.run_name] = ledger.record(n_done, logs[k], timing, fid)
    return rows


def _samples(step: PackedGANSketchingStep, ledgers: list[RunLedger], n_done: int, device: torch.device) -> None:
    for k, ledger in enumerate(ledgers):
        with step.lane_generator(k) as G:
            ledger.samples(G, n_done, device)
