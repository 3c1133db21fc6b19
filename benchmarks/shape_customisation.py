"""Shape customisation at toy scale: do a few sketches move a pretrained GAN's shape distribution, in minutes?

    .venv/bin/python benchmarks/shape_customisation.py [--targets circle,square,triangle] [--seeds 0,1,2]

The "shapes" category (`pipeline.data.synthetic`, configs/shapes.yaml): one object per 32 px image, circle,
square or triangle in equal shares, random colours, sizes, positions and rotations, on flat or gradient
backgrounds. Steps (each prints a progress line; everything lives below the config's storage root):

1. the preprocessed dataset (generated and run through `sketchgan preprocess` when missing);
2. the base StyleGAN2 of ``benchmarks/assets/shapes_base`` (made with `sketchgan pretrain` when missing:
   see benchmarks/README.md for the command and how long it takes);
3. the shape classifier of ``benchmarks/assets/shape_classifier`` (`pipeline.eval.shape_classifier`; trained
   on freshly rendered real images when missing), checked on held-out ones: below 95 % accuracy the benchmark
   stops. Its penultimate features are the FID feature space;
4. per target shape, a sketch set of 30 `edges` sketches of real images of that shape (`sketchgan sketchset
   create`);
5. per target, variant and seed, one customisation through `sketchgan train`, one at a time with the machine's
   cores (``--cpus``), timed: the GANSketching objective (translation augmentation, λ_image 0.7), and on
   request the paper's ablations λ_image = 0 and no augmentation;
6. for the base and every customised model, on the same latents: the share of samples classified as the
   target shape, FID (classifier features) against real images of the target shape and against real images of
   all shapes, and the samples' contrast against real images of the target shape (below
   ``MIN_CONTRAST_RATIO`` a run is reported FADED: flat or washed-out samples fool the other two). Sample
   grids go to ``<root>/benchmarks/shape-customisation/<target>/``.

Headlines (GANSketching runs only): ``max_train_seconds`` (the longest `sketchgan train` call),
``worst_contrast_ratio`` and ``faded_runs`` (read the last two with them), ``worst_target_fraction`` (lowest
share of the target shape) and, last, ``worst_fid_target_ratio`` (highest customised / base FID against the
target shape), over every target and seed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import layout, storage  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.data.synthetic import SHAPES, generate_shape_images, read_labels, write_shapes_lmdb  # noqa: E402

CONFIG = REPO / "configs" / "shapes.yaml"
BASE_DIR = REPO / "benchmarks" / "assets" / "shapes_base"
CLASSIFIER = REPO / "benchmarks" / "assets" / "shape_classifier" / "classifier.pt"
MIN_HELD_OUT_ACCURACY = 0.95
# Below this share of the contrast of real images of the target shape, a model's samples count as faded: a
# generator that has learnt to draw flat, empty or washed-out images fools both the classifier (it calls them
# triangles or squares with confidence) and the FID in its features (docs/results.md). Measured: real circles,
# squares, triangles 24.0, 21.5, 18.8; the customisations in docs/results.md 0.87-0.99 of their target's;
# washed-out samples 0.49, empty backgrounds 0.10-0.40.
MIN_CONTRAST_RATIO = 0.6
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


def customise(cfg: Config, cfg_path: Path, variant: str, sketch_set: str, base_g: str, base_d: str, seed: int,
              cpus: int, iterations: int | None, extra: list[str]) -> str:
    """One GANSketching run through `sketchgan train`; an earlier run of the same name is replaced."""
    prefix = f"bench-{variant.replace('_', '-')}-s{seed}"
    run = f"{prefix}-{sketch_set}"
    run_uri = layout.run_uri(cfg, run)
    if storage.exists(run_uri):
        shutil.rmtree(run_uri)  # measure (and report) a fresh run every time
    overrides = [f"model.base_g={base_g}", f"model.base_d={base_d}", f"train.run_prefix={prefix}",
                 f"train.sketch_sets=[{{name: {sketch_set}}}]", f"train.cpus_per_worker={cpus}",
                 f"train.seed={seed}", *([f"train.iterations={iterations}"] if iterations else []), *extra,
                 *VARIANTS[variant]]
    args = ["train", *common_args(cfg_path, cfg.storage.root)]
    for o in overrides:
        args += ["--set", o]
    cli(args)
    return layout.final_uri(run_uri, layout.G_FILE)


def ensure_classifier(path: Path, epochs: int):
    """The committed shape classifier (trained and saved when missing), checked on held-out images."""
    from pipeline.eval.shape_classifier import accuracy, load_classifier, save_classifier, train_classifier

    if path.is_file():
        classifier = load_classifier(str(path))
        say(f"shape classifier: {path}")
    else:
        say(f"no classifier at {path}: training one on {CLS_TRAIN} rendered images")
        x_tr, y_tr = generate_shape_images(CLS_TRAIN, 32, CLS_TRAIN_SEED, SHAPES, BACKGROUNDS)
        trained = train_classifier(x_tr, y_tr, SHAPES, epochs=epochs, progress=True)
        classifier = trained.classifier
        path.parent.mkdir(parents=True, exist_ok=True)
        save_classifier(classifier, str(path))
        say(f"trained in {trained.seconds:.0f}s -> {path}")
    x_te, y_te = generate_shape_images(CLS_TEST, 32, CLS_TEST_SEED, SHAPES, BACKGROUNDS)
    held_out = accuracy(classifier, x_te, y_te)
    say(f"shape classifier: held-out accuracy {held_out:.4f} on {CLS_TEST} rendered images")
    if held_out < MIN_HELD_OUT_ACCURACY:
        raise SystemExit(f"the shape classifier's held-out accuracy {held_out:.4f} is below "
                         f"{MIN_HELD_OUT_ACCURACY}: the shares would not be trustworthy")
    return classifier, held_out


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


def contrast(images: np.ndarray) -> float:
    """Mean over uint8 N×H×W×3 images of each image's luminance standard deviation (0 for a flat image)."""
    lum = images.astype(np.float32).mean(axis=3).reshape(len(images), -1)
    return float(lum.std(axis=1).mean())


