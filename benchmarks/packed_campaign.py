"""A campaign of 8 customisations of one base: packed into one training step against separate runs, in one run.

Both sides train the same sketch sets for the same iterations through `sketchgan train`'s code
(`pipeline.train.raytrain.train_all`) at `configs/tiny.yaml` (32 px, real images at λ_image 0.7, a random base):

- separate: ``train.pack=1``: one Ray Train run per set, ``train.max_concurrent_runs`` (4) launched at once,
  each worker holding one CPU, so one run per CPU trains and the others wait (``--separate-at-once N`` gives each
  worker CPUs / N so that N train at once);
- packed: ``train.pack`` from ``auto`` (4 on a CPU; ``--pack K``): one Ray Train run per group of K sets, all
  groups at once, the CPUs shared equally among their workers.

Each side runs in a fresh Python process that starts its own local Ray instance. Its wall time is `train_all`'s
(Ray's own start, the same for both, left out). Its memory is that process and every process below it (Ray's GCS,
raylet, dashboard, Ray Train's controllers and workers), sampled every half second as the sum of their
proportional set sizes (PSS: a page shared by n processes counts 1/n in each, so shared libraries count once),
the peak kept. Prints `packed_speedup` (wall time, separate / packed) and `packed_memory_ratio` (peak memory,
packed / separate), the ratio last.

    python benchmarks/packed_campaign.py [--sets 8] [--iterations 200] [--batch 8] [--images 512] [--pack K]
        [--separate-at-once N] [--cpus N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
SHAPES = ("triangle", "circle", "square")


def make_world(root: Path, args) -> object:
    """Data, ``--sets`` sketch sets (4 sketches each, of one shape, no two alike) and a random base."""
    import torch

    from pipeline.config import load_config, updated
    from pipeline.data import synthetic
    from pipeline.data.preprocess import preprocess
    from pipeline.data.sketchsets import create_sketch_set
    from pipeline.models import factory
    from pipeline.models.checkpoints import save_state_dict

    labels = synthetic.write_shapes_lmdb(str(root / "lsun" / "shapes"), n=args.images, size=32, seed=0)
    names = [f"set{i}" for i in range(args.sets)]
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"storage.root={root}", f"data.source={root / 'lsun' / 'shapes'}",
        f"train.iterations={args.iterations}", "train.log_every=20", f"train.batch_size={args.batch}",
        f"train.checkpoint_every={args.iterations // 2}", f"train.sample_every={args.iterations // 2}",
        "train.sketch_sets=[" + ", ".join(f"{{name: {n}}}" for n in names) + "]"])
    preprocess(cfg)
    for i, name in enumerate(names):
        of_shape = [k for k, v in labels.items() if v == SHAPES[i % len(SHAPES)]]
        ids = root / f"{name}.txt"
        ids.write_text("\n".join(of_shape[4 * (i // 3):4 * (i // 3) + 4]) + "\n")
        create_sketch_set(cfg, name, from_ids=str(ids))
    arch = factory.generator_kwargs(cfg.model)
    torch.manual_seed(0)
    save_state_dict(factory.build_generator(arch), root / "base" / "G.pth")
    save_state_dict(factory.build_discriminator(arch), root / "base" / "D.pth")
    return updated(cfg, {"model.base_g": str(root / "base" / "G.pth"), "model.base_d": str(root / "base" / "D.pth")})


def side_settings(side: str, sets: int, cpus: int, pack: int, separate_at_once: int) -> dict:
    """Separate: ``train.pack=1``, ``max_concurrent_runs`` 4 (the default) with each worker holding
    ``cpus / separate_at_once`` CPUs, so that this many runs train at once (the default, one CPU each, lets as many
    run as there are CPUs; the others wait, their Ray Train controllers already started). Packed: groups of
    ``pack`` sets, all at once, the CPUs shared equally among them."""
    if side == "separate":
        return {"train.pack": 1, "train.max_concurrent_runs": 4, "train.cpus_per_worker": cpus / separate_at_once,
                "train.run_prefix": "separate"}
    groups = math.ceil(sets / pack)
    return {"train.pack": pack, "train.max_concurrent_runs": groups, "train.cpus_per_worker": cpus / groups,
            "train.run_prefix": "packed"}


def child(cfg_file: str, side: str, cpus: int, pack: int, separate_at_once: int) -> None:
    """One side in this (fresh) process: its own local Ray instance, then `train_all`."""
    import ray

    from pipeline.config import Config, updated
    from pipeline.layout import read_metrics
    from pipeline.raysession import local_instance_settings
    from pipeline.train.raytrain import train_all

    cfg = Config.model_validate_json(Path(cfg_file).read_text())
    cfg = updated(cfg, side_settings(side, len(cfg.train.sketch_sets), cpus, pack, separate_at_once))
    local_instance_settings()  # as `sketchgan train` starts its local Ray (pipeline.raysession.ensure_ray)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        t0 = time.perf_counter()
        summaries = train_all(cfg)
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    rates = [read_metrics(s["run_uri"])[-1]["it_per_s"] for s in summaries]
    print(json.dumps({"seconds": seconds, "runs": len(summaries), "it_per_s": rates}), flush=True)


class PeakMemory:
    """The peak over time of the summed PSS of a process and all its descendants, sampled in a background thread
    (`pipeline.progress.Poller`)."""

    def __init__(self, pid: int, every: float = 0.5):
        import psutil

        from pipeline.progress import Poller

        self.root, self.peak, self.peak_processes = psutil.Process(pid), 0, 0
        self.breakdown: dict[str, int] = {}  # at the peak: PSS by kind of process
        self._poller = Poller(self._sample, every=every)

    def _sample(self) -> None:
        import psutil

        total, n, kinds = 0, 0, {}
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                pss = p.memory_full_info().pss
                kind = _kind(p.name(), " ".join(p.cmdline()[:3]))
                total, n, kinds[kind] = total + pss, n + 1, kinds.get(kind, 0) + pss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass  # a process that ended between the listing and the reading
        if total > self.peak:
            self.peak, self.peak_processes, self.breakdown = total, n, kinds

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._poller.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._poller.__exit__(*exc)


def _kind(name: str, cmdline: str) -> str:
    """Ray's processes by their title (workers name themselves ``ray::<actor>``), others by executable."""
    if name.startswith("ray::") or cmdline.startswith("ray::"):
        return (name if name.startswith("ray::") else cmdline.split()[0]).split(".")[0]
    return name


