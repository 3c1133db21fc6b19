"""Seconds, FLOPs and MFU of one full GANSketching training step on this machine.

The step: both discriminator updates, the generator update, and 1/16 of an R1 step (R1 runs every 16
iterations); 64 px, batch 4, λ_image 0.7, translation, mapping-network training, the published channel
widths (channel_multiplier 2, style_dim 512, n_mlp 8), and the PhotoSketch architecture (random weights) as F.
FLOPs are counted with torch.utils.flop_counter; the fp32 matmul peak (sgemm, same thread count) is measured
in the same run, before and after the steps, and the higher figure is used. Prints `mfu:` last.

    python benchmarks/train_step.py [--steps 3] [--size 64] [--batch 4] [--threads N] [--no-channels-last]
                                    [--clock wall|process]

``--clock process`` times with this process's CPU time instead of the wall clock (peak and step alike): with
``--threads 1`` that measures the code rather than the neighbours when the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pipeline.models.photosketch import PhotoSketch  # noqa: E402
from pipeline.models.sketchers import PhotoSketchSketcher  # noqa: E402
from pipeline.models.stylegan2 import Discriminator, Generator  # noqa: E402
from pipeline.train.objective import GANSketchingStep  # noqa: E402
from pipeline.train.step_base import ObjectiveConfig  # noqa: E402


class _WholeProgram:
    """Stands in for FlopCounterMode's per-module tracker: we only need the total, and the tracker's
    backward hooks cost time and do not support double backward (R1) in every torch release."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def count_flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _WholeProgram()
    with counter:
        fn()
    return counter.get_total_flops()


CLOCK = time.perf_counter


def matmul_peak(n: int = 4096, repeats: int = 6) -> float:
    """Best-of fp32 matmul FLOP/s with the current thread settings."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        t = CLOCK()
        torch.mm(a, b, out=out)
        best = min(best, CLOCK() - t)
    return 2 * n**3 / best


def build(size: int, batch: int, channels_last: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    G = Generator(size)  # published widths: style_dim 512, n_mlp 8, channel_multiplier 2
    sketcher = PhotoSketchSketcher(PhotoSketch(norm="batch"))
    cfg = ObjectiveConfig(lambda_image=0.7, augment="translation", trained="mapping", r1_every=16,
                          channels_last=channels_last)
    step = GANSketchingStep(G, Discriminator(size), Discriminator(size), sketcher, cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    real = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    sketches = torch.where(torch.rand(batch, 1, size, size, generator=g) > 0.9, -1.0, 1.0)
    return step, real, sketches


def timed(step, it: int, real, sk) -> float:
    t = CLOCK()
    step.step(it, real, sk)
    return CLOCK() - t


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed plain steps (best of)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--clock", choices=("wall", "process"), default="wall")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    torch.set_num_threads(args.threads)
    load_before = loadavg()

    peak = matmul_peak()
    step, real, sk = build(args.size, args.batch, args.channels_last)
    r1_every = step.cfg.r1_every
    step.step(1, real, sk)  # warm-up (allocator, oneDNN primitive caches)
    f_plain = count_flops(lambda: step.step(2, real, sk))
    f_r1 = count_flops(lambda: step.step(r1_every, real, sk))  # an iteration that also runs R1
    t_plain = min(timed(step, 3 + i, real, sk) for i in range(args.steps))
    t_r1 = min(timed(step, r1_every * (2 + i), real, sk) for i in range(2))
    peak = max(peak, matmul_peak())

    t_r1_extra, f_r1_extra = max(t_r1 - t_plain, 0.0), f_r1 - f_plain
    seconds = t_plain + t_r1_extra / r1_every
    flops = f_plain + f_r1_extra / r1_every
    print(f"config: {args.size}px batch {args.batch}, published widths, PhotoSketch F, lambda_image 0.7, "
          f"translation, mapping-network training, threads {torch.get_num_threads()}, "
          f"channels_last {args.channels_last}, clock {args.clock}")
    print(f"load_average_before_after: {load_before} / {loadavg()}")
    print(f"matmul_peak_gflops: {peak / 1e9:.1f}")
    print(f"seconds_per_step_main: {t_plain:.3f}")
    print(f"seconds_r1_step_extra: {t_r1_extra:.3f} (amortised /{r1_every}: {t_r1_extra / r1_every:.3f})")
    print(f"seconds_per_step: {seconds:.3f}")
    print(f"tflop_per_step_main: {f_plain / 1e12:.3f}")
    print(f"tflop_r1_extra: {f_r1_extra / 1e12:.3f} (amortised /{r1_every}: {f_r1_extra / r1_every / 1e12:.4f})")
    print(f"tflop_per_step: {flops / 1e12:.3f}")
    print(f"mfu_main: {f_plain / t_plain / peak:.3f}")
    print(f"mfu: {flops / seconds / peak:.3f}")


if __name__ == "__main__":
    main()
