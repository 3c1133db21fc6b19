"""Preprocess throughput with the PhotoSketch network (random weights) at 256 px: our Ray Data stage against the
reference procedure (one image at a time in one process: PIL bicubic resize, normalise, network, PNG encode).

    python benchmarks/preprocess.py [--n-ours 400] [--n-ref 24] [--network-batch 4] [--batch-size 16]

Both read the same LSUN-style WebPs (256 px on the short side) from an LMDB. The reference runs the network as
the upstream code does (batch norm in training mode on one NCHW image, i.e. per-image statistics).

Comparisons are at equal precision: ours in fp32 against the reference in fp32, and (on machines where the stage
picks bf16: CPUs with bf16 matrix units, GPUs) ours in bf16 against the reference with its network in bf16.
Ray is started and warmed by an untimed run first; then for each precision the reference is timed, ours is
timed, the reference is timed again (averaged), so that both sides see the same machine load. Each figure of
ours is the wall time of a whole `preprocess()` call (actor start, reading, decoding, network, PNG encoding,
Parquet writing and publishing), not a steady-state rate. MFU = network FLOPs per second / the matmul peak in
the same precision. Prints per precision ``speedup_<p>_vs_reference_<p>``, ``mfu`` of the default precision
and, last, ``speedup_vs_reference_equal_precision``: the smaller of the equal-precision ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

SIZE = 256


def make_source(root: Path, n: int) -> tuple[str, list[bytes]]:
    """An LSUN-like LMDB of n WebPs, 256 px on the short side, landscape and portrait mixed (not timed)."""
    import lmdb

    from pipeline.data import synthetic

    images, _ = synthetic.generate_shape_images(n, SIZE, seed=0)
    values = []
    for i, arr in enumerate(images):
        w, h = (320, 256) if i % 2 else (256, 288)
        values.append(synthetic.encode(Image.fromarray(arr).resize((w, h), Image.BICUBIC), "WEBP"))
    path = root / "lsun" / "bench"
    path.mkdir(parents=True)
    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for i, v in enumerate(values):
            txn.put(synthetic.image_key("bench", 0, i).encode(), v)
    env.close()
    return str(path), values


def matmul_peak(threads: int, dtype: torch.dtype = torch.float32) -> float:
    """Best matmul GFLOP/s in ``dtype`` over a few 2048² products."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * 2048**3 / (time.perf_counter() - t) / 1e9)
    return best


def network_gflop(net: torch.nn.Module) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, SIZE, SIZE))
    return counter.get_total_flops() / 1e9


def reference_network(net: torch.nn.Module) -> torch.nn.Module:
    """``net``'s layers as the upstream code runs them: plain BatchNorm2d in training mode, NCHW, fp32."""
    import copy

    from pipeline.models.photosketch import BatchStatNorm

    ref = copy.deepcopy(net.model)

    def swap(module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, BatchStatNorm):
                bn = torch.nn.BatchNorm2d(child.num_features, eps=child.eps)
                bn.load_state_dict(child.state_dict())
                setattr(module, name, bn)
            else:
                swap(child)

    swap(ref)
    return ref.train().requires_grad_(False)


def reference(values: list[bytes], net: torch.nn.Module, dtype: torch.dtype = torch.float32) -> float:
    """images/s of the reference procedure over ``values`` (its network and input in ``dtype``)."""
    t = time.perf_counter()
    with torch.no_grad():
        for v in values:
            img = Image.open(io.BytesIO(v)).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)
            x = torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1)[None]
            x = (x - 0.5) / 0.5
            y = net(x.to(dtype))[0, 0].float()
            out = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
            buf = io.BytesIO()
            Image.fromarray(out, "L").save(buf, format="PNG")
    return len(values) / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-ours", type=int, default=400)
    parser.add_argument("--n-ref", type=int, default=24, help="images per reference pass (two passes)")
    parser.add_argument("--network-batch", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    import ray

    from pipeline.config import load_config
    from pipeline.data.preprocess import node_cpus, preprocess
    from pipeline.models.photosketch import PhotoSketch
    from pipeline.models.sketchers import resolve_sketch_precision

    cores = node_cpus()
    torch.manual_seed(0)
    net = PhotoSketch(norm="per_image").eval().requires_grad_(False)
    ref_net = reference_network(net)
    precision = resolve_sketch_precision("photosketch", "auto")
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        root = Path(tmp)
        weights = root / "photosketch-random.pth"
        torch.save(net.state_dict(), weights)
        source, values = make_source(root, max(args.n_ours, 2 * args.n_ref))
        peaks = {"fp32": matmul_peak(cores)}
        if precision == "bf16":
            peaks["bf16"] = matmul_peak(cores, torch.bfloat16)
        gflop = network_gflop(net)
        print(f"machine: {cores} cores, matmul peak " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()) +
              f" GFLOP/s; PhotoSketch {gflop:.1f} GFLOP/image at {SIZE} px; default sketch precision {precision}",
              flush=True)

        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})

        def ours_run(run: str, n: int, tag: str) -> tuple[float, str]:
            cfg = load_config(None, [
                f"data.source={json.dumps(source)}", f"data.dataset={json.dumps(str(root / 'out' / tag))}",
                "data.category=bench", f"data.size={SIZE}", "data.sketcher=photosketch",
                f"data.sketcher_weights={json.dumps(str(weights))}", f"data.limit={n}",
                f"data.batch_size={args.batch_size}", f"data.network_batch={args.network_batch}",
                f"data.sketch_precision={run}"])
            t = time.perf_counter()
            summary = preprocess(cfg)
            return n / (time.perf_counter() - t), summary

        ours_run("fp32", 2 * args.batch_size, "warm-up")  # Ray, its workers and the actor pool, not timed
        refs, ours, dtypes = {}, {}, {"fp32": torch.float32, "bf16": torch.bfloat16}
        for run in dict.fromkeys(["fp32", precision]):
            net_p = ref_net.to(dtypes[run])
            torch.set_num_threads(cores)
            before = reference(values[: args.n_ref], net_p, dtypes[run])
            ours[run], summary = ours_run(run, args.n_ours, run)
            torch.set_num_threads(cores)
            after = reference(values[args.n_ref: 2 * args.n_ref], net_p, dtypes[run])
            refs[run] = (before + after) / 2
            print(f"{run}: reference {before:.3f} / {after:.3f} images/s (before / after); ours: {summary}",
                  flush=True)
        ray.shutdown()
    for run in refs:
        print(f"reference_{run}_images_per_s: {refs[run]:.3f} (mfu {refs[run] * gflop / peaks[run]:.3f})")
        print(f"ours_{run}_images_per_s: {ours[run]:.3f} (mfu {ours[run] * gflop / peaks[run]:.3f})")
        print(f"speedup_{run}_vs_reference_{run}: {ours[run] / refs[run]:.3f}")
    print(f"speedup_default_{precision}_vs_reference_fp32: {ours[precision] / refs['fp32']:.3f} (unlike precisions)")
    print(f"mfu: {ours[precision] * gflop / peaks[precision]:.3f} ({precision})")
    print(f"speedup_vs_reference_equal_precision: {min(ours[r] / refs[r] for r in refs):.3f}")


if __name__ == "__main__":
    main()
