"""The benchmark stage: reference statistics cache, model resolution errors, and a run over tiny models."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from overrides import with_overrides
from PIL import Image

from pipeline import layout, storage
from pipeline.config import Config
from pipeline.eval.features import RandConvExtractor
from pipeline.eval.fid import extract_features, feature_statistics
from pipeline.eval.models import BenchmarkError, resolve_models
from pipeline.eval.refstats import EvalSetError, evalset_id, reference_stats

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(2)


def make_evalset(uri: str, n: int = 24, size: int = 32, seed: int = 0, name: str = "es") -> np.ndarray:
    """An evaluation set in the contract layout (images.parquet + manifest.json); returns its images."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, 1, 1, 3))
    images = (base + rng.normal(0, 40, (n, size, size, 3))).clip(0, 255).astype(np.uint8)
    pngs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    table = pa.table({"id": [f"{name}-{i}" for i in range(n)], "image": pngs, "size": [size] * n})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join(uri, "images.parquet"), buf.getvalue())
    storage.write_json(storage.join(uri, "manifest.json"), {
        "name": name, "id": f"content-{name}-{seed}-{n}", "count": n, "size": size,
        "sketchset_id": "none", "dataset": "synthetic"})
    return images


@pytest.mark.parametrize("where", ["local", "s3"])
def test_reference_stats_cache_miss_then_hit(tmp_path, request, caplog, where):
    root = str(tmp_path / "root") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/root"
    cfg = with_overrides(Config(), [f"storage.root={root}", "eval.batch_size=10"])
    evalset = layout.evalset_uri(cfg, "cats")
    images = make_evalset(evalset, name="cats")
    extractor = RandConvExtractor(seed=0, dim=8, device="cpu")

    with caplog.at_level(logging.INFO, logger="pipeline.eval.refstats"):
        first = reference_stats(cfg, evalset, extractor)
    assert not first.cached
    assert "computing reference statistics" in caplog.text and "reusing" not in caplog.text
    assert storage.exists(layout.fid_stats_uri(cfg, first.key))
    mu, sigma = feature_statistics(extract_features(images, extractor))
    np.testing.assert_allclose(first.mu, mu, rtol=1e-6)
    np.testing.assert_allclose(first.sigma, sigma, rtol=1e-5, atol=1e-8)

    caplog.clear()
    calls = []
    with caplog.at_level(logging.INFO, logger="pipeline.eval.refstats"):
        second = reference_stats(cfg, evalset, extractor, compute_features=lambda u, p: calls.append(u))
    assert second.cached and not calls  # nothing recomputed
    assert "reusing cached reference statistics" in caplog.text
    assert second.key == first.key
    np.testing.assert_array_equal(second.sigma, first.sigma)
    np.testing.assert_array_equal(second.feats, first.feats)

    # another extractor (or version) is another cache entry
    other = reference_stats(cfg, evalset, RandConvExtractor(seed=1, dim=8, device="cpu"))
    assert not other.cached and other.key != first.key
    # so is another evaluation-set content id
    make_evalset(evalset, name="cats", seed=7)
    assert not reference_stats(cfg, evalset, extractor).cached


def test_corrupt_cache_entry_is_recomputed(tmp_path, caplog):
    cfg = with_overrides(Config(), [f"storage.root={tmp_path}"])
    evalset = layout.evalset_uri(cfg, "e")
    make_evalset(evalset, n=6, size=16)
    extractor = RandConvExtractor(seed=0, dim=4, device="cpu")
    first = reference_stats(cfg, evalset, extractor)
    storage.write_bytes(first.uri, b"garbage")
    with caplog.at_level(logging.WARNING):
        again = reference_stats(cfg, evalset, extractor)
    assert not again.cached and "unreadable" in caplog.text
    np.testing.assert_allclose(again.mu, first.mu, rtol=1e-6)


def test_evalset_errors_name_the_set(tmp_path):
    with pytest.raises(EvalSetError, match="not found"):
        evalset_id(str(tmp_path / "missing"))
    make_evalset(str(tmp_path / "half"), n=4, size=8)
    storage.delete(str(tmp_path / "half" / "manifest.json"))
    with pytest.raises(EvalSetError, match=r"half: incomplete \(no manifest.json\)"):
        evalset_id(str(tmp_path / "half"))


def _finished_run(uri: str, meta: dict) -> None:
    storage.write_bytes(storage.join(uri, "final", "G.pth"), b"unused here")
    storage.write_json(storage.join(uri, "final", "metadata.json"), meta)


