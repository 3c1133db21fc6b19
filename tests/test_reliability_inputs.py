"""Issue 9, bad inputs (scenarios 6-10): every refusal names its culprit (file, key, field, name), odd but usable
inputs are converted, and nothing reaches a training worker that the driver could have refused."""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from overrides import with_overrides
from PIL import Image, ImageDraw
from tiny_data import write_pairs_dataset, write_random_base, write_sketch_set

from pipeline import cli, layout, storage
from pipeline.config import Config, ConfigError, load_config
from pipeline.data import preprocess, synthetic
from pipeline.data.sketchsets import SketchSetError, create_sketch_set, load_sketch_set
from pipeline.names import NameError_
from pipeline.storage import StorageError
from pipeline.train import loop, raytrain, run_store, streams
from pipeline.train import plan as planning

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[1]


def _png(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _triangle(size: int = 48) -> Image.Image:
    im = Image.new("L", (size, size), 255)
    ImageDraw.Draw(im).polygon([(size // 2, 4), (4, size - 5), (size - 5, size - 5)], outline=0)
    return im


def _tiny_cfg(root: Path, *overrides: str):
    return load_config(REPO / "configs" / "tiny.yaml", [f"storage.root={root}", *overrides])


@pytest.fixture
def world(tmp_path):
    """A storage root with a tiny dataset, random base G/D and the sketch set 'tri' (no Ray needed)."""
    torch.set_num_threads(1)
    write_pairs_dataset(str(tmp_path / "datasets" / "shapes"), n=8)
    write_sketch_set(str(tmp_path / "sketchsets" / "tri"), n=3)
    g, d = write_random_base(tmp_path, _tiny_cfg(tmp_path).model, seed=3)
    return tmp_path, g, d


@pytest.fixture
def no_workers(monkeypatch):
    """Fail the test if training gets past the driver's validation."""
    def boom(*a, **k):
        raise AssertionError("a worker would have started")

    monkeypatch.setattr(raytrain, "prepare_run_inputs", boom)
    monkeypatch.setattr(raytrain, "trainer_for", boom)
    monkeypatch.setattr(raytrain, "ensure_ray", boom)


def _write_stored_set(uri: str, ids: list[str], blobs: list[bytes], size: int = 32, count: int | None = None):
    """A sketch set in the stored layout with exactly these values (bypassing `create_sketch_set`'s checks)."""
    table = pa.table({"id": pa.array(ids, pa.string()), "sketch": pa.array(blobs, pa.binary()),
                      "size": pa.array([size] * len(ids), pa.int64())})
    storage.write_parquet(storage.join(uri, "sketches.parquet"), table)
    storage.write_json(storage.join(uri, "manifest.json"),
                       {"name": uri.rsplit("/", 1)[-1], "id": "x", "count": len(ids) if count is None else count,
                        "size": size})


# -- 6. corrupt, truncated, empty, bombs; non-image files; odd modes converted ---------------------------------
def test_bad_drawings_in_a_sketch_folder_are_each_named_with_a_reason(tmp_path):
    folder = tmp_path / "drawings"
    folder.mkdir()
    _triangle().save(folder / "good.png")
    full = _png(Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64), np.uint8)))
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2)
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "bomb.png").write_bytes(synthetic.bomb_png())
    with pytest.raises(SketchSetError) as exc:
        create_sketch_set(_tiny_cfg(tmp_path), "mixed", from_dir=str(folder), out=str(tmp_path / "out"))
    msg = str(exc.value)
    assert msg.startswith("4 drawing(s) below")
    assert "bomb.png (decompression bomb refused" in msg
    assert "corrupt.png (undecodable" in msg
    assert "empty.png (empty value)" in msg
    assert "truncated.png (" in msg and "good.png" not in msg
    assert not (tmp_path / "out").exists()  # nothing half-made is published


def test_non_image_files_in_a_sketch_folder_are_named(tmp_path):
    folder = tmp_path / "drawings"
    (folder / "sub").mkdir(parents=True)
    _triangle().save(folder / "a.png")
    (folder / "sub" / "notes.pdf").write_bytes(b"%PDF-1.4")
    (folder / "Thumbs.db").write_bytes(b"\x00\x01")
    with pytest.raises(SketchSetError, match=r"2 file\(s\) below .* are not drawings .*Thumbs\.db.*sub/notes\.pdf"):
        create_sketch_set(_tiny_cfg(tmp_path), "x", from_dir=str(folder), out=str(tmp_path / "out"))


