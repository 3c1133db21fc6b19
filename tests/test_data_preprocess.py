"""Readers and the preprocess stage on Ray Data: LMDB key ranges (== torchvision's LSUNClass), folders, Parquet,
S3; the output contract, bad records, error rate, re-run idempotence and interrupted runs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import storage
from pipeline.config import load_config
from pipeline.data import lsun, preprocess, synthetic

REPO = Path(__file__).resolve().parents[1]
N = 40  # good images per LMDB (32 px)
BAD = ("bad-bomb", "bad-corrupt", "bad-empty", "bad-truncated")
ODD = ("odd-16bit", "odd-cmyk", "odd-grey", "odd-palette", "odd-rgba", "odd-tiny")


@pytest.fixture(scope="module")
def lmdbs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lsun")
    clean = synthetic.write_shapes_lmdb(str(root / "clean"), n=N, size=32, seed=5)
    dirty = synthetic.write_shapes_lmdb(str(root / "dirty"), n=N, size=32, seed=6, bad=True)
    return {"clean": str(root / "clean"), "dirty": str(root / "dirty"), "labels": {"clean": clean, "dirty": dirty}}


@pytest.fixture(scope="module")
def clean_dataset(ray_local, lmdbs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "shapes"
    preprocess.preprocess(_cfg(lmdbs["clean"], str(out)))
    return out


def _cfg(source: str, out: str, *extra: str):
    return load_config(None, [f"data.source={json.dumps(source)}", f"data.dataset={json.dumps(out)}",
                              "data.category=shapes", "data.size=32", "data.batch_size=16", *extra])


def _pairs(out: str):
    files = storage.list_files(storage.join(out, "pairs"), suffix=".parquet")
    tables = []
    for uri in files:
        fs, path = storage.filesystem(uri)
        tables.append(pq.read_table(path, filesystem=fs, partitioning=None))
    import pyarrow as pa

    return pa.concat_tables(tables)


def _errors(out: str) -> dict[str, str]:
    rows = {}
    for uri in storage.list_files(storage.join(out, "errors"), suffix=".parquet"):
        fs, path = storage.filesystem(uri)
        t = pq.read_table(path, filesystem=fs)
        rows.update(zip(t["source_key"].to_pylist(), t["reason"].to_pylist()))
    return rows


def _hidden_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_lmdb_reader_matches_torchvision_lsunclass(ray_local, lmdbs, tmp_path, monkeypatch):
    from torchvision.datasets import LSUNClass

    monkeypatch.setattr(lsun, "SPLIT_ROWS", 8)  # several key ranges from 40+10 records
    monkeypatch.chdir(tmp_path)  # LSUNClass writes a key cache file into the working directory
    source = lsun.lmdb_datasource(lmdbs["dirty"])
    assert len(source.get_read_tasks(4)) == 4 and source.num_rows == N + len(BAD) + len(ODD)
    ds, _ = lsun.read_source(lmdbs["dirty"])
    rows = ds.take_all()
    ours = {r["source_key"]: r["data"] for r in rows}
    assert len(rows) == len(ours) == N + len(BAD) + len(ODD)  # every key once, none twice
    reference = LSUNClass(lmdbs["dirty"])
    assert len(reference) == len(ours)
    for key, value in zip(reference.keys, (ours[k.decode()] for k in reference.keys)):
        name = key.decode()
        if name.startswith("bad-"):
            continue  # torchvision cannot decode these either
        expected = np.asarray(reference[reference.keys.index(key)][0])
        got = np.asarray(Image.open(io.BytesIO(value)).convert("RGB"))
        assert np.array_equal(got, expected), name


def test_lmdb_limit_reads_the_first_keys(ray_local, lmdbs):
    ds, fingerprint = lsun.read_source(lmdbs["clean"], limit=7)
    keys = sorted(r["source_key"] for r in ds.take_all())
    assert keys == sorted(lmdbs["labels"]["clean"])[:7]
    assert fingerprint != lsun.read_source(lmdbs["clean"], limit=8)[1]


def test_s3_prefix_of_image_files(ray_local, s3_bucket):
    images, _ = synthetic.generate_shape_images(3, 16, seed=1)
    blobs = {f"a/{i}.png": synthetic.encode(Image.fromarray(arr), "PNG") for i, arr in enumerate(images)}
    for rel, data in blobs.items():
        storage.write_bytes(f"s3://{s3_bucket}/photos/{rel}", data)
    storage.write_bytes(f"s3://{s3_bucket}/photos/readme.md", b"not an image")
    ds, fingerprint = lsun.read_source(f"s3://{s3_bucket}/photos")
    assert {r["source_key"]: r["data"] for r in ds.take_all()} == blobs
    storage.write_bytes(f"s3://{s3_bucket}/photos/a/9.jpg", synthetic.encode(Image.fromarray(images[0]), "JPEG"))
    assert lsun.read_source(f"s3://{s3_bucket}/photos")[1] != fingerprint  # new input, new fingerprint
    with pytest.raises(lsun.SourceError, match="does not exist"):
        lsun.read_source(f"s3://{s3_bucket}/nothing-here")


@pytest.mark.reliability
def test_preprocess_local_contract_bad_records_and_rerun(ray_local, lmdbs, tmp_path, capsys):
    from pipeline.cli import main

    out = tmp_path / "datasets" / "shapes"
    args = ["preprocess", "--source", lmdbs["dirty"], "--out", str(out), "--category", "shapes", "--size", "32",
            "--max-error-rate", "0.2"]
    assert main(args) == 0
    summary = capsys.readouterr().out
    assert f"{N + 10} records in, {N + 6} pairs out, 4 errors" in summary and "images/s" in summary

    pairs = _pairs(str(out))
    assert pairs.column_names == list(preprocess.PAIR_COLUMNS)
    assert pairs.num_rows == N + len(ODD) and len(set(pairs["id"].to_pylist())) == pairs.num_rows
    keys = set(pairs["source_key"].to_pylist())
    assert keys == set(lmdbs["labels"]["dirty"]) and not keys & set(BAD)
    for row in pairs.to_pylist():
        assert row["id"] == preprocess.record_id("shapes", row["source_key"])
        image, sketch = Image.open(io.BytesIO(row["image"])), Image.open(io.BytesIO(row["sketch"]))
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
        assert (sketch.format, sketch.mode, sketch.size) == ("PNG", "L", (32, 32))
        assert row["size"] == 32 and row["sketcher"] == "edges:none"
    errors = _errors(str(out))
    assert set(errors) == set(BAD)
    assert "decompression bomb" in errors["bad-bomb"] and errors["bad-empty"] == "empty value"
    manifest = storage.read_json(str(out / "manifest.json"))
    assert manifest["counts"] == {"rows_in": N + 10, "rows_out": N + 6, "errors": 4}
    assert manifest["sketcher"] == "edges:none" and manifest["input_fingerprint"]

    # rows in the source's (LMDB key) order
    assert pairs["source_key"].to_pylist() == sorted(keys, key=str.encode)

    # the same command again: the same rows in the same order, no duplicates, nothing left aside
    assert main(args) == 0
    again = _pairs(str(out))
    assert again["id"].to_pylist() == pairs["id"].to_pylist()
    by_id = {r["id"]: r for r in again.to_pylist()}
    for row in pairs.to_pylist():
        assert by_id[row["id"]]["image"] == row["image"] and by_id[row["id"]]["sketch"] == row["sketch"]
    assert storage.read_json(str(out / "manifest.json"))["id"] == manifest["id"]
    assert _hidden_leftovers(out.parent) == []


@pytest.mark.reliability
def test_too_many_bad_records_fail_and_keep_the_old_dataset(ray_local, lmdbs, clean_dataset, capsys):
    from pipeline.cli import main

    out = clean_dataset
    before = (out / "manifest.json").read_bytes()
    files_before = sorted(p.relative_to(out) for p in out.rglob("*"))
    # 4 of 50 records are bad: 8 % > the default 1 %
    assert main(["preprocess", "--source", lmdbs["dirty"], "--out", str(out), "--category", "shapes",
                 "--size", "32"]) == 1
    err = capsys.readouterr().err
    assert "4 of 50 records" in err and "data.max_error_rate 1.00%" in err and "nothing was published" in err
    assert "bad-bomb: decompression bomb" in err
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == files_before
    assert _hidden_leftovers(out.parent) == []


def test_decoding_in_separate_tasks_gives_the_same_rows(ray_local, lmdbs, clean_dataset, tmp_path, monkeypatch):
    # The GPU-cluster plan decodes in CPU tasks before the actors; forced here on CPU (with another chunking).
    plan = preprocess.actor_plan

    def separate(cfg):
        return {**plan(cfg), "separate_decode": True}

    monkeypatch.setattr(preprocess, "actor_plan", separate)
    out = tmp_path / "separate"
    preprocess.preprocess(_cfg(lmdbs["clean"], str(out), "data.network_batch=3"))
    rows_a = sorted(_pairs(str(clean_dataset)).to_pylist(), key=lambda r: r["id"])
    rows_b = sorted(_pairs(str(out)).to_pylist(), key=lambda r: r["id"])
    assert len(rows_a) == N and rows_a == rows_b


def test_folder_and_parquet_sources(ray_local, tmp_path):
    images, _ = synthetic.generate_shape_images(6, 40, seed=2)
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, arr in enumerate(images):
        ext = ("png", "jpg", "webp")[i % 3]
        Image.fromarray(arr).save(folder / ("sub" if i % 2 else "") / f"img{i}.{ext}")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "from-folder"
    summary = preprocess.preprocess(_cfg(str(folder), str(out)))
    assert "6 records in, 6 pairs out, 0 errors" in summary
    keys = sorted(_pairs(str(out))["source_key"].to_pylist())
    assert keys == sorted(["img0.png", "sub/img1.jpg", "img2.webp", "sub/img3.png", "img4.jpg", "sub/img5.webp"])
    # our own Parquet as a source: the images of the dataset just made
    again = tmp_path / "from-parquet"
    preprocess.preprocess(_cfg(str(out / "pairs"), str(again)))
    first, second = _pairs(str(out)), _pairs(str(again))
    assert sorted(second["source_key"].to_pylist()) == sorted(first["id"].to_pylist())
    decode = {r["source_key"]: np.asarray(Image.open(io.BytesIO(r["image"]))) for r in second.to_pylist()}
    for r in first.to_pylist():  # PNG in, same size: pixels unchanged
        assert np.array_equal(decode[r["id"]], np.asarray(Image.open(io.BytesIO(r["image"]))))


def test_s3_source_and_output(ray_local, lmdbs, s3_bucket):
    lmdb_uri = f"s3://{s3_bucket}/lsun/clean"
    storage.upload_file(Path(lmdbs["clean"]) / "data.mdb", f"{lmdb_uri}/data.mdb")
    out = f"s3://{s3_bucket}/root/datasets/shapes"
    summary = preprocess.preprocess(_cfg(lmdb_uri, out, "data.limit=25"))
    assert "25 records in, 25 pairs out" in summary
    assert storage.exists(f"{out}/manifest.json")
    first = _pairs(out)
    assert first.num_rows == 25 and set(first["source_key"].to_pylist()) <= set(lmdbs["labels"]["clean"])
    preprocess.preprocess(_cfg(lmdb_uri, out, "data.limit=25"))
    again = _pairs(out)
    assert sorted(again["id"].to_pylist()) == sorted(first["id"].to_pylist())
    listing = storage.list_files(f"s3://{s3_bucket}/root")
    assert all("/datasets/shapes/" in u for u in listing), listing  # no staging objects left behind
    # the rows hold the LMDB's images (32 px PNG/WebP/JPEG in, so the pixels are the decoded values)
    import lmdb

    env = lmdb.open(lmdbs["clean"], readonly=True, lock=False)
    with env.begin() as txn:
        for row in again.to_pylist():
            expected = np.asarray(Image.open(io.BytesIO(txn.get(row["source_key"].encode()))).convert("RGB"))
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["image"]))), expected)
    env.close()


def test_sketch_actor_leaves_a_cpu_for_reads_even_on_a_one_cpu_node(monkeypatch):
    # the actor holding a one-CPU node's only CPU starved the read tasks it waits for: the stage hung
    import ray

    cfg = _cfg("/nowhere", "/nowhere-out")
    for cpus, reserved in ((1, 0.0), (2, 1.0), (8, 7.0)):
        monkeypatch.setattr(ray, "cluster_resources", lambda c=cpus: {"CPU": float(c)})
        monkeypatch.setattr(ray, "nodes", lambda c=cpus: [{"Alive": True, "Resources": {"CPU": float(c)}}])
        plan = preprocess.actor_plan(cfg)
        assert (plan["num_cpus"], plan["threads"], plan["actors"]) == (reserved, cpus, 1), cpus


def test_photosketch_in_bf16_flips_only_line_edges_and_the_manifest_says_so(ray_local, lmdbs, tmp_path):
    # data.sketch_precision: bf16 is the fast path on CPUs with bf16 matrix units (and on GPUs); the sketches
    # must stay close to fp32's, and the manifest and dataset id must say which precision made them.
    import torch
    from reference_weights import deterministic_state_dict

    weights = tmp_path / "photosketch.pth"
    torch.save(deterministic_state_dict("PhotoSketch"), weights)
    manifests, rows = {}, {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        preprocess.preprocess(_cfg(lmdbs["clean"], str(out), "data.sketcher=photosketch", "data.limit=12",
                                   f"data.sketcher_weights={json.dumps(str(weights))}",
                                   f"data.sketch_precision={precision}"))
        manifests[precision] = json.loads((out / "manifest.json").read_text())
        rows[precision] = sorted(_pairs(str(out)).to_pylist(), key=lambda r: r["id"])
    assert [manifests[p]["sketch_precision"] for p in ("fp32", "bf16")] == ["fp32", "bf16"]
    assert manifests["fp32"]["id"] != manifests["bf16"]["id"]
    assert [r["image"] for r in rows["fp32"]] == [r["image"] for r in rows["bf16"]]
    assert {r["sketcher"] for r in rows["bf16"]} == {manifests["fp32"]["sketcher"]}
    s32 = np.stack([np.asarray(Image.open(io.BytesIO(r["sketch"])), np.float32) for r in rows["fp32"]])
    s16 = np.stack([np.asarray(Image.open(io.BytesIO(r["sketch"])), np.float32) for r in rows["bf16"]])
    diff = np.abs(s32 - s16)
    dark32, dark16 = s32 < 128, s16 < 128
    iou = (dark32 & dark16).sum() / (dark32 | dark16).sum()
    print(f"bf16 vs fp32 sketches: mean {diff.mean():.2f} grey levels, {(diff > 64).mean():.2%} of pixels off by "
          f"more than 64, line IoU {iou:.3f}")
    # These deterministic weights give near-binary sketches, so bf16's rounding flips a few pixels on the lines'
    # edges (measured: mean 2.2 levels, 1.1 % of pixels off by > 64, line IoU 0.987); it must stay near that.
    assert 0.05 < dark32.mean() < 0.95  # lines and background both present, so agreement means something
    assert diff.mean() < 2.8 and (diff > 64).mean() < 0.016 and iou > 0.975
