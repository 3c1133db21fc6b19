"""Sketch sets (from drawings or dataset ids; refusals naming the culprit) and evaluation sets (nearest images
under the distance-transform sketch distance)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from pipeline import storage
from pipeline.config import load_config
from pipeline.data import evalsets, synthetic
from pipeline.data.images import encode_png
from pipeline.data.sketchsets import SketchSetError, create_sketch_set, load_sketch_set

N_DATASET = 60


def _cfg(*extra: str):
    return load_config(None, ["model.size=32", "data.size=32", "data.category=shapes", *extra])


def _drawing(kind: str, size: tuple[int, int]) -> Image.Image:
    im = Image.new("L", size, 255)
    d = ImageDraw.Draw(im)
    w, h = size
    if kind == "circle":
        d.ellipse([w * 0.2, h * 0.2, w * 0.8, h * 0.8], outline=0, width=max(1, w // 30))
    else:
        d.polygon([(w * 0.5, h * 0.15), (w * 0.15, h * 0.85), (w * 0.85, h * 0.85)], outline=0)
    return im


@pytest.fixture
def drawings(tmp_path):
    folder = tmp_path / "drawings"
    folder.mkdir()
    _drawing("circle", (300, 300)).save(folder / "a.png")
    _drawing("triangle", (120, 90)).convert("RGB").save(folder / "b.jpg", quality=95)
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # black strokes on a transparent canvas
    ImageDraw.Draw(rgba).line([(5, 5), (60, 60)], fill=(0, 0, 0, 255), width=3)
    rgba.save(folder / "c.png")
    Image.fromarray(np.asarray(_drawing("circle", (40, 40)), np.uint16) * 257).save(folder / "d.png")
    return folder


def test_sketch_set_from_drawings(tmp_path, drawings):
    man = create_sketch_set(_cfg(), "mine", from_dir=str(drawings), out=str(tmp_path / "sets" / "mine"))
    assert (man["name"], man["count"], man["size"]) == ("mine", 4, 32)
    loaded_man, sketches = load_sketch_set(str(tmp_path / "sets" / "mine"))
    assert loaded_man["id"] == man["id"] and sketches.shape == (4, 32, 32) and sketches.dtype == np.uint8
    table = pq.read_table(tmp_path / "sets" / "mine" / "sketches.parquet")
    assert table["id"].to_pylist() == ["a.png", "b.jpg", "c.png", "d.png"]
    assert all(Image.open(io.BytesIO(b)).mode == "L" for b in table["sketch"].to_pylist())
    c = sketches[2]
    assert c[0, 31] == 255 and c[16, 16] < 100  # transparent -> white, the stroke stays dark
    # the same drawings give the same id; a changed drawing gives another
    again = create_sketch_set(_cfg(), "mine", from_dir=str(drawings), out=str(tmp_path / "sets" / "mine"))
    assert again["id"] == man["id"]
    _drawing("triangle", (300, 300)).save(drawings / "a.png")
    assert create_sketch_set(_cfg(), "mine", from_dir=str(drawings), out=str(tmp_path / "x"))["id"] != man["id"]


@pytest.mark.reliability
def test_sketch_set_refusals_name_the_culprit(tmp_path, drawings):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SketchSetError, match="no drawings below .*empty"):
        create_sketch_set(_cfg(), "s", from_dir=str(empty), out=str(tmp_path / "o"))
    (drawings / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(SketchSetError, match=r"broken\.png \(undecodable"):
        create_sketch_set(_cfg(), "s", from_dir=str(drawings), out=str(tmp_path / "o"))
    (drawings / "broken.png").unlink()
    (drawings / "readme.txt").write_text("hello")
    with pytest.raises(SketchSetError, match=r"not drawings .*readme\.txt"):
        create_sketch_set(_cfg(), "s", from_dir=str(drawings), out=str(tmp_path / "o"))
    with pytest.raises(SketchSetError, match="exactly one of"):
        create_sketch_set(_cfg(), "s", out=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="sketch set name"):
        create_sketch_set(_cfg(), "../evil", from_dir=str(drawings))
    assert not (tmp_path / "o").exists()


def _lines_dataset(uri: str) -> dict[str, str]:
    """A preprocessed dataset whose sketches are line drawings of shapes (the `edges` sketcher)."""
    import torch

    from pipeline.data.preprocess import record_id, sketch_pixels
    from pipeline.models.sketchers import build_sketcher

    images, labels = synthetic.generate_shape_images(N_DATASET, 32, seed=4)
    sketches = sketch_pixels(build_sketcher("edges"), images, torch.device("cpu"), 16)
    keys = [f"key{i:03d}" for i in range(N_DATASET)]
    ids = [record_id("shapes", k) for k in keys]
    table = pa.table({"id": ids, "category": ["shapes"] * N_DATASET, "source_key": keys,
                      "image": [encode_png(a) for a in images], "sketch": [encode_png(s) for s in sketches],
                      "size": [32] * N_DATASET, "sketcher": ["edges:none"] * N_DATASET})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join(uri, "pairs", "category=shapes", "part-000000.parquet"), buf.getvalue())
    storage.write_json(storage.join(uri, "manifest.json"), {"id": "lines-dataset", "rows": N_DATASET})
    return {**dict(zip(keys, labels)), **dict(zip(ids, labels))}


@pytest.mark.reliability
def test_sketch_set_from_ids_and_refusals(tmp_path):
    dataset = str(tmp_path / "dataset")
    labels = _lines_dataset(dataset)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("# triangles\nkey002\n\nkey005\n" + [k for k in labels if len(k) > 10][8] + "\nkey002\n")
    man = create_sketch_set(_cfg(), "tri", from_ids=str(ids_file), dataset=dataset, out=str(tmp_path / "tri"))
    assert man["count"] == 3 and man["dataset_id"] == "lines-dataset"
    _, sketches = load_sketch_set(str(tmp_path / "tri"))
    stored = pq.read_table(f"{dataset}/pairs/category=shapes/part-000000.parquet").to_pylist()
    by_key = {r["source_key"]: np.asarray(Image.open(io.BytesIO(r["sketch"]))) for r in stored}
    assert np.array_equal(sketches[0], by_key["key002"]) and np.array_equal(sketches[1], by_key["key005"])
    big = create_sketch_set(_cfg("model.size=64"), "tri64", from_ids=str(ids_file), dataset=dataset,
                            out=str(tmp_path / "tri64"))
    assert big["size"] == 64 and load_sketch_set(str(tmp_path / "tri64"))[1].shape == (3, 64, 64)

    (tmp_path / "unknown.txt").write_text("key001\nnope-1\nnope-2\n")
    with pytest.raises(SketchSetError, match="2 id.*nope-1, nope-2"):
        create_sketch_set(_cfg(), "x", from_ids=str(tmp_path / "unknown.txt"), dataset=dataset, out=str(tmp_path / "x"))
    (tmp_path / "blank.txt").write_text("\n# nothing\n")
    with pytest.raises(SketchSetError, match="id list .*blank.txt is empty"):
        create_sketch_set(_cfg(), "x", from_ids=str(tmp_path / "blank.txt"), dataset=dataset, out=str(tmp_path / "x"))
    with pytest.raises(SketchSetError, match="no manifest"):
        create_sketch_set(_cfg(), "x", from_ids=str(ids_file), dataset=str(tmp_path / "nothing"),
                          out=str(tmp_path / "x"))


def test_sketch_distance_grows_with_displacement_and_a_far_line_is_farther_than_none():
    blank = np.full((32, 32), 255, np.uint8)
    line = blank.copy()
    line[10, 4:28] = 0
    moved = blank.copy()
    moved[24, 4:28] = 0
    near = blank.copy()
    near[11, 4:28] = 0
    d = evalsets.sketch_descriptors(np.stack([blank, line, moved, near]))
    assert d.shape == (4, 1024) and np.allclose(d[0], evalsets.DT_CLIP)
    dist = evalsets.set_distance(d, d[1:2])
    # measured: 0 (itself), 0.020 (one pixel lower), 0.143 (14 px lower), 0.102 (blank). The truncated distance
    # transform puts a far-moved line farther than no line at all: the blank is then the nearer "sketch".
    assert dist[1] == pytest.approx(0, abs=1e-6)
    assert dist[3] == pytest.approx(0.0205, abs=0.003) and dist[2] == pytest.approx(0.1433, abs=0.005)
    assert dist[0] == pytest.approx(0.1017, abs=0.005) and dist[3] < dist[0] < dist[2]
    each = [evalsets.set_distance(d[2:3], d[i:i + 1])[0] for i in (0, 3)]
    assert evalsets.set_distance(d[2:3], d[[0, 3]])[0] == pytest.approx(min(each))  # nearest sketch of the set


def test_evalset_holds_the_images_nearest_the_sketches(ray_local, tmp_path, s3_bucket, capsys):
    from pipeline.cli import main

    dataset = str(tmp_path / "dataset")
    labels = _lines_dataset(dataset)
    tri_ids = [k for k, v in labels.items() if v == "triangle" and k.startswith("key")][:5]
    ids_file = tmp_path / "tri.txt"
    ids_file.write_text("\n".join(tri_ids))
    sketchset = f"s3://{s3_bucket}/sketchsets/tri"
    assert main(["sketchset", "create", "--name", "tri", "--from-ids", str(ids_file), "--dataset", dataset,
                 "--out", sketchset, "--set", "model.size=32"]) == 0
    out = f"s3://{s3_bucket}/evalsets/tri"
    assert main(["evalset", "create", "--sketchset", sketchset, "--dataset", dataset, "--n", "12", "--out", out]) == 0
    assert "evalset: tri (12 images" in capsys.readouterr().out
    manifest, images = evalsets.load_evalset(out)
    s_manifest, _ = load_sketch_set(sketchset)
    assert images.shape == (12, 32, 32, 3) and manifest["count"] == 12 and manifest["size"] == 32
    assert manifest["sketchset_id"] == s_manifest["id"] and manifest["dataset"] == dataset
    table = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/images.parquet")))
    chosen = table["id"].to_pylist()
    assert len(set(chosen)) == 12 and table["distance"].to_pylist() == sorted(table["distance"].to_pylist())
    # the sketches themselves are at distance 0, and triangles dominate although they are a third of the data
    tri_record_ids = {k for k, v in labels.items() if v == "triangle" and not k.startswith("key")}
    assert sum(1 for i in chosen if i in tri_record_ids) >= 8
    stored = {r["id"]: r["image"] for r in pq.read_table(f"{dataset}/pairs/category=shapes/part-000000.parquet")
              .to_pylist()}
    assert all(stored[i] == img for i, img in zip(chosen, table["image"].to_pylist()))
    # the same inputs give the same set and id
    again = evalsets.create_evalset(_cfg(), sketchset, dataset, n=12, out=out)
    assert again["id"] == manifest["id"]
    with pytest.raises(evalsets.EvalSetError, match="no manifest"):
        evalsets.create_evalset(_cfg(), sketchset, str(tmp_path / "missing"), n=3, out=str(tmp_path / "e"))
    assert json.loads(storage.read_text(f"{out}/manifest.json"))["requested"] == 12
    # by id (labels known): exactly those images, in the given order, and unknown ids refused by name
    record_ids = sorted(tri_record_ids)[:4]
    by_id = evalsets.create_evalset(_cfg(), sketchset, dataset, n=3, out=f"{out}-ids", ids=record_ids)
    table = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}-ids/images.parquet")))
    assert table["id"].to_pylist() == record_ids[:3] and by_id["count"] == 3 and by_id["max_distance"] is None
    assert all(stored[i] == img for i, img in zip(record_ids, table["image"].to_pylist()))
    with pytest.raises(evalsets.EvalSetError, match="not in dataset .*first: nope"):
        evalsets.create_evalset(_cfg(), sketchset, dataset, n=3, out=f"{out}-bad", ids=["nope", record_ids[0]])
