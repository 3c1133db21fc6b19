"""The GANSketching step rate inside Ray Train beside the bare loop, at the same config, in one run.

Both sides run the same per-worker loop (`pipeline.train.loop.run_worker`) on the same inputs: a dataset
preprocessed from ``--images`` generated shapes, a sketch set of triangles and a random base G/D at
`configs/tiny.yaml` (32 px). With the defaults an epoch is 128 steps (1,024 images at batch 8), so a run of
300 iterations crosses two epoch boundaries, where the Ray Data shard starts a new epoch. The bare side calls
the loop in a fresh Python process with images read straight from the Parquet files with pyarrow and no Ray
anywhere; the Ray Train side is `sketchgan train` (a `TorchTrainer` with one worker holding every CPU, images
from a Ray Data shard), whose worker is a fresh process too. Each run's rate is the median of its logged
intervals' iterations/s, the first interval (warm-up) left out.

The machine's speed drifts by ±15 % within minutes, so the sides alternate, bare first and last (bare, Ray,
bare, ... for ``--repeats`` Ray runs), each Ray run is divided by the mean of the two bare runs around it, and
the figure is the median of those pair ratios. Each run also prints how long the loop waited for images and
how many cores its process used (the `data_wait_frac` and `cpu_cores` metrics). Prints
`ray_train_relative_speed:` (Ray Train over bare) last.

    python benchmarks/ray_overhead.py [--iterations 300] [--log-every 20] [--batch 8] [--images 1024] [--cpus N]
        [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]


def make_world(root: Path, cpus: int, args) -> object:
    """Data, a sketch set and a random base in the stage contracts; returns the training config."""
    import torch

    from pipeline.config import load_config
    from pipeline.data import synthetic
    from pipeline.data.preprocess import preprocess
    from pipeline.data.sketchsets import create_sketch_set
    from pipeline.models import factory
    from pipeline.models.checkpoints import save_state_dict

    labels = synthetic.write_shapes_lmdb(str(root / "lsun" / "shapes"), n=args.images, size=32, seed=0)
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"storage.root={root}", f"data.source={root / 'lsun' / 'shapes'}",
        f"train.iterations={args.iterations}", f"train.log_every={args.log_every}",
        f"train.batch_size={args.batch}", f"train.checkpoint_every={args.iterations}",
        f"train.sample_every={args.iterations}", f"train.cpus_per_worker={cpus}",
        "train.sketch_sets=[{name: triangles}]"])
    preprocess(cfg)
    ids = root / "triangles.txt"
    ids.write_text("\n".join([k for k, v in labels.items() if v == "triangle"][:8]) + "\n")
    create_sketch_set(cfg, "triangles", from_ids=str(ids))
    arch = factory.generator_kwargs(cfg.model)
    torch.manual_seed(0)
    save_state_dict(factory.build_generator(arch), root / "base" / "G.pth")
    save_state_dict(factory.build_discriminator(arch), root / "base" / "D.pth")
    from pipeline.config import updated

    return updated(cfg, {"model.base_g": str(root / "base" / "G.pth"), "model.base_d": str(root / "base" / "D.pth")})


def interval_rates(run_uri: str) -> list[float]:
    """Each logged interval's iterations/s; prints the median input wait and cores used after warm-up."""
    from pipeline.layout import read_metrics

    rows = read_metrics(run_uri)
    waits = [r.get("data_wait_frac", 0.0) for r in rows[1:]] or [0.0]
    cores = [r.get("cpu_cores", 0.0) for r in rows[1:]] or [0.0]
    print(f"  {run_uri.rsplit('/', 1)[-1]}: waiting for images {statistics.median(waits):.1%} of the time, "
          f"{statistics.median(cores):.2f} cores busy in the training process", flush=True)
    return [r["it_per_s"] for r in rows]


def run_bare(cfg, threads: int, name: str) -> tuple[float, list[float]]:
    """The loop in this process: images read from the Parquet files with pyarrow, no Ray anywhere."""
    import pyarrow.dataset as pads
    import torch

    from pipeline import layout, storage
    from pipeline.train import plan as planning
    from pipeline.train.loop import run_worker
    from pipeline.train.streams import decode_png_batch

    torch.set_num_threads(threads)
    plan = planning.plan_train_run(cfg, cfg.train.sketch_sets[0], run_name=f"{name}-triangles",
                                   base_g_sha=planning.check_base_checkpoints(cfg))
    fs, path = storage.filesystem(layout.pairs_uri(plan.dataset_uri))
    dataset = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
    batch = cfg.train.batch_size

    def make_epoch(epoch: int):
        for rb in dataset.to_batches(columns=["image"], batch_size=batch):
            images = rb.column("image").to_numpy(zero_copy_only=False)
            for start in range(0, len(images) - batch + 1, batch):  # drop_last, as the Ray Data shard does
                yield {"image": images[start:start + batch]}

    sketches = decode_png_batch(plan.sketch_set.blobs, 1, cfg.model.size)
    t0 = time.perf_counter()
    run_worker(plan.spec, make_epoch, sketches)
    return time.perf_counter() - t0, interval_rates(plan.spec.run_uri)


