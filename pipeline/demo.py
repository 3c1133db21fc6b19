"""`sketchgan demo`: the whole pipeline on generated data, on this machine (local Ray, ./.sketchgan/,
a local MLflow store, the `edges` sketcher, a small base pretrained on the fly). A second run reuses
everything that already exists and says so.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline import layout, storage
from pipeline.config import Config, updated

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
N_IMAGES = 600  # generated images (three shapes, equal shares)
SKETCHES_PER_SET = 12
SHAPE_OF_SET = {"triangles": "triangle", "circles": "circle", "squares": "square"}


def write_demo_data(cfg: Config) -> str:
    """Generate the LSUN-format LMDB and an id list per sketch set (once; reused afterwards)."""
    from pipeline.data import synthetic

    root = layout.synthetic_uri(cfg)
    lmdb_dir = storage.join(root, cfg.data.category)
    ids_dir = Path(storage.join(root, "sketch-ids"))
    if storage.exists(storage.join(lmdb_dir, "data.mdb")) and ids_dir.exists():
        print(f"demo: reusing generated data in {root}", flush=True)
    else:
        print(f"demo: generating {N_IMAGES} LSUN-format images in {lmdb_dir}", flush=True)
        labels = synthetic.write_shapes_lmdb(lmdb_dir, n=N_IMAGES, size=64, seed=0)
        ids_dir.mkdir(parents=True, exist_ok=True)
        for set_name, shape in SHAPE_OF_SET.items():
            ids = [key for key, label in labels.items() if label == shape][:SKETCHES_PER_SET]
            (ids_dir / f"{set_name}.txt").write_text("\n".join(ids) + "\n")
    return lmdb_dir


def run_demo(cfg: Config) -> None:
    """Generate the data, then run the whole chain on it and say where to look."""
    from pipeline.chain import print_where_to_look, run_chain

    if storage.is_s3(cfg.storage.root):
        raise ValueError("the demo runs on local storage: set storage.root to a local folder")
    t0 = time.time()
    lmdb_dir = write_demo_data(cfg)
    ids_dir = storage.join(layout.synthetic_uri(cfg), "sketch-ids")
    specs = [{**s.model_dump(), "from_ids": s.from_ids or storage.join(ids_dir, f"{s.name}.txt")}
             for s in cfg.train.sketch_sets]
    cfg = updated(cfg, {"data.source": lmdb_dir, "train.sketch_sets": specs})
    report = run_chain(cfg)
    print_where_to_look(cfg, report)
    print(f"\ndemo finished in {time.time() - t0:.0f}s")
