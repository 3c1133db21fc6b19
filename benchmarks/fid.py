"""FID in memory (pipeline.eval.fid) against clean-fid, on the same generated images and feature extractor.

Two comparisons, one timed run of each side:

- headline, like for like: generated samples against the reference set's statistics computed beforehand (what
  the benchmark and training do). clean-fid's in-memory generator path (``cleanfid.fid.get_model_features``
  with a generator that hands out the pre-made images, then ``frechet_distance`` against the reference
  statistics) against ours (``extract_features`` on the arrays, then ``frechet_distance``); making the images
  and the reference statistics is not timed on either side;
- second figure: clean-fid's folder path as GANSketching runs it (write both sets as PNGs, then
  ``compute_fid(dir1, dir2, mode="clean", ...)``) against ours on both sets in memory.

    python benchmarks/fid.py [--n 500] [--size 256] [--extractor randconv|inception] [--workers 2]

Prints the FIDs, ``fid_abs_difference`` of each comparison and, last, ``speedup_vs_clean_fid_in_memory``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import EvalConfig  # noqa: E402
from pipeline.eval.features import build_extractor  # noqa: E402
from pipeline.eval.fid import fid_from_images  # noqa: E402
from pipeline.eval.resize import default_threads  # noqa: E402
from pipeline.models.sampling import to_uint8  # noqa: E402


def _generator(size: int, seed: int):
    """A seeded random-weight conv decoder z -> image in [-1, 1] (the images only need to be generated and
    alike for both paths; the model does not matter, so the benchmark needs no trained weights)."""
    gen = torch.Generator().manual_seed(seed)
    width = 16
    layers: list[torch.nn.Module] = [torch.nn.Unflatten(1, (width, 4, 4))]
    res = 4
    while res < size:
        layers += [torch.nn.Upsample(scale_factor=2, mode="bilinear"),
                   torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.LeakyReLU(0.2)]
        res *= 2
    layers += [torch.nn.Conv2d(width, 3, 3, padding=1), torch.nn.Tanh()]
    net = torch.nn.Sequential(torch.nn.Linear(64, width * 16), *layers).eval()
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
    return "conv decoder (random weights)", net, 64


def generate(n: int, size: int, net_seed: int, seed: int, batch: int = 50) -> tuple[str, np.ndarray]:
    name, g, zdim = _generator(size, net_seed)
    zgen = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for start in range(0, n, batch):
            out.append(to_uint8(g(torch.randn(min(batch, n - start), zdim, generator=zgen))))
    return name, np.concatenate(out)


def write_pngs(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=500, help="images per set (two sets)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--extractor", default="randconv", help="randconv | inception (needs the weights)")
    parser.add_argument("--workers", type=int, default=default_threads(),
                        help="clean-fid data loader workers (default: the CPUs available)")
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args()

    threads = default_threads()
    torch.set_num_threads(threads)
    t = time.perf_counter()
    # two different random networks, so that the sets differ and the FID is not near zero
    gen_name, fake = generate(args.n, args.size, net_seed=0, seed=1)
    _, real = generate(args.n, args.size, net_seed=1, seed=2)
    print(f"generator: {gen_name}; {args.n} + {args.n} images at {args.size}px "
          f"({time.perf_counter() - t:.1f} s, not timed)")
    extractor = build_extractor(EvalConfig(feature_extractor=args.extractor), device="cpu")
    print(f"extractor: {extractor.cache_id}; cpus: {threads}; clean-fid workers: {args.workers}")
    extractor(torch.zeros(2, 3, 299, 299))  # warm-up, shared by both paths

    t = time.perf_counter()
    ours = fid_from_images(fake, real, extractor, batch_size=args.batch_size)
    ours_s = time.perf_counter() - t
    print(f"ours_in_memory_seconds: {ours_s:.2f}")
    print(f"ours_fid: {ours:.6f}")

    from cleanfid import fid as cleanfid

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_pngs(Path(tmp) / "fake", fake)
        write_pngs(Path(tmp) / "real", real)
        png_s = time.perf_counter() - t
        ref = cleanfid.compute_fid(str(Path(tmp) / "fake"), str(Path(tmp) / "real"), mode="clean",
                                   custom_feat_extractor=extractor, device=torch.device("cpu"),
                                   num_workers=args.workers, batch_size=args.batch_size, verbose=False,
                                   use_dataparallel=False)
        clean_s = time.perf_counter() - t
    print(f"clean_fid_folder_seconds: {clean_s:.2f} "
          f"(PNG writes {png_s:.2f} + compute_fid {clean_s - png_s:.2f})")
    print(f"clean_fid_fid: {ref:.6f}")
    print(f"images_per_second_ours: {2 * args.n / ours_s:.1f}")
    print(f"images_per_second_clean_fid: {2 * args.n / clean_s:.1f}")
    print(f"fid_abs_difference_folder: {abs(ours - ref):.3g}")
    print(f"speedup_vs_clean_fid_folder: {clean_s / ours_s:.2f}")

    # the headline: generated samples against reference statistics made beforehand, in memory on both sides
    from pipeline.eval.fid import extract_features, feature_statistics, frechet_distance

    ref_mu, ref_sigma = feature_statistics(extract_features(real, extractor, args.batch_size))  # not timed
    batch = args.batch_size
    if args.n % batch:
        raise SystemExit(f"--n {args.n} must be a multiple of --batch-size {batch} (clean-fid generates whole batches)")
    chunks = iter([fake[i:i + batch] for i in range(0, args.n, batch)])

    def pre_made(z):  # clean-fid's generator contract: B x 3 x H x W in [0, 255]
        return torch.from_numpy(next(chunks)).permute(0, 3, 1, 2).float()

    t = time.perf_counter()
    feats = cleanfid.get_model_features(pre_made, extractor, mode="clean", z_dim=8, num_gen=args.n,
                                        batch_size=batch, device=torch.device("cpu"), verbose=False)
    mu, sigma = np.mean(feats, axis=0), np.cov(feats, rowvar=False)
    clean_mem = cleanfid.frechet_distance(mu, sigma, ref_mu, ref_sigma)
    clean_mem_s = time.perf_counter() - t
    t = time.perf_counter()
    ours_mu, ours_sigma = feature_statistics(extract_features(fake, extractor, batch))
    ours_mem = frechet_distance(ours_mu, ours_sigma, ref_mu, ref_sigma)
    ours_mem_s = time.perf_counter() - t
    print(f"clean_fid_in_memory_seconds: {clean_mem_s:.2f} ({args.n / clean_mem_s:.1f} images/s)")
    print(f"ours_against_cached_stats_seconds: {ours_mem_s:.2f} ({args.n / ours_mem_s:.1f} images/s)")
    print(f"clean_fid_in_memory_fid: {clean_mem:.6f}; ours: {ours_mem:.6f}")
    print(f"fid_abs_difference_in_memory: {abs(ours_mem - clean_mem):.3g}")
    print(f"speedup_vs_clean_fid_in_memory: {clean_mem_s / ours_mem_s:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
