"""One training run's record while it trains: where it starts, its metrics, best FID, checkpoints, sample grids
and final output, on the schedule its config sets. Shared by the loop of a separate run (`loop`) and of a packed
group (`packed_loop`, one ledger per sketch set), so both leave the same files in the run's folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pipeline.train import run_store
from pipeline.train.spec import RunSpec

log = logging.getLogger("sketchgan.train")

SAMPLE_SEED = 1234  # fixed latents of the sample grids, so grids of one run are comparable over time
SAMPLE_COUNT = 16


@dataclass
class Due:
    """What an iteration's end calls for, from the config alone (so every rank and every lane agree)."""

    metrics: bool
    checkpoint: bool
    fid: bool
    samples: bool


class RunLedger:
    """A run's progress, as rank 0 writes it (other ranks keep the same history without writing)."""

    def __init__(self, spec: RunSpec, writes: bool = True):
        self.spec, self.writes = spec, writes
        self.start, self.history, self.resumed_at, self.best = 0, [], [], None
        self.position = {"epoch": 0, "index": 0}  # where in the real-image stream the checkpoint was taken
        self.eval_every = getattr(spec.section, "eval_every", None) if spec.evalset_uri else None
        self.sample_z = torch.randn(SAMPLE_COUNT, spec.cfg.model.style_dim,
                                    generator=torch.Generator().manual_seed(SAMPLE_SEED))

    def resume(self, checkpoint_uri: str) -> dict:
        """Take the run's record from a checkpoint; returns the step's state in it."""
        state = run_store.load_checkpoint(checkpoint_uri)
        self.start = int(state["iteration"])
        self.history = list(state.get("history", []))
        self.resumed_at = list(state.get("resumed_at", [])) + [self.start]
        self.position, self.best = state.get("data_position", self.position), state.get("best")
        if self.writes:
            log.info("%s: resuming from %s at iteration %d", self.spec.run_name, checkpoint_uri, self.start)
        return state["step"]

    def due(self, n_done: int) -> Due:
        run = self.spec.section
        last = n_done == run.iterations
        checkpoint = n_done % run.checkpoint_every == 0 or last
        fid = bool(self.eval_every) and (n_done % self.eval_every == 0 or last)
        return Due(metrics=n_done % run.log_every == 0 or checkpoint or fid, checkpoint=checkpoint, fid=fid,
                   samples=n_done % run.sample_every == 0 and not last)

    def record(self, n_done: int, logs: dict, interval: dict, fid: float | None = None) -> dict:
        """A metrics row: the step's losses, the interval's throughput and the FID when measured."""
        metrics = {"iteration": n_done, **{k: round(float(v), 6) for k, v in logs.items()}, **interval}
        if fid is not None:
            metrics["fid"] = round(fid, 4)
        self.history.append(metrics)
        if self.writes:  # the driver shows progress from these rows: no need to print them here too
            run_store.write_metrics(self.spec.run_uri, self.history)
            log.debug("%s: %s", self.spec.run_name, " ".join(f"{k}={v}" for k, v in metrics.items()))
        return metrics

    def is_new_best(self, metrics: dict | None) -> bool:
        new = metrics is not None and "fid" in metrics and (self.best is None or metrics["fid"] < self.best["fid"])
        if new:
            self.best = {"fid": metrics["fid"], "iteration": metrics["iteration"]}
        return new

    def checkpoint_state(self, n_done: int, step_state: dict, position: dict) -> dict:
        """What a checkpoint at ``n_done`` holds; ``position`` (in the real-image stream) becomes the ledger's."""
        spec = self.spec
        self.position = position
        return {"format": run_store.CHECKPOINT_FORMAT, "kind": spec.kind, "iteration": n_done, "step": step_state,
                "history": self.history, "resumed_at": self.resumed_at, "data_position": position,
                "best": self.best, "config": spec.config, "fingerprints": spec.fingerprints()}

    def save(self, n_done: int, state: dict, checkpoint: bool, new_best: bool, published_g: torch.nn.Module,
             rotate: bool = True) -> str | None:
        """Write the due checkpoint (and the best one with its generator); returns the checkpoint's URI."""
        run, uri = self.spec.section, None
        if checkpoint:
            uri = run_store.save_checkpoint(self.spec.run_uri, n_done, state, keep=run.keep_checkpoints,
                                            rotate=rotate)
        if new_best:  # kept beside the rotating latest ones, with its generator ready to publish
            run_store.save_best_generator(self.spec.run_uri, n_done, published_g)
            run_store.save_checkpoint(self.spec.run_uri, n_done, state, keep=run.keep_checkpoints, name="best")
        return uri

    def samples(self, generator: torch.nn.Module, n_done: int, device: torch.device) -> None:
        run_store.write_samples(self.spec.run_uri, generator, self.sample_z, n_done, device)

    def finish(self, published_g: torch.nn.Module, discriminators: dict[str, torch.nn.Module],
               device: torch.device) -> dict:
        """The last sample grid and the final output; returns the last metrics row."""
        final_metrics = self.history[-1] if self.history else {}
        self.samples(published_g, self.spec.section.iterations, device)
        run_store.write_final(self.spec, published_g, discriminators, final_metrics, self.resumed_at, self.best)
        return final_metrics
