"""`sketchgan demo`: the whole pipeline on generated data, on this machine (local Ray, ./.sketchgan/, a local
MLflow store, the `edges` sketcher), customising the committed toy base (`benchmarks/assets/shapes_base`, a
32 px StyleGAN2 pretrained on the generated "shapes" category) from two sketch sets at once, and scoring each
model with the committed shape classifier (its features for FID, its verdict for the share of the target shape).
A second run reuses everything that already exists and says so.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline import layout, storage
from pipeline.config import Config, updated

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
ASSETS = REPO / "benchmarks" / "assets"
BASE_DIR = ASSETS / "shapes_base"  # `sketchgan pretrain` with configs/shapes.yaml (benchmarks/README.md)
CLASSIFIER = ASSETS / "shape_classifier" / "classifier.pt"  # made by benchmarks/shape_customisation.py
N_IMAGES = 3000  # generated images (three shapes in equal shares), the base's kind: flat or gradient backgrounds
BACKGROUNDS = ("flat", "gradient")
SEED = 0
SKETCHES_PER_SET = 30
EVALSET_SIZE = 300  # real images per evaluation set: images of the sketched shape, none of them sketched


def write_demo_data(cfg: Config) -> str:
    """Generate the LSUN-format LMDB and an id list per sketch set (once; reused afterwards)."""
    from pipeline.data import synthetic

    for spec in cfg.train.sketch_sets:  # checked before any reuse: a renamed class must not pass silently
        if spec.target_class not in synthetic.SHAPES:
            raise ValueError(f"demo: train.sketch_sets: {spec.name!r} needs a target_class among "
                             f"{', '.join(synthetic.SHAPES)}, got {spec.target_class!r}")
    root = layout.synthetic_uri(cfg)
    lmdb_dir = storage.join(root, cfg.data.category)
    ids_dir = Path(storage.join(root, "sketch-ids"))
    wanted = [ids_dir / f"{s.name}{suffix}.txt" for s in cfg.train.sketch_sets for suffix in ("", "-evalset")]
    if storage.exists(storage.join(lmdb_dir, "data.mdb")) and all(p.is_file() for p in wanted):
        print(f"demo: reusing generated data in {root}", flush=True)
        return lmdb_dir
    print(f"demo: generating {N_IMAGES} LSUN-format images in {lmdb_dir}", flush=True)
    labels = synthetic.write_shapes_lmdb(lmdb_dir, n=N_IMAGES, size=cfg.data.size, seed=SEED,
                                         backgrounds=BACKGROUNDS)
    ids_dir.mkdir(parents=True, exist_ok=True)
    for spec in cfg.train.sketch_sets:
        of_class = sorted(key for key, label in labels.items() if label == spec.target_class)
        # the sketches come from the first images of the class; the evaluation set holds the next ones
        (ids_dir / f"{spec.name}.txt").write_text("\n".join(of_class[:SKETCHES_PER_SET]) + "\n")
        held_out = of_class[SKETCHES_PER_SET:SKETCHES_PER_SET + EVALSET_SIZE]
        (ids_dir / f"{spec.name}-evalset.txt").write_text("\n".join(held_out) + "\n")
    return lmdb_dir


def committed_assets(cfg: Config) -> dict[str, str]:
    """The committed base and classifier, unless the config names others (a clear error when missing)."""
    changes = {}
    if not cfg.model.base_g:
        missing = [p for p in (BASE_DIR / layout.G_FILE, BASE_DIR / layout.D_FILE) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"demo: the committed base is missing ({', '.join(map(str, missing))}): run the "
                                    "demo from a clone of the repository, or set model.base_g and model.base_d")
        changes |= {"model.base_g": str(BASE_DIR / layout.G_FILE), "model.base_d": str(BASE_DIR / layout.D_FILE)}
    if cfg.eval.feature_extractor == "classifier" and not cfg.eval.classifier:
        if not CLASSIFIER.is_file():
            raise FileNotFoundError(f"demo: the committed shape classifier {CLASSIFIER} is missing: set "
                                    "eval.classifier, or eval.feature_extractor to another extractor")
        changes["eval.classifier"] = str(CLASSIFIER)
    return changes


def run_demo(cfg: Config) -> None:
    """Generate the data, then run the whole chain on it and say where to look."""
    from pipeline.chain import print_where_to_look, run_chain

    if storage.is_s3(cfg.storage.root):
        raise ValueError("the demo runs on local storage: set storage.root to a local folder")
    t0 = time.time()
    cfg = updated(cfg, committed_assets(cfg))
    lmdb_dir = write_demo_data(cfg)
    ids_dir = storage.join(layout.synthetic_uri(cfg), "sketch-ids")
    specs = [{**s.model_dump(), "from_ids": s.from_ids or storage.join(ids_dir, f"{s.name}.txt"),
              "evalset_ids": s.evalset_ids or (None if s.evalset else storage.join(ids_dir, f"{s.name}-evalset.txt"))}
             for s in cfg.train.sketch_sets]
    cfg = updated(cfg, {"data.source": lmdb_dir, "train.sketch_sets": specs})
    report = run_chain(cfg, evalset_size=EVALSET_SIZE)
    print_where_to_look(cfg, report)
    print("  studio:           sketchgan studio (draw a sketch set of your own and customise it in a browser)")
    print(f"\ndemo finished in {time.time() - t0:.0f}s")