def run_side(cfg_file: Path, side: str, args, pack: int) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(cfg_file), side, "--cpus", str(args.cpus),
                             "--pack", str(pack), "--separate-at-once", str(args.separate_at_once)],
                            stdout=subprocess.PIPE, text=True)
    with PeakMemory(proc.pid) as memory:
        out, _ = proc.communicate()
    lines = out.rstrip().splitlines()
    if proc.returncode != 0 or not lines:
        print(out, end="", flush=True)
        raise SystemExit(f"the {side} side failed (exit {proc.returncode}); its output is above")
    result = json.loads(lines[-1])
    result.update(peak_bytes=memory.peak, peak_processes=memory.peak_processes)
    print(f"{side}: {result['runs']} runs in {result['seconds']:.1f}s (each run's last interval: "
          f"{', '.join(f'{r:.2f}' for r in result['it_per_s'])} it/s); peak memory {memory.peak / 2**30:.2f} GiB "
          f"over {memory.peak_processes} processes:", flush=True)
    for kind, pss in sorted(memory.breakdown.items(), key=lambda kv: -kv[1]):
        print(f"    {kind}: {pss / 2**20:.0f} MiB", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of each side's Ray instance")
    ap.add_argument("--pack", type=int, default=0, help="sets per packed group (default: train.pack=auto's)")
    ap.add_argument("--separate-at-once", type=int, default=0,
                    help="separate runs training at once (default: one per CPU, as train.cpus_per_worker=1 does)")
    ap.add_argument("--child", nargs=2, metavar=("CONFIG_JSON", "SIDE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, args.cpus, args.pack, args.separate_at_once)
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    from pipeline.train import plan as planning

    with tempfile.TemporaryDirectory(prefix="packed-campaign-") as tmp:
        root = Path(tmp)
        import ray

        ray.init(address="local", num_cpus=max(2, args.cpus), include_dashboard=False, log_to_driver=False)
        try:
            cfg = make_world(root, args)
        finally:
            ray.shutdown()
        cfg_file = root / "config.json"
        cfg_file.write_text(cfg.model_dump_json())
        pack = args.pack or planning.pack_size(cfg)
        args.separate_at_once = args.separate_at_once or args.cpus
        separate = run_side(cfg_file, "separate", args, pack)
        packed = run_side(cfg_file, "packed", args, pack)
    print(f"config: configs/tiny.yaml, 32 px, {args.sets} sketch sets, {args.iterations} iterations at batch "
          f"{args.batch}, {args.images} real images, {args.cpus} CPUs; separate: {args.separate_at_once} runs at "
          f"once; packed: groups of {pack}")
    print(f"packed_speedup: {separate['seconds'] / packed['seconds']:.2f}")
    print(f"packed_memory_ratio: {packed['peak_bytes'] / separate['peak_bytes']:.3f}")


if __name__ == "__main__":
    main()