def test_16_bit_cmyk_rgba_and_palette_drawings_are_converted_not_refused(tmp_path):
    folder = tmp_path / "drawings"
    folder.mkdir()
    tri = _triangle(48)
    Image.fromarray(np.asarray(tri, np.uint16) * 257).save(folder / "a16.png")
    tri.convert("CMYK").save(folder / "b_cmyk.jpg", quality=95)
    rgba = Image.new("RGBA", (48, 48), (0, 0, 0, 0))  # black strokes on a transparent canvas
    rgba.paste(Image.new("RGBA", (48, 48), (0, 0, 0, 255)), mask=Image.eval(tri, lambda v: 255 - v))
    rgba.save(folder / "c_rgba.png")
    tri.convert("P").save(folder / "d_palette.png")
    pal = tri.convert("P")
    pal.info["transparency"] = pal.getpixel((0, 0))  # white is the transparent colour: must stay white
    pal.save(folder / "e_palette_transparent.png", transparency=pal.getpixel((0, 0)))
    man = create_sketch_set(_tiny_cfg(tmp_path), "odd", from_dir=str(folder), out=str(tmp_path / "odd"))
    assert man["count"] == 5
    _, sketches = load_sketch_set(str(tmp_path / "odd"))
    assert sketches.shape == (5, 32, 32) and sketches.dtype == np.uint8
    for name, s in zip(sorted(os.listdir(folder)), sketches):
        assert s[1, 1] > 200, f"{name}: the background is not white"
        assert s.min() < 128, f"{name}: the strokes were lost in conversion"


def test_bad_lmdb_values_get_a_reason_keyed_by_their_lmdb_key():
    planted = synthetic.planted_records(32)
    keys = sorted(planted)
    batch = {"source_key": np.array(keys + ["none-value"], dtype=object),
             "data": [planted[k][0] for k in keys] + [None]}
    out = preprocess.decode_batch(batch, 32, 89_478_485)
    reasons = dict(zip(out["source_key"], out["reason"]))
    assert reasons["bad-empty"] == "empty value" and reasons["none-value"] == "empty value"
    assert reasons["bad-corrupt"].startswith("undecodable")
    assert reasons["bad-truncated"].startswith(("undecodable", "truncated"))
    assert reasons["bad-bomb"].startswith("decompression bomb refused")
    for k in keys:
        if k.startswith("odd-"):  # 16-bit, CMYK, RGBA, palette, grey, tiny: converted and kept
            assert reasons[k] == "", k
            assert out["pixels"][keys.index(k)].std() > 5, k


def test_unreadable_sketch_in_a_stored_set_is_refused_on_the_driver_naming_set_and_sketch(world, no_workers):
    root, g, d = world
    good = _png(_triangle(32))
    _write_stored_set(str(root / "sketchsets" / "broken"), ["s0", "s1-bad", "s2"],
                      [good, b"\x89PNG\r\n\x1a\ngarbage", good])
    # beside a good set it would be packed with (train.pack=2): refused by name before any group starts
    cfg = _tiny_cfg(root, f"model.base_g={g}", f"model.base_d={d}", "train.pack=2",
                    "train.sketch_sets=[{name: tri}, {name: broken}]")
    with pytest.raises(planning.TrainingInputError, match=r"sketch set 'broken': sketch 's1-bad' .*undecodable"):
        raytrain.train_all(cfg)
    with pytest.raises(SketchSetError, match=r"sketch 's1-bad' is unreadable"):
        load_sketch_set(str(root / "sketchsets" / "broken"))


# -- 7. empty sets, sets smaller than the batch, sets of another size or channel count ------------------------
def test_sketch_set_with_no_rows_is_refused_naming_it(world, no_workers):
    root, g, d = world
    _write_stored_set(str(root / "sketchsets" / "hollow"), [], [], count=3)  # the manifest claims 3
    cfg = _tiny_cfg(root, f"model.base_g={g}", f"model.base_d={d}", "train.sketch_sets=[{name: hollow}]")
    with pytest.raises(planning.TrainingInputError, match=r"sketch set 'hollow' .*empty \(no rows\)"):
        raytrain.train_all(cfg)
    empty = root / "no-drawings"
    empty.mkdir()
    with pytest.raises(SketchSetError, match="no drawings below .*no-drawings"):
        create_sketch_set(_tiny_cfg(root), "none", from_dir=str(empty), out=str(root / "none"))