def run_bare_in_child(cfg_file: Path, threads: int, name: str) -> tuple[float, list[float]]:
    """`run_bare` in a fresh Python process (config from ``cfg_file``), as Ray Train's worker is one: no state
    (thread pools, Ray's client threads) carried over from earlier runs in this process."""
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--bare-child", str(cfg_file), name, "--cpus", str(threads)],
                         stdout=subprocess.PIPE, text=True)
    lines = out.stdout.rstrip().splitlines()
    if out.returncode != 0 or not lines:
        print(out.stdout, end="", flush=True)
        raise SystemExit(f"bare run {name} failed (exit {out.returncode}); its output is above")
    print("\n".join(lines[:-1]), flush=True)
    parsed = json.loads(lines[-1])
    return parsed["seconds"], parsed["rates"]


def bare_child(cfg_file: str, name: str, threads: int) -> None:
    from pipeline.config import Config

    cfg = Config.model_validate_json(Path(cfg_file).read_text())
    seconds, rates = run_bare(cfg, threads, name)
    print(json.dumps({"seconds": seconds, "rates": rates}), flush=True)


def run_ray_train(cfg, cpus: int, prefix: str) -> tuple[float, list[float]]:
    import ray

    from pipeline.config import updated
    from pipeline.raysession import local_instance_settings
    from pipeline.train.raytrain import train_all

    local_instance_settings()  # as `sketchgan train` starts its local Ray (pipeline.raysession.ensure_ray)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        t0 = time.perf_counter()
        [summary] = train_all(updated(cfg, {"train.run_prefix": prefix}))
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return seconds, interval_rates(summary["run_uri"])


def steady(rates: list[float]) -> float:
    if len(rates) < 2:
        raise SystemExit("need at least two logged intervals: raise --iterations or lower --log-every")
    return statistics.median(rates[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--images", type=int, default=1024,
                    help="real images in the dataset (an epoch is images / batch steps)")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs for each side (Ray worker too)")
    ap.add_argument("--repeats", type=int, default=5, help="Ray Train runs (bare runs: one more)")
    ap.add_argument("--bare-child", nargs=2, metavar=("CONFIG_JSON", "NAME"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_child:
        bare_child(*args.bare_child, args.cpus)
        return
    from pipeline.raysession import WORKER_NICENESS_ENV

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    bare, in_ray = [], []
    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as tmp:
        root = Path(tmp)
        import ray

        # the inputs are made with at least 2 logical CPUs: preprocessing needs one beside its sketch actor
        ray.init(address="local", num_cpus=max(2, args.cpus), include_dashboard=False, log_to_driver=False)
        try:
            cfg = make_world(root, args.cpus, args)
        finally:
            ray.shutdown()
        cfg_file = root / "config.json"  # what each bare child trains on
        cfg_file.write_text(cfg.model_dump_json())
        for i in range(args.repeats + 1):
            seconds, rates = run_bare_in_child(cfg_file, args.cpus, f"bare{i}")
            bare.append(steady(rates))
            print(f"bare loop, run {i + 1}: {bare[-1]:.3f} it/s (median of {rates}); {seconds:.1f}s", flush=True)
            if i == args.repeats:
                break
            seconds, rates = run_ray_train(cfg, args.cpus, f"ray{i}")
            in_ray.append(steady(rates))
            print(f"Ray Train, run {i + 1}: {in_ray[-1]:.3f} it/s (median of {rates}); {seconds:.1f}s with Ray "
                  "Train's start", flush=True)
    print(f"config: configs/tiny.yaml, 32 px, batch {args.batch}, {args.images} real images, "
          f"{args.iterations} iterations, logged every "
          f"{args.log_every}, {args.cpus} CPUs per side, worker niceness "
          f"{os.environ.get(WORKER_NICENESS_ENV, 'Ray default (15)')}")
    pairs = []
    for i, r in enumerate(in_ray):
        pairs.append(r / ((bare[i] + bare[i + 1]) / 2))
        print(f"run {i + 1}: Ray Train / mean of the bare runs before and after: {pairs[-1]:.3f}")
    print(f"bare_loop_it_per_s: {statistics.median(bare):.3f}")
    print(f"ray_train_it_per_s: {statistics.median(in_ray):.3f}")
    print(f"pair ratios: min {min(pairs):.3f}, max {max(pairs):.3f}")
    print(f"ray_train_relative_speed: {statistics.median(pairs):.3f}")


if __name__ == "__main__":
    main()
