"""Preprocess throughput with the PhotoSketch network (random weights) at 256 px: our Ray Data stage against the
reference procedure (one image at a time in one process: PIL bicubic resize, normalise, network, PNG encode).

    python benchmarks/preprocess.py [--n-ours 160] [--n-ref 24] [--network-batch 4] [--batch-size 16]

Both read the same LSUN-style WebPs (256 px on the short side) from an LMDB. The reference is timed twice,
before and after our stage, and averaged, so that a change in machine load affects both sides alike. Our
figure is the wall time of the whole `preprocess()` call (actor start, reading, decoding, network, PNG
encoding, Parquet writing and publishing), not a steady-state rate. MFU = network FLOPs per second / the
measured fp32 matmul peak. Prints ``mfu: X`` and, last, ``speedup_vs_reference: X``.
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


def matmul_peak(threads: int) -> float:
    """Best fp32 matmul GFLOP/s over a few 2048² products."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
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


def reference(values: list[bytes], net: torch.nn.Module) -> float:
    """images/s of the reference procedure over ``values``."""
    t = time.perf_counter()
    with torch.no_grad():
        for v in values:
            img = Image.open(io.BytesIO(v)).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)
            x = torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1)[None]
            x = (x - 0.5) / 0.5
            y = net(x)[0, 0]
            out = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
            buf = io.BytesIO()
            Image.fromarray(out, "L").save(buf, format="PNG")
    return len(values) / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-ours", type=int, default=160)
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

    cores = node_cpus()
    torch.manual_seed(0)
    net = PhotoSketch(norm="per_image").eval().requires_grad_(False)
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        root = Path(tmp)
        weights = root / "photosketch-random.pth"
        torch.save(net.state_dict(), weights)
        source, values = make_source(root, max(args.n_ours, args.n_ref))
        peak = matmul_peak(cores)
        gflop = network_gflop(net)
        print(f"machine: {cores} cores, fp32 matmul peak {peak:.1f} GFLOP/s; PhotoSketch {gflop:.1f} GFLOP/image "
              f"at {SIZE} px", flush=True)

        torch.set_num_threads(cores)
        ref_a = reference(values[: args.n_ref], net)
        print(f"reference (before): {ref_a:.3f} images/s", flush=True)

        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        cfg = load_config(None, [
            f"data.source={json.dumps(source)}", f"data.dataset={json.dumps(str(root / 'out' / 'bench'))}",
            "data.category=bench", f"data.size={SIZE}", "data.sketcher=photosketch",
            f"data.sketcher_weights={json.dumps(str(weights))}", f"data.limit={args.n_ours}",
            f"data.batch_size={args.batch_size}", f"data.network_batch={args.network_batch}"])
        t = time.perf_counter()
        summary = preprocess(cfg)
        ours = args.n_ours / (time.perf_counter() - t)
        ray.shutdown()
        print(f"ours: {summary}", flush=True)

        torch.set_num_threads(cores)
        ref_b = reference(values[args.n_ref: 2 * args.n_ref] or values[: args.n_ref], net)
        print(f"reference (after): {ref_b:.3f} images/s", flush=True)
    ref = (ref_a + ref_b) / 2
    print(f"reference_images_per_s: {ref:.3f}")
    print(f"ours_images_per_s: {ours:.3f}")
    print(f"reference_mfu: {ref * gflop / peak:.3f}")
    print(f"mfu: {ours * gflop / peak:.3f}")
    print(f"speedup_vs_reference: {ours / ref:.3f}")


if __name__ == "__main__":
    main()