def test_small_sketch_set_of_another_size_and_channels_is_resized_and_sampled_with_replacement(world, caplog):
    root, g, d = world
    big_rgb = [_png(_triangle(64).convert("RGB")), _png(_triangle(64).transpose(Image.FLIP_TOP_BOTTOM).convert("RGB"))]
    uri = str(root / "sketchsets" / "big")
    _write_stored_set(uri, ["a", "b"], big_rgb, size=64)
    cfg = _tiny_cfg(root, f"model.base_g={g}", f"model.base_d={d}", "train.sketch_sets=[{name: big}]",
                    "train.batch_size=4", "train.iterations=1", "train.lambda_image=0", "train.checkpoint_every=1",
                    "train.log_every=1", "train.sample_every=10")
    with caplog.at_level(logging.WARNING, logger="sketchgan.train"):
        [plan] = planning.plan_train(cfg)
        state = plan.state
    assert state == "new"
    assert "sketch set 'big' holds sketches of 64x64 px, not model.size 32: they are resized to 32x32" in caplog.text
    # what every worker gets: one channel at the model's size, the strokes kept
    sk = streams.decode_png_batch(plan.sketch_set.blobs, 1, cfg.model.size)
    assert sk.shape == (2, 1, 32, 32) and sk.min() < 0 and sk[:, :, 0, 0].gt(0.9).all()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sketchgan.train"):
        metrics = loop.run_worker(plan.spec, None, sk, device=torch.device("cpu"))
    assert "sketch set 'big' has 2 sketch(es), fewer than the per-worker batch of 4" in caplog.text
    assert "replacement" in caplog.text and metrics["iteration"] == 1
    assert storage.read_json(storage.join(plan.spec.run_uri, "final", "metadata.json"))["iterations"] == 1


# -- 8. checkpoints: mismatched keys, arbitrary pickled objects ----------------------------------------------
class _Payload:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _evil(path: Path, marker: Path, state: dict) -> None:
    with open(path, "wb") as f:
        torch.save({**state, "payload": _Payload(str(marker))}, f, pickle_module=pickle)


def test_pickled_objects_in_a_base_checkpoint_are_refused_before_training_never_executed(world, no_workers):
    root, g, d = world
    marker = root / "pwned"
    evil = root / "evil_netD.pth"
    _evil(evil, marker, torch.load(d, weights_only=True))
    cfg = _tiny_cfg(root, f"model.base_g={g}", f"model.base_d={evil}", "train.sketch_sets=[{name: tri}]")
    with pytest.raises(planning.TrainingInputError, match=r"model\.base_d: checkpoint .*evil_netD\.pth: refused"):
        raytrain.train_all(cfg)
    assert not marker.exists()


def test_pickled_objects_in_a_resume_checkpoint_are_refused_never_executed(tmp_path):
    run = str(tmp_path / "runs" / "r")
    marker = tmp_path / "pwned"
    path = tmp_path / "runs" / "r" / "checkpoints" / "ckpt-00000002.pt"
    path.parent.mkdir(parents=True)
    _evil(path, marker, {"iteration": 2})
    storage.write_json(f"{run}/checkpoints/latest.json", {"uri": str(path), "iteration": 2})
    assert run_store.latest_checkpoint(run) == str(path)
    with pytest.raises(ValueError, match=r"checkpoint .*ckpt-00000002\.pt: not readable"):
        run_store.load_checkpoint(run_store.latest_checkpoint(run))
    assert not marker.exists()


def test_base_checkpoint_with_missing_and_unexpected_keys_lists_them_naming_the_file(world, no_workers):
    root, g, d = world
    sd = torch.load(d, weights_only=True)
    dropped = sorted(sd)[0]
    sd.pop(dropped)
    sd["stray.weight"] = torch.zeros(3)
    odd = root / "odd_netD.pth"
    torch.save(sd, odd)
    cfg = _tiny_cfg(root, f"model.base_g={g}", f"model.base_d={odd}", "train.sketch_sets=[{name: tri}]")
    with pytest.raises(planning.TrainingInputError) as exc:
        raytrain.train_all(cfg)
    msg = str(exc.value)
    assert msg.startswith("model.base_d:") and "odd_netD.pth" in msg
    assert f"missing keys: {dropped}" in msg and "unexpected keys: stray.weight" in msg