def test_model_without_evalset_is_an_error_naming_it(tmp_path):
    root = str(tmp_path)
    cfg = with_overrides(Config(), [f"storage.root={root}"])
    with_set = layout.run_uri(cfg, "horse-riders")
    without = layout.run_uri(cfg, "cat-lonely")
    _finished_run(with_set, {"run": "horse-riders", "sketch_set": {"name": "riders", "id": "x"}})
    _finished_run(without, {"run": "cat-lonely", "sketch_set": {"name": "lonely", "id": "y"}})
    cfg = with_overrides(cfg, [
        "train.sketch_sets=[{name: riders, evalset: /some/evalset}]",
        f"eval.models=[{{model: {with_set}}}, {{model: {without}}}]",
    ])
    with pytest.raises(BenchmarkError, match="no evaluation set for model\\(s\\) cat-lonely:"):
        resolve_models(cfg)
    # giving it one in the entry resolves both; the other comes from its sketch set's config
    entries = f"[{{model: {with_set}}}, {{model: {without}, evalset: /e2, n: 8}}]"
    cfg = with_overrides(cfg, [f"eval.models={entries}"])
    specs = resolve_models(cfg)
    assert [(s.label, s.evalset, s.sketch_set, s.n) for s in specs] == [
        ("horse-riders", "/some/evalset", "riders", cfg.eval.n_samples), ("cat-lonely", "/e2", "lonely", 8)]


def test_checkpoint_uri_takes_arch_from_its_metadata_or_the_model_config(tmp_path):
    cfg = with_overrides(Config(), [f"storage.root={tmp_path}", "model.size=64", "model.channel_max=16"])
    run = layout.run_uri(cfg, "cat-x")
    _finished_run(run, {"run": "cat-x", "arch": {"size": 32, "style_dim": 8}, "category": "cat"})
    g_uri = storage.join(run, "final", "G.pth")
    cfg = with_overrides(cfg, [f"eval.models=[{{model: {g_uri}, evalset: /e}}]"])
    [spec] = resolve_models(cfg)
    assert (spec.label, spec.category) == ("cat-x", "cat")
    assert spec.source == {"kind": "checkpoint", "uri": g_uri, "arch": {"size": 32, "style_dim": 8}}
    # a bare checkpoint (no metadata beside it) is built with the configured architecture
    bare = str(tmp_path / "weights" / "netG.pth")
    storage.write_bytes(bare, b"x")
    cfg = with_overrides(cfg, [f"eval.models=[{{model: {bare}, evalset: /e}}]"])
    [spec] = resolve_models(cfg)
    assert spec.label == "netG.pth"
    assert spec.source["arch"]["size"] == 64 and spec.source["arch"]["channel_max"] == 16


def test_bad_entries_are_errors_naming_the_entry(tmp_path):
    cfg = with_overrides(Config(), [f"storage.root={tmp_path}"])
    with pytest.raises(BenchmarkError, match="eval.models is empty"):
        resolve_models(cfg)
    bad = with_overrides(cfg, ["eval.models=[{model: x, evalset: e, colour: red}]"])
    with pytest.raises(BenchmarkError, match=r"eval.models\[0\]: unknown key\(s\) colour"):
        resolve_models(bad)
    bad = with_overrides(cfg, ["eval.models=[{model: x, n: 1}]"])
    with pytest.raises(BenchmarkError, match=r"eval.models\[0\].n"):
        resolve_models(bad)
    unfinished = with_overrides(cfg, [f"eval.models=[{{model: {tmp_path}/runs/nope, evalset: e}}]"])
    with pytest.raises(BenchmarkError, match="not a finished training run"):
        resolve_models(unfinished)


class _FakeRegistry:
    """Stands in for pipeline.registry.mlflow_registry's resolve/list/set API (driver side only)."""

    def __init__(self):
        from types import SimpleNamespace

        def model(name, version, category, sketch_set, evalset=None):
            meta = {"category": category, "sketch_set": {"name": sketch_set, "id": "i"}}
            if evalset:
                meta["evalset"] = evalset
            return SimpleNamespace(name=name, version=version, run_uri=f"/runs/{name}",
                                   g_uri=f"/runs/{name}/final/G.pth", arch={"size": 32}, metadata=meta,
                                   model_uri=None)

        self.models = {
            "sketchgan-cat-a": model("sketchgan-cat-a", 3, "cat", "a", "/evalsets/a"),
            "sketchgan-horse-b": model("sketchgan-horse-b", 1, "horse", "b"),
        }
        self.fids = []

    def resolve_model(self, ref, cfg):
        name = ref.removeprefix("models:/").split("@")[0].split("/")[0]
        if name not in self.models:
            raise LookupError(f"no registered model {name}")
        return self.models[name]

    def list_champions(self, cfg):
        return list(self.models.values())

    def set_version_fid(self, name, version, fid, cfg, figures=None):
        self.fids.append((name, version, fid, figures))


