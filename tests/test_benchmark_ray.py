"""The benchmark end to end in Ray: tiny generators in finished runs, two categories, MLflow, cache reuse."""

from __future__ import annotations

import io
import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from overrides import with_overrides
from PIL import Image
from test_benchmark import make_evalset
from tiny_data import write_sketch_set

from pipeline import layout, storage
from pipeline.config import Config
from pipeline.data.sketchsets import load_sketch_set
from pipeline.eval import metrics
from pipeline.eval.fid import extract_features
from pipeline.models.sketchers import EdgeSketcher

torch.set_num_threads(2)


def _tiny_run(cfg: Config, name: str, category: str, evalset: str, seed: int) -> str:
    """A finished training run in the contract layout holding a tiny random generator."""
    from pipeline.config import ModelConfig
    from pipeline.models import factory

    arch = factory.generator_kwargs(ModelConfig(size=32, style_dim=16, n_mlp=1, channel_multiplier=1,
                                                channel_max=8))
    torch.manual_seed(seed)
    generator = factory.build_generator(arch)
    buf = io.BytesIO()
    torch.save(generator.state_dict(), buf)
    uri = layout.run_uri(cfg, name)
    storage.write_bytes(storage.join(uri, "final", "G.pth"), buf.getvalue())
    storage.write_json(storage.join(uri, "final", "metadata.json"), {
        "run": name, "kind": "train", "arch": arch, "category": category, "evalset": evalset,
        "sketch_set": {"name": f"{category}-sketches", "id": "sketch-id"}, "iterations": 1,
        "finished_at": "2026-01-01T00:00:00Z"})
    return uri