# -- 9. YAML: unknown keys, wrong types, out-of-range values, unknown policies and sketchers ------------------
def test_every_mistake_in_a_yaml_file_is_named_at_once(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  iterations: lots\n  lambda_image: -0.5\n  no_such_knob: 1\n  augment: translation,blur\n"
                    "data:\n  sketcher: crayon\nmodel:\n  size: 48\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert str(path) in msg
    for field in ("train.iterations: input should be a valid integer", "train.lambda_image: input should be "
                  "greater than or equal to 0", "train.no_such_knob: extra inputs are not permitted",
                  "unknown augmentation policy 'blur'", "data.sketcher: input should be 'edges' or 'photosketch'",
                  "model.size: value error, must be a power of two, got 48"):
        assert field in msg, field
    # the command line refuses the same file before importing any stage, exit status 2
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.no_such_knob" in err and "data.sketcher" in err


# -- 10. names with separators or '..', unsupported schemes, unwritable roots ---------------------------------
@pytest.mark.parametrize("bad", ["a/b", "..", "../up", "x/../y", "a\\b", ".hidden", ""])
def test_unsafe_names_are_refused_for_sets_models_and_runs(bad):
    cfg = Config()
    for func, what in ((layout.sketchset_uri, "sketch set name"), (layout.run_uri, "run name"),
                       (layout.evalset_uri, "evaluation set name"), (layout.benchmark_uri, "benchmark name")):
        with pytest.raises(NameError_, match=re.escape(f"{what} {bad!r} is not allowed")):
            func(cfg, bad)
    from pipeline.registry.mlflow_registry import model_name

    if any(c in bad for c in ("/", "\\", "..")):  # '<prefix>-cat-.hidden' itself is a fine model name
        with pytest.raises(NameError_, match="registered model name"):
            model_name(cfg, "cat", bad)


@pytest.mark.parametrize("override,field", [
    ("train.run_prefix=../evil", "train.run_prefix"), ("train.run_prefix=a/b", "train.run_prefix"),
    ("train.resume=../other-run", "train.resume"), ("registry.model_prefix=team/x", "registry.model_prefix"),
    ("pretrain.run_name=..", "pretrain.run_name"), ("data.category=cat/../../etc", "data.category"),
    ("train.sketch_sets=[{name: 'a/b'}]", "train.sketch_sets.0.name"),
])
def test_unsafe_run_model_and_set_names_in_the_config_are_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.") + ": value error, .* is not allowed"):
        with_overrides(Config(), [override])


def test_sketchset_create_with_an_unsafe_name_fails_naming_it(tmp_path, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    _triangle().save(folder / "a.png")
    assert cli.main(["sketchset", "create", "--name", "../../escape", "--from-dir", str(folder),
                     "--set", f"storage.root={tmp_path / 'root'}"]) == 1
    assert "sketch set name '../../escape' is not allowed" in capsys.readouterr().err
    assert not (tmp_path / "escape").exists() and not (tmp_path / "root").exists()


@pytest.mark.parametrize("uri", ["gs://bucket/root", "https://example.com/root", "hdfs://nn/root"])
def test_unsupported_scheme_is_refused_naming_it(uri, tmp_path):
    scheme = uri.split("://")[0] + "://"
    with pytest.raises(StorageError, match=f"unsupported scheme '{scheme}'"):
        storage.ensure_writable(uri)
    folder = tmp_path / "d"
    folder.mkdir()
    _triangle().save(folder / "a.png")
    with pytest.raises(StorageError, match=f"{uri}.*unsupported scheme '{scheme}'"):
        create_sketch_set(Config(), "s", from_dir=str(folder), out=f"{uri}/sketchsets/s")


def test_unwritable_storage_root_is_refused_before_any_work(world, no_workers):
    root, g, d = world
    blocker = root / "a-file"
    blocker.write_text("x")
    bad_root = blocker / "root"  # below a regular file: never creatable, even by root
    cfg = _tiny_cfg(root, f"model.base_g={g}", f"model.base_d={d}", "train.sketch_sets=[{name: tri}]",
                    f"storage.root={bad_root}")
    with pytest.raises(StorageError, match=f"storage root {bad_root} is not writable"):
        raytrain.train_all(cfg)
    pre = load_config(None, [f"data.source={root}", f"data.dataset={bad_root}/datasets/cat"])
    with pytest.raises(StorageError, match=f"storage root {bad_root}/datasets is not writable"):
        preprocess.preprocess(pre)
