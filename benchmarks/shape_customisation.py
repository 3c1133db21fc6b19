"""Shape customisation at toy scale: do a few sketches move a pretrained GAN's shape distribution?

    .venv/bin/python benchmarks/shape_customisation.py [--target circle|square|triangle] [--parallel N]

The "shapes" category (`pipeline.data.synthetic`, configs/shapes.yaml): one object per 32 px image, circle,
square or triangle in equal shares, random colours, sizes, positions and rotations, on flat or gradient
backgrounds. Steps (each prints a progress line; everything lives below the config's storage root):

1. the preprocessed dataset (generated and run through `sketchgan preprocess` when missing);
2. the base StyleGAN2 of ``benchmarks/assets/shapes_base`` (made with `sketchgan pretrain` when missing:
   see benchmarks/README.md for the command and how long it takes);
3. a small shape classifier (`pipeline.eval.shape_classifier`) trained on freshly rendered real images and
   checked on held-out ones; its penultimate features are the FID feature space;
4. a sketch set of 30 `edges` sketches of real images of the target shape (`sketchgan sketchset create`);
5. three customisations through `sketchgan train`: the GANSketching objective (translation augmentation,
   λ_image 0.7), and the paper's ablations λ_image = 0 and no augmentation;
6. for the base and every customised model, on the same seeds: the share of samples classified as the
   target shape, FID (classifier features) against real images of the target shape and against real
   images of all shapes. Sample grids go to ``<root>/benchmarks/shape-customisation/<target>/``.

It prints ``fid_target_ratio: X`` (customised / base FID against the target shape) and, last,
``target_fraction: X`` (customised). Ray is started here with ``--parallel`` logical CPUs (default: one per
variant): the customisations train side by side, one thread each, and the OS shares the machine's cores
between them (three variants on two cores keep both busy to the end).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import layout, storage  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.data.synthetic import SHAPES, generate_shape_images, read_labels, write_shapes_lmdb  # noqa: E402

CONFIG = REPO / "configs" / "shapes.yaml"
BASE_DIR = REPO / "benchmarks" / "assets" / "shapes_base"
BACKGROUNDS = ("flat", "gradient")  # the benchmark's background kinds (see README: why not all four)
N_DATASET = 12_000  # real images the base is pretrained on and GANSketching's image discriminator sees
DATASET_SEED = 0
CLS_TRAIN, CLS_TRAIN_SEED = 6_000, 101  # classifier training images
CLS_TEST, CLS_TEST_SEED = 1_500, 102  # held-out classifier images
N_REF, REF_SEED = 3_000, 103  # real reference images for FID (N_REF / K of each shape)
N_SKETCHES = 30
SAMPLE_SEED = 2024  # latents of the evaluated samples: the same for every model
VARIANTS = {  # name -> `sketchgan train` overrides (on top of configs/shapes.yaml's train section)
    "gansketching": [],
    "lambda_image_0": ["train.lambda_image=0"],
    "no_augment": ["train.augment="],
}

T0 = time.time()


def say(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def cli(args: list[str]) -> None:
    """One `sketchgan` command, run in this process (Ray, once started, is shared by the commands)."""
    from pipeline.cli import main

    rc = main(args)
    if rc:
        raise SystemExit(f"sketchgan {' '.join(args)} failed with exit code {rc}")


def common_args(cfg_path: Path, root: str) -> list[str]:
    return ["--config", str(cfg_path), "--set", f"storage.root={root}"]


# -- inputs -------------------------------------------------------------------------------------------------
def ensure_dataset(cfg: Config, cfg_path: Path) -> tuple[str, dict[str, str]]:
    """The preprocessed dataset and the {source key: shape} labels of its images."""
    lmdb_dir = storage.join(layout.synthetic_uri(cfg), cfg.data.category)
    dataset = layout.dataset_uri(cfg)
    if not storage.exists(storage.join(lmdb_dir, "labels.json")):
        say(f"writing {N_DATASET} shape images to {lmdb_dir}")
        write_shapes_lmdb(lmdb_dir, N_DATASET, size=cfg.data.size, seed=DATASET_SEED, name=cfg.data.category,
                          backgrounds=BACKGROUNDS)
    if not storage.exists(layout.manifest_uri(dataset)):
        say(f"preprocessing {lmdb_dir} -> {dataset} (edges sketcher)")
        cli(["preprocess", *common_args(cfg_path, cfg.storage.root), "--source", lmdb_dir])
    return dataset, read_labels(lmdb_dir)


def ensure_base(cfg: Config, cfg_path: Path, base_dir: Path) -> tuple[str, str]:
    """The committed base (G.pth, D.pth); pretrained with `sketchgan pretrain` and copied there when missing."""
    g, d, m = base_dir / layout.G_FILE, base_dir / layout.D_FILE, base_dir / layout.FINAL_METADATA
    if g.is_file() and d.is_file():
        meta = json.loads(m.read_text()) if m.is_file() else {}
        say(f"base model: {base_dir} ({meta.get('iterations', '?')} pretraining iterations)")
        return str(g), str(d)
    say(f"no base model at {base_dir}: pretraining one with `sketchgan pretrain` "
        f"({cfg.pretrain.iterations} iterations; about 20 minutes on one idle core, see benchmarks/README.md)")
    t = time.time()
    cli(["pretrain", *common_args(cfg_path, cfg.storage.root)])
    run = layout.run_uri(cfg, cfg.pretrain.run_name)
    base_dir.mkdir(parents=True, exist_ok=True)
    for name in (layout.G_FILE, layout.D_FILE, layout.FINAL_METADATA):
        shutil.copyfile(layout.final_uri(run, name), base_dir / name)
    say(f"pretrained the base in {time.time() - t:.0f}s -> {base_dir}")
    return str(g), str(d)


def dataset_keys(dataset: str) -> set[str]:
    """The source keys (LMDB keys) of the images the preprocessed dataset holds."""
    return set(storage.read_parquet(layout.pairs_uri(dataset), ["source_key"]).column("source_key").to_pylist())


def make_sketch_set(cfg: Config, cfg_path: Path, dataset: str, labels: dict[str, str], target: str) -> str:
    """30 sketches (the dataset's own `edges` sketches) of real images of ``target``, the first by key."""
    present = dataset_keys(dataset)
    ids = sorted(k for k, v in labels.items() if v == target and k in present)[:N_SKETCHES]
    if len(ids) < N_SKETCHES:
        raise SystemExit(f"only {len(ids)} images of {target!r} in the dataset")
    name = f"{target}-{N_SKETCHES}"
    ids_uri = storage.join(cfg.storage.root, "benchmarks", "shape-customisation", f"{name}.ids")
    storage.write_text(ids_uri, "\n".join(ids) + "\n")
    cli(["sketchset", "create", *common_args(cfg_path, cfg.storage.root), "--name", name, "--from-ids", ids_uri,
         "--dataset", dataset])
    return name


def customise(cfg: Config, cfg_path: Path, variant: str, sketch_set: str, base_g: str, base_d: str,
              iterations: int | None, extra: list[str]) -> str:
    """One GANSketching run through `sketchgan train`; an earlier run of the same name is replaced."""
    prefix = f"bench-{variant.replace('_', '-')}"
    run = f"{prefix}-{sketch_set}"
    run_uri = layout.run_uri(cfg, run)
    if storage.exists(run_uri):
        shutil.rmtree(run_uri)  # measure (and report) a fresh run every time
    overrides = [f"model.base_g={base_g}", f"model.base_d={base_d}", f"train.run_prefix={prefix}",
                 f"train.sketch_sets=[{{name: {sketch_set}}}]", "train.cpus_per_worker=1",
                 *([f"train.iterations={iterations}"] if iterations else []), *extra, *VARIANTS[variant]]
    args = ["train", *common_args(cfg_path, cfg.storage.root)]
    for o in overrides:
        args += ["--set", o]
    cli(args)
    return layout.final_uri(run_uri, layout.G_FILE)


# -- evaluation ---------------------------------------------------------------------------------------------
def generate(cfg: Config, g_path: str, n: int, batch: int = 100) -> np.ndarray:
    """n uint8 samples from fixed latents (the same for every model) with fixed noise."""
    import torch

    from pipeline.models import factory
    from pipeline.models.sampling import to_uint8

    G = factory.load_generator(g_path, factory.generator_kwargs(cfg.model), "cpu")
    z = torch.randn(n, cfg.model.style_dim, generator=torch.Generator().manual_seed(SAMPLE_SEED))
    with torch.no_grad():
        return np.concatenate([to_uint8(G([z[i:i + batch]], randomize_noise=False)[0]) for i in range(0, n, batch)])


def grid(images: np.ndarray, path: str, nrow: int = 8, scale: int = 3) -> None:
    from PIL import Image

    n = (len(images) // nrow) * nrow
    s = images.shape[1]
    g = images[:n].reshape(n // nrow, nrow, s, s, 3).transpose(0, 2, 1, 3, 4).reshape(n // nrow * s, nrow * s, 3)
    im = Image.fromarray(g)
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def evaluate(name: str, images: np.ndarray, classifier, extractor, ref_target, ref_all, target: str) -> dict:
    from pipeline.eval.fid import extract_features, fid_from_features
    from pipeline.eval.shape_classifier import predict_proba

    proba = predict_proba(classifier, images)
    pred = proba.argmax(1)
    shares = {c: float(np.mean(pred == i)) for i, c in enumerate(classifier.classes)}
    feats = extract_features(images, extractor, batch_size=250)
    return {"model": name, "n": len(images), "target_fraction": shares[target],
            "shares": shares, "mean_confidence": float(proba.max(1).mean()),
            "fid_target": fid_from_features(feats, ref_target), "fid_all": fid_from_features(feats, ref_all)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="circle", choices=SHAPES, help="the shape the sketches show")
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--root", help="storage root (default: the config's)")
    p.add_argument("--iterations", type=int, help="customisation iterations (default: the config's train.iterations)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--n-samples", type=int, default=1000, help="samples per model")
    p.add_argument("--base", default=str(BASE_DIR), help="folder of the base G.pth, D.pth (made when missing)")
    p.add_argument("--classifier-epochs", type=int, default=3)
    p.add_argument("--parallel", type=int,
                   help="`sketchgan train` runs at once, one thread each (default: every variant at once; the OS "
                        "shares the cores between them, which keeps both of two cores busy with three variants)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="train.KEY=VALUE",
                   help="extra override for every `sketchgan train` run (repeatable)")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown} (known: {', '.join(VARIANTS)})")

    cfg_path = Path(args.config)
    cfg = load_config(cfg_path, [f"storage.root={args.root}"] if args.root else [])
    root = str(Path(cfg.storage.root).resolve()) if not storage.is_s3(cfg.storage.root) else cfg.storage.root
    cfg = load_config(cfg_path, [f"storage.root={root}"])
    out_dir = Path(root) / "benchmarks" / "shape-customisation" / args.target

    import ray
    import torch

    torch.set_num_threads(1)
    from pipeline.raysession import PACKAGE_ROOT, local_instance_settings

    local_instance_settings()  # Ray's default niceness 15 lets any other busy process starve training

    parallel = max(1, min(args.parallel or len(variants), len(variants)))
    ray.init(num_cpus=parallel, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": PACKAGE_ROOT}},
             log_to_driver=False)
    say(f"target shape: {args.target}; shapes {', '.join(SHAPES)}; backgrounds {', '.join(BACKGROUNDS)}; "
        f"storage root {root}")

    dataset, labels = ensure_dataset(cfg, cfg_path)
    base_g, base_d = ensure_base(cfg, cfg_path, Path(args.base))

    from pipeline.eval.shape_classifier import ShapeFeatureExtractor, accuracy, save_classifier, train_classifier

    say(f"rendering {CLS_TRAIN} + {CLS_TEST} classifier images and {N_REF} FID reference images")
    x_tr, y_tr = generate_shape_images(CLS_TRAIN, cfg.data.size, CLS_TRAIN_SEED, SHAPES, BACKGROUNDS)
    x_te, y_te = generate_shape_images(CLS_TEST, cfg.data.size, CLS_TEST_SEED, SHAPES, BACKGROUNDS)
    x_ref, y_ref = generate_shape_images(N_REF, cfg.data.size, REF_SEED, SHAPES, BACKGROUNDS)
    trained = train_classifier(x_tr, y_tr, SHAPES, epochs=args.classifier_epochs, progress=True)
    classifier = trained.classifier
    held_out = accuracy(classifier, x_te, y_te)
    save_classifier(classifier, str(out_dir / "shape-classifier.pt"))
    say(f"shape classifier: held-out accuracy {held_out:.4f} on {CLS_TEST} images "
        f"(trained in {trained.seconds:.0f}s)")
    if held_out < 0.95:
        say("WARNING: held-out accuracy below 0.95: the shares below are not trustworthy")

    from pipeline.eval.fid import extract_features

    extractor = ShapeFeatureExtractor(classifier, resize_threads=1)
    ref_all = extract_features(x_ref, extractor, batch_size=250)
    ref_target = ref_all[np.array([y == args.target for y in y_ref])]
    grid(x_ref[:64], str(out_dir / "real.png"))

    sketch_set = make_sketch_set(cfg, cfg_path, dataset, labels, args.target)
    from pipeline.data.sketchsets import load_sketch_set

    _, sketches = load_sketch_set(layout.sketchset_uri(cfg, sketch_set))
    grid(np.repeat(sketches[:24, :, :, None], 3, axis=3), str(out_dir / "sketches.png"), nrow=8)
    say(f"sketch set {sketch_set}: {len(sketches)} edges sketches of real {args.target}s")

    rows = []
    base_images = generate(cfg, base_g, args.n_samples)
    grid(base_images[:64], str(out_dir / "base.png"))
    rows.append(evaluate("base", base_images, classifier, extractor, ref_target, ref_all, args.target))
    say(f"base: target fraction {rows[-1]['target_fraction']:.3f}, FID to {args.target}s "
        f"{rows[-1]['fid_target']:.2f}, FID to all {rows[-1]['fid_all']:.2f}")

    # The customisations run side by side (one thread each, `parallel` at a time); sampling and scoring follow.
    seconds, g_paths = {}, {}

    def run_variant(variant: str) -> None:
        t = time.time()
        say(f"customising ({variant}) with `sketchgan train` ...")
        g_paths[variant] = customise(cfg, cfg_path, variant, sketch_set, base_g, base_d, args.iterations,
                                     args.overrides)
        seconds[variant] = time.time() - t
        say(f"{variant}: trained in {seconds[variant]:.0f}s")

    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="variant") as pool:
        for fut in [pool.submit(run_variant, v) for v in variants]:
            fut.result()
    for variant in variants:
        images = generate(cfg, g_paths[variant], args.n_samples)
        grid(images[:64], str(out_dir / f"{variant}.png"))
        rows.append(evaluate(variant, images, classifier, extractor, ref_target, ref_all, args.target))
        r = rows[-1]
        say(f"{variant}: target fraction {r['target_fraction']:.3f}, FID to {args.target}s {r['fid_target']:.2f}, "
            f"FID to all {r['fid_all']:.2f}")

    base = rows[0]
    print()
    print(f"shape customisation, target {args.target}: {args.n_samples} samples per model, classifier held-out "
          f"accuracy {held_out:.4f}, FID in the classifier's {classifier.feature_dim}-d penultimate features")
    print("| model | " + " | ".join(f"share {c}" for c in SHAPES) +
          f" | FID to real {args.target}s | FID to all real | ratio to base (target) |")
    print("| --- " * (len(SHAPES) + 4) + "|")
    for r in rows:
        print(f"| {r['model']} | " + " | ".join(f"{r['shares'][c]:.3f}" for c in SHAPES) +
              f" | {r['fid_target']:.2f} | {r['fid_all']:.2f} | {r['fid_target'] / base['fid_target']:.3f} |")
    results = {"target": args.target, "held_out_accuracy": held_out, "rows": rows,
               "train_seconds": seconds, "total_seconds": time.time() - T0}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(f"grids and results: {out_dir}")
    print(f"run_time_s: {time.time() - T0:.0f}")
    for r in rows[2:]:
        print(f"ablation_{r['model']}: target_fraction {r['target_fraction']:.3f} "
              f"fid_target_ratio {r['fid_target'] / base['fid_target']:.3f}")
    print(f"base_target_fraction: {base['target_fraction']:.3f}")
    if len(rows) > 1:
        main_row = rows[1]
        print(f"fid_target_ratio: {main_row['fid_target'] / base['fid_target']:.3f}")
        print(f"target_fraction: {main_row['target_fraction']:.3f}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