def test_registry_refs_and_champions_resolve(tmp_path, monkeypatch):
    import sys

    from pipeline.eval.benchmark import record_version_fids

    fake = _FakeRegistry()
    import pipeline.registry

    monkeypatch.setitem(sys.modules, "pipeline.registry.mlflow_registry", fake)
    # `from pipeline.registry import mlflow_registry` takes the package attribute once the module was imported
    monkeypatch.setattr(pipeline.registry, "mlflow_registry", fake, raising=False)
    cfg = with_overrides(Config(), [f"storage.root={tmp_path}",
                                    "eval.models=[{model: 'models:/sketchgan-cat-a@champion'}]"])
    [spec] = resolve_models(cfg)
    assert (spec.label, spec.version, spec.category, spec.sketch_set, spec.evalset) == (
        "sketchgan-cat-a", "3", "cat", "a", "/evalsets/a")
    assert spec.source == {"kind": "checkpoint", "uri": "/runs/sketchgan-cat-a/final/G.pth",
                           "arch": {"size": 32}}
    # `champions` expands to every model; the horse champion has no evaluation set anywhere -> named
    cfg = with_overrides(cfg, ["eval.models=[{model: champions}]"])
    with pytest.raises(BenchmarkError, match="no evaluation set for model\\(s\\) sketchgan-horse-b v1"):
        resolve_models(cfg)
    cfg = with_overrides(cfg, ["train.sketch_sets=[{name: b, evalset: /evalsets/b}]"])
    specs = resolve_models(cfg)
    assert [s.evalset for s in specs] == ["/evalsets/a", "/evalsets/b"]
    record_version_fids(cfg, specs, [{"fid": 1.5, "recall": 0.5}, {"fid": 2.5, "ppl": 3.0, "kid": 1.0}])
    assert fake.fids == [("sketchgan-cat-a", "3", 1.5, {"recall": 0.5}), ("sketchgan-horse-b", "1", 2.5, {"ppl": 3.0})]


def test_markdown_and_csv_tables():
    from pipeline.eval.report import to_csv, to_markdown

    rows = [{"model": "m|1", "version": "3", "category": "cat", "sketch_set": "s", "n": 10, "fid": 12.345678,
             "kid": 0.0123456, "seconds": 4.56, "evalset": "/e"}]
    md = to_markdown(rows).splitlines()
    assert md[0] == "| model | version | category | sketch set | N | FID | KID ×10³ | seconds |"
    assert md[2] == "| m\\|1 | 3 | cat | s | 10 | 12.3457 | 12.346 | 4.6 |"  # KID as papers print it
    assert to_csv(rows).splitlines()[0] == "model,version,category,sketch_set,n,fid,kid,seconds,evalset"
    rows[0].update(precision=0.25, recall=0.5, sketch_fidelity=0.0312, ppl=123.456, ppl_distance="pixel-mse")
    assert to_markdown(rows).splitlines()[2] == ("| m\\|1 | 3 | cat | s | 10 | 12.3457 | 12.346 | 4.6 | 0.250 | "
                                                 "0.500 | 0.031 | 123.5 | pixel-mse |")



def test_baseline_rows_fill_fid_base_and_the_outputs():
    """Each customised model's row carries the base's FID on that model's own evaluation set."""
    import json

    from pipeline.eval.benchmark import add_baseline_fids
    from pipeline.eval.report import fid_chart, to_csv, to_json, to_markdown

    def row(model, evalset, fid, baseline=False, version=""):
        return {"model": model, "version": version, "category": "shapes", "sketch_set": evalset[-1], "n": 10,
                "fid": fid, "kid": 0.1, "seconds": 1.0, "evalset": evalset, "baseline": baseline}

    rows = [row("tri", "/e/a", 5.0, version="2"), row("circ", "/e/b", 7.0), row("base", "/e/a", 20.0, True),
            row("base", "/e/b", 30.0, True)]
    add_baseline_fids(rows)
    assert [r.get("fid_base") for r in rows] == [20.0, 30.0, None, None]
    md = to_markdown(rows).splitlines()
    assert md[0].endswith("| FID of the base |") and md[2].endswith("| 20.0000 |") and md[4].endswith("|  |")
    assert to_csv(rows).splitlines()[0].endswith(",evalset,fid_base,baseline")
    parsed = json.loads(to_json(rows))
    assert parsed[1]["fid_base"] == 30.0 and parsed[2]["baseline"] is True and parsed[0]["version"] == "2"
    png = fid_chart(rows, "t")
    assert png[:4] == b"\x89PNG"
    # without a baseline the table keeps its columns
    plain = [row("tri", "/e/a", 5.0)]
    plain[0].pop("baseline")
    assert "FID of the base" not in to_markdown(plain) and to_csv(plain).splitlines()[0].endswith(",evalset")