def faded_rows(rows: list[dict], min_ratio: float = MIN_CONTRAST_RATIO) -> list[dict]:
    """The rows whose samples have less than ``min_ratio`` of the real images' contrast."""
    return [r for r in rows if r["contrast_ratio"] < min_ratio]


def evaluate(name: str, images: np.ndarray, classifier, extractor, ref_target, ref_all, target: str,
             real_contrast: float) -> dict:
    from pipeline.eval.fid import extract_features, fid_from_features
    from pipeline.eval.shape_classifier import predict_proba

    proba = predict_proba(classifier, images)
    pred = proba.argmax(1)
    shares = {c: float(np.mean(pred == i)) for i, c in enumerate(classifier.classes)}
    feats = extract_features(images, extractor, batch_size=250)
    c = contrast(images)
    return {"model": name, "n": len(images), "target_fraction": shares[target],
            "contrast": c, "contrast_ratio": c / real_contrast,
            "shares": shares, "mean_confidence": float(proba.max(1).mean()),
            "fid_target": fid_from_features(feats, ref_target), "fid_all": fid_from_features(feats, ref_all)}


@dataclass
class Job:
    target: str
    variant: str
    seed: int
    g_path: str = ""
    seconds: float = 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--targets", default=",".join(SHAPES), help="comma list of the shapes the sketches show")
    p.add_argument("--seeds", default="0,1,2", help="comma list of training seeds (train.seed) per target")
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--root", help="storage root (default: the config's)")
    p.add_argument("--iterations", type=int, help="customisation iterations (default: the config's train.iterations)")
    p.add_argument("--variants", default="gansketching", help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--n-samples", type=int, default=1000, help="samples per model")
    p.add_argument("--base", default=str(BASE_DIR), help="folder of the base G.pth, D.pth (made when missing)")
    p.add_argument("--classifier", default=str(CLASSIFIER), help="shape classifier (trained and saved when missing)")
    p.add_argument("--classifier-epochs", type=int, default=3)
    p.add_argument("--cpus", type=int, default=2, help="CPUs (torch threads) of each `sketchgan train` run")
    p.add_argument("--parallel", type=int, default=1, help="`sketchgan train` runs at once")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="train.KEY=VALUE",
                   help="extra override for every `sketchgan train` run (repeatable)")
    args = p.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    variants = [v for v in args.variants.split(",") if v]
    seeds = [int(x) for x in args.seeds.split(",") if x]
    for kind, given, known in (("targets", targets, SHAPES), ("variants", variants, tuple(VARIANTS))):
        unknown = [x for x in given if x not in known]
        if unknown or not given:
            p.error(f"--{kind}: unknown or none {unknown} (known: {', '.join(known)})")

    cfg_path = Path(args.config)
    cfg = load_config(cfg_path, [f"storage.root={args.root}"] if args.root else [])
    root = str(Path(cfg.storage.root).resolve()) if not storage.is_s3(cfg.storage.root) else cfg.storage.root
    cfg = load_config(cfg_path, [f"storage.root={root}"])
    out_root = Path(root) / "benchmarks" / "shape-customisation"

    import ray
    import torch

    torch.set_num_threads(max(1, args.cpus))
    from pipeline.raysession import PACKAGE_ROOT, local_instance_settings

    local_instance_settings()  # Ray's default niceness 15 lets any other busy process starve training
    ray.init(num_cpus=args.cpus * args.parallel, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": PACKAGE_ROOT}}, log_to_driver=False)
    say(f"targets {', '.join(targets)}; seeds {', '.join(map(str, seeds))}; variants {', '.join(variants)}; "
        f"{args.cpus} CPU(s) per run, {args.parallel} run(s) at once; storage root {root}")

    dataset, labels = ensure_dataset(cfg, cfg_path)
    base_g, base_d = ensure_base(cfg, cfg_path, Path(args.base))
    classifier, held_out = ensure_classifier(Path(args.classifier), args.classifier_epochs)

    from pipeline.eval.fid import extract_features
    from pipeline.eval.shape_classifier import ShapeFeatureExtractor

    extractor = ShapeFeatureExtractor(classifier, resize_threads=1)
    x_ref, y_ref = generate_shape_images(N_REF, cfg.data.size, REF_SEED, SHAPES, BACKGROUNDS)
    ref_all = extract_features(x_ref, extractor, batch_size=250)
    base_images = generate(cfg, base_g, args.n_samples)

    from pipeline.data.sketchsets import load_sketch_set

    sketch_sets, base_rows, real_contrast = {}, {}, {}
    for target in targets:
        out_dir = out_root / target
        is_target = np.array([y == target for y in y_ref])
        ref_target, real_contrast[target] = ref_all[is_target], contrast(x_ref[is_target])
        grid(x_ref[:64], str(out_dir / "real.png"))
        sketch_sets[target] = make_sketch_set(cfg, cfg_path, dataset, labels, target)
        _, sketches = load_sketch_set(layout.sketchset_uri(cfg, sketch_sets[target]))
        grid(np.repeat(sketches[:24, :, :, None], 3, axis=3), str(out_dir / "sketches.png"), nrow=8)
        grid(base_images[:64], str(out_dir / "base.png"))
        base_rows[target] = evaluate("base", base_images, classifier, extractor, ref_target, ref_all, target,
                                     real_contrast[target])
        b = base_rows[target]
        say(f"sketch set {sketch_sets[target]}; base: {target} share {b['target_fraction']:.3f}, FID to real "
            f"{target}s {b['fid_target']:.2f}, FID to all {b['fid_all']:.2f}")

    jobs = [Job(t, v, s) for t in targets for v in variants for s in seeds]

    def run(job: Job) -> None:
        t = time.time()
        say(f"customising towards {job.target}s ({job.variant}, seed {job.seed}) with `sketchgan train` ...")
        job.g_path = customise(cfg, cfg_path, job.variant, sketch_sets[job.target], base_g, base_d, job.seed,
                               args.cpus, args.iterations, args.overrides)
        job.seconds = time.time() - t
        say(f"{job.target} {job.variant} seed {job.seed}: trained in {job.seconds:.0f}s")

    with ThreadPoolExecutor(max_workers=max(1, args.parallel), thread_name_prefix="run") as pool:
        for fut in [pool.submit(run, j) for j in jobs]:
            fut.result()

    rows = []
    for job in jobs:
        ref_target = ref_all[np.array([y == job.target for y in y_ref])]
        images = generate(cfg, job.g_path, args.n_samples)
        grid(images[:64], str(out_root / job.target / f"{job.variant}-s{job.seed}.png"))
        r = evaluate(job.variant, images, classifier, extractor, ref_target, ref_all, job.target,
                     real_contrast[job.target])
        r.update(target=job.target, seed=job.seed, train_seconds=round(job.seconds, 1),
                 fid_target_ratio=r["fid_target"] / base_rows[job.target]["fid_target"])
        rows.append(r)

    iterations = args.iterations or cfg.train.iterations
    print()
    print(f"shape customisation: {args.n_samples} samples per model, {iterations} iterations per run, "
          f"classifier held-out accuracy {held_out:.4f}, FID in its {classifier.feature_dim}-d penultimate features")
    print("| target | model | seed | " + " | ".join(f"share {c}" for c in SHAPES) +
          " | FID to real target | FID to all real | FID ratio to base | contrast / real target "
          "| training wall time (s) |")
    print("| --- " * (len(SHAPES) + 8) + "|")  # 3 leading columns, one per shape, 5 trailing
    for target in targets:
        b = base_rows[target]
        print(f"| {target} | base | - | " + " | ".join(f"{b['shares'][c]:.3f}" for c in SHAPES) +
              f" | {b['fid_target']:.2f} | {b['fid_all']:.2f} | 1.000 | {b['contrast_ratio']:.2f} | - |")
        for r in (r for r in rows if r["target"] == target):
            print(f"| {target} | {r['model']} | {r['seed']} | " + " | ".join(f"{r['shares'][c]:.3f}" for c in SHAPES)
                  + f" | {r['fid_target']:.2f} | {r['fid_all']:.2f} | {r['fid_target_ratio']:.3f} | "
                  f"{r['contrast_ratio']:.2f} | {r['train_seconds']:.0f} |")
    for r in faded_rows(rows):
        print(f"FADED: {r['target']} {r['model']} seed {r['seed']}: contrast {r['contrast_ratio']:.2f} of real "
              f"{r['target']}s' (below {MIN_CONTRAST_RATIO}): flat or washed-out samples; its share and FID are not "
              "evidence of the shape (look at its grid)")
    results = {"targets": targets, "seeds": seeds, "iterations": iterations, "held_out_accuracy": held_out,
               "real_contrast": real_contrast,
               "base": base_rows, "rows": rows, "total_seconds": time.time() - T0}
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "results.json").write_text(json.dumps(results, indent=1))
    print(f"grids and results: {out_root}")
    print(f"run_time_s: {time.time() - T0:.0f}")
    for variant in variants:
        for target in targets:
            mine = [r for r in rows if r["model"] == variant and r["target"] == target]
            print(f"{variant} {target}: worst target_fraction {min(r['target_fraction'] for r in mine):.3f}, "
                  f"worst fid_target_ratio {max(r['fid_target_ratio'] for r in mine):.3f}, "
                  f"longest training {max(r['train_seconds'] for r in mine):.0f}s")
    main_rows = [r for r in rows if r["model"] == "gansketching"]
    if main_rows:
        print(f"max_train_seconds: {max(r['train_seconds'] for r in main_rows):.0f}")
        print(f"worst_contrast_ratio: {min(r['contrast_ratio'] for r in main_rows):.2f}")
        print(f"faded_runs: {len(faded_rows(main_rows))}")
        print(f"worst_target_fraction: {min(r['target_fraction'] for r in main_rows):.3f}")
        print(f"worst_fid_target_ratio: {max(r['fid_target_ratio'] for r in main_rows):.3f}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