def test_benchmark_over_run_uris_in_ray(tmp_path, ray_local, caplog, capsys):
    import yaml

    from pipeline import cli
    from pipeline.eval.benchmark import benchmark, load_source
    from pipeline.eval.features import build_extractor
    from pipeline.eval.fid import fid_from_features
    from pipeline.eval.refstats import load_evalset_images
    from pipeline.models.sampling import generate_batches

    cfg = with_overrides(Config(), [f"storage.root={tmp_path}", "eval.feature_extractor=randconv:0:6",
                                    "eval.batch_size=8", "eval.kid_subsets=3", "eval.kid_subset_size=12",
                                    "eval.name=tiny", "eval.cpus_per_actor=1"])
    cats = layout.evalset_uri(cfg, "cats")
    horses = layout.evalset_uri(cfg, "horses")
    make_evalset(cats, n=16, seed=1, name="cats")
    make_evalset(horses, n=16, seed=2, name="horses")
    run_a = _tiny_run(cfg, "cat-a", "cat", cats, seed=0)
    run_b = _tiny_run(cfg, "horse-b", "horse", horses, seed=1)
    cfg = with_overrides(cfg, [f"eval.models=[{{model: {run_a}, n: 12}}, {{model: {run_b}, n: 10}}]",
                               "train.sketch_sets=[{name: cat-sketches}]", "eval.ppl_samples=16",
                               "eval.fidelity_samples=5"])
    write_sketch_set(layout.sketchset_uri(cfg, "cat-sketches"), n=3, name="cat-sketches")  # horse-b has none

    with caplog.at_level(logging.INFO, logger="pipeline.eval"):
        rows = benchmark(cfg)
    assert caplog.text.count("computing reference statistics") == 2 and "reusing" not in caplog.text

    out = layout.benchmark_uri(cfg, "tiny")
    table = pq.read_table(storage.join(out, "results.parquet")).to_pylist()
    assert [(r["model"], r["category"], r["sketch_set"], r["n"]) for r in table] == [
        ("cat-a", "cat", "cat-sketches", 12), ("horse-b", "horse", "horse-sketches", 10)]
    assert all(np.isfinite(r["fid"]) and r["fid"] > 0 and r["seconds"] > 0 for r in table)
    assert storage.read_text(storage.join(out, "results.csv")).startswith("model,version,category")
    assert "| cat-a |" in storage.read_text(storage.join(out, "results.md"))
    with Image.open(io.BytesIO(storage.read_bytes(storage.join(out, "fid.png")))) as chart:
        assert chart.format == "PNG" and chart.width > 100

    # The actor's FID equals one computed here from the same seeded samples, features and evaluation set.
    extractor = build_extractor(cfg.eval, torch.device("cpu"))
    generator = load_source({"kind": "run", "uri": run_a}, torch.device("cpu"), cfg)
    fake = extract_features(generate_batches(generator, 12, cfg.eval.seed, 1.0, 8, torch.device("cpu")),
                            extractor)
    real = extract_features(load_evalset_images(cats, "test"), extractor)  # the benchmark reports the test part
    assert rows[0]["fid"] == pytest.approx(fid_from_features(fake, real), rel=1e-6)
    # ... and so do precision and recall (k = 3), the path length and the sketch fidelity
    assert (rows[0]["precision"], rows[0]["recall"]) == pytest.approx(metrics.precision_recall(real, fake, k=3))
    assert rows[0]["ppl_distance"] == "pixel-mse" and rows[0]["ppl"] == pytest.approx(metrics.path_length(
        generator.get_latent, lambda w: generator([w], input_is_latent=True, randomize_noise=False)[0],
        lambda a, b: (a - b).pow(2).flatten(1).mean(1), generator.style_dim, n=16, batch=8), rel=1e-6)
    images = next(generate_batches(generator, 12, cfg.eval.seed, 1.0, 8, torch.device("cpu")))[:5]
    with torch.no_grad():
        drawn = EdgeSketcher()(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    drawn = ((drawn[:, 0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    user = load_sketch_set(layout.sketchset_uri(cfg, "cat-sketches"))[1]
    assert rows[0]["sketch_fidelity"] == pytest.approx(metrics.sketch_fidelity(drawn, user))
    assert "sketch_fidelity" not in rows[1] and 0 <= rows[1]["precision"] <= 1

    # Logged to MLflow as a benchmark run with one FID per model.
    from pipeline.registry import tracking

    client = tracking.client(cfg)
    runs = client.search_runs([client.get_experiment_by_name(cfg.registry.experiment).experiment_id],
                              "tags.`sketchgan.kind` = 'benchmark'")
    assert len(runs) == 1
    assert runs[0].data.metrics["fid.cat-a"] == pytest.approx(rows[0]["fid"])
    assert runs[0].data.metrics["fid.horse-b"] == pytest.approx(rows[1]["fid"])
    assert runs[0].data.metrics["recall.cat-a"] == pytest.approx(rows[0]["recall"])

    # Register run A as a model version, then delete run A's weights: the benchmark must score the version's own.
    from pipeline.registry import mlflow_registry

    name, version = mlflow_registry.register_run(cfg, run_a)
    assert str(client.get_model_version_by_alias(name, cfg.registry.champion_alias).version) == version
    storage.delete(storage.join(run_a, "final", "G.pth"))

    # Second run through the CLI, over `champions` and run B: the reference statistics are reused, the
    # champion (run A's weights) scores what run A scored, and its FID lands on the model version.
    # With VGG-16 weights, precision and recall use its fc2 features (a seeded random VGG here).
    import torchvision

    from pipeline.eval.vgg import VGG16Features
    from pipeline.models.checkpoints import save_state_dict

    torch.manual_seed(0)
    save_state_dict(torchvision.models.vgg16(weights=None), tmp_path / "vgg16.pth")
    cfg = with_overrides(cfg, [f"eval.models=[{{model: champions, n: 12}}, {{model: {run_b}, n: 10}}]",
                               f"eval.vgg_weights={tmp_path / 'vgg16.pth'}"])
    config_file = tmp_path / "bench.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.eval"):
        assert cli.main(["benchmark", "--config", str(config_file)]) == 0
    assert caplog.text.count("reusing cached reference statistics") == 2
    assert "computing reference statistics" not in caplog.text
    again = pq.read_table(storage.join(out, "results.parquet")).to_pylist()
    assert [(r["model"], r["version"], r["category"]) for r in again] == [
        (name, version, "cat"), ("horse-b", "", "horse")]
    assert [r["fid"] for r in again] == pytest.approx([r["fid"] for r in table], rel=1e-9)
    vgg = VGG16Features(str(tmp_path / "vgg16.pth"))
    fake_images = np.concatenate(list(generate_batches(generator, 12, cfg.eval.seed, 1.0, 8, torch.device("cpu"))))
    want = metrics.precision_recall(vgg(load_evalset_images(cats, "test")), vgg(fake_images), k=3)
    assert (again[0]["precision"], again[0]["recall"]) == pytest.approx(want, abs=1e-9)
    tags = client.get_model_version(name, version).tags
    assert float(tags[mlflow_registry.TAG_FID]) == pytest.approx(rows[0]["fid"], rel=1e-9)
    for key in ("precision", "recall", "ppl", "sketch_fidelity"):  # the version carries every figure
        assert float(tags[key]) == pytest.approx(rows[0][key], rel=1e-9), key
    listed = "\n".join(mlflow_registry.model_lines(cfg))
    assert f"sketch_fidelity: v{version}=" in listed and f"precision: v{version}=" in listed
    assert f"| {name} | {version} |" in capsys.readouterr().out