def test_the_baseline_is_scored_once_per_evaluation_set(tmp_path):
    from pipeline.eval.models import resolve_baseline

    cfg = with_overrides(Config(), [f"storage.root={tmp_path}"])
    a, b, base = (layout.run_uri(cfg, n) for n in ("train-a", "train-b", "base"))
    _finished_run(a, {"run_name": "train-a", "sketch_set": {"name": "a"}})
    _finished_run(b, {"run_name": "train-b", "sketch_set": {"name": "b"}})
    _finished_run(base, {"run_name": "base"})
    entries = f"[{{model: {a}, evalset: /e/a, n: 8}}, {{model: {b}, evalset: /e/b}}, {{model: {a}, evalset: /e/a}}]"
    cfg = with_overrides(cfg, [f"eval.models={entries}"])
    assert resolve_baseline(cfg, resolve_models(cfg)) == []  # no eval.baseline, no baseline rows
    cfg = with_overrides(cfg, [f"eval.baseline={base}"])
    baseline = resolve_baseline(cfg, resolve_models(cfg))
    assert [(s.label, s.evalset, s.sketch_set, s.n, s.baseline) for s in baseline] == [
        ("base", "/e/a", "a", 8, True), ("base", "/e/b", "b", cfg.eval.n_samples, True)]
    with pytest.raises(BenchmarkError, match="eval.baseline: name one model"):
        resolve_baseline(with_overrides(cfg, ["eval.baseline=champions"]), resolve_models(cfg))


def test_a_base_folder_is_a_model_too(tmp_path):
    """The committed toy base's folder (G.pth beside metadata.json), as `generate` and `blend` take it."""
    base = REPO / "benchmarks" / "assets" / "shapes_base"
    cfg = with_overrides(Config(), [f"storage.root={tmp_path}", f"eval.models=[{{model: {base}, evalset: /e}}]"])
    [spec] = resolve_models(cfg)
    arch = json.loads((base / "metadata.json").read_text())["arch"]
    assert spec.source == {"kind": "checkpoint", "uri": f"{base}/G.pth", "arch": arch}


def test_evaluation_sets_split_into_disjoint_parts_fixed_by_content(tmp_path):
    from pipeline.data.evalsets import load_evalset

    uri = str(tmp_path / "es")
    images = make_evalset(uri, n=60, seed=3)
    val, test = load_evalset(uri, "validation")[1], load_evalset(uri, "test")[1]
    as_set = lambda arr: {a.tobytes() for a in arr}  # noqa: E731
    assert as_set(val).isdisjoint(as_set(test)) and as_set(val) | as_set(test) == as_set(images)
    assert 15 <= len(val) <= 45  # about half, by hash
    assert np.array_equal(load_evalset(uri, "validation")[1], val)  # the same on every call
    # the same images in another order, in another set: each keeps its part
    table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(uri, "images.parquet"))))
    buf = io.BytesIO()
    pq.write_table(table.take(list(range(59, -1, -1))), buf)
    other = str(tmp_path / "reversed")
    storage.write_bytes(storage.join(other, "images.parquet"), buf.getvalue())
    storage.write_json(storage.join(other, "manifest.json"), {"name": "reversed", "id": "other", "count": 60})
    assert as_set(load_evalset(other, "validation")[1]) == as_set(val)
    # statistics of a part are cached under their own key
    cfg = with_overrides(Config(), [f"storage.root={tmp_path / 'root'}"])
    extractor = RandConvExtractor(seed=0, dim=8, device="cpu")
    parts = {p: reference_stats(cfg, uri, extractor, part=p) for p in ("validation", "test")}
    assert len(parts["validation"].feats) == len(val) and parts["validation"].key != parts["test"].key
    with pytest.raises(ValueError, match="part must be one of"):
        load_evalset(uri, "train")
