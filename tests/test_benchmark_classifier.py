"""The benchmark with a classifier of the category: FID in its features, the share of samples of the sketch set's
target class for each model and the base, and the before/after figure on the same latents."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from overrides import with_overrides
from PIL import Image
from test_benchmark import make_evalset
from test_benchmark_ray import _tiny_run
from tiny_data import write_sketch_set

from pipeline import layout, storage
from pipeline.config import Config
from pipeline.eval.compare import COUNT, LABEL_WIDTH, tile_size

torch.set_num_threads(2)


def _classifier(path: str, calibration: np.ndarray) -> str:
    """A random classifier whose triangle bias is set so that about half of ``calibration`` are triangles."""
    from pipeline.eval.shape_classifier import ShapeClassifier, save_classifier, to_float_batch

    torch.manual_seed(3)
    model = ShapeClassifier(("circle", "square", "triangle"), input_size=32, width=4, feature_dim=8).eval()
    with torch.no_grad():
        model.head.weight.mul_(50)
        logits = model(to_float_batch(calibration))
        margin = logits[:, 2] - logits[:, :2].max(1).values
        model.head.bias[2] -= margin.median()
    save_classifier(model, path)
    return path


def test_classifier_scores_target_share_and_the_figure_shows_before_and_after(tmp_path, ray_local):
    from pipeline.eval.benchmark import benchmark, load_source
    from pipeline.eval.shape_classifier import load_classifier, predict
    from pipeline.models.sampling import generate_batches

    clf = str(tmp_path / "classifier.pt")
    cfg = with_overrides(Config(), [f"storage.root={tmp_path}", "eval.feature_extractor=classifier",
                                    f"eval.classifier={clf}", "eval.batch_size=8", "eval.kid_subsets=3",
                                    "eval.kid_subset_size=12", "eval.name=cls", "eval.cpus_per_actor=1",
                                    "eval.log_mlflow=false"])
    evalset = layout.evalset_uri(cfg, "tri")
    make_evalset(evalset, n=16, seed=1, name="tri")
    sketches = write_sketch_set(layout.sketchset_uri(cfg, "tri-sketches"), n=5, name="tri-sketches")
    base = _tiny_run(cfg, "base", "shapes", evalset, seed=0)
    customised = _tiny_run(cfg, "custom", "shapes", evalset, seed=1)
    def samples(run: str, n: int, batch: int) -> np.ndarray:
        generator = load_source({"kind": "run", "uri": run}, torch.device("cpu"), cfg)
        return np.concatenate(list(generate_batches(generator, n, cfg.eval.seed, 1.0, batch, torch.device("cpu"))))

    _classifier(clf, np.concatenate([samples(base, 20, 8), samples(customised, 20, 8)]))
    meta_uri = layout.final_metadata_uri(customised)
    storage.write_json(meta_uri, {**storage.read_json(meta_uri),
                                  "sketch_set": {"name": "tri-sketches", "id": "sk", "uri": sketches}})
    cfg = with_overrides(cfg, [f"eval.models=[{{model: {customised}, n: 20, sketch_set: tri-sketches, "
                               "target_class: triangle}]", f"eval.baseline={base}"])
    rows = benchmark(cfg)

    # target_share is the share of the very samples scored for FID that the classifier calls a triangle
    classifier = load_classifier(clf)
    for row, run in zip(rows, (customised, base)):
        expected = np.mean([p == "triangle" for p in predict(classifier, samples(run, 20, 8))])
        assert row["target_share"] == pytest.approx(expected)
    assert rows[0]["target_share"] != rows[1]["target_share"]  # the two models' samples are told apart
    assert rows[1]["baseline"] and rows[0]["fid_base"] == rows[1]["fid"]

    out = layout.benchmark_uri(cfg, "cls")
    listed = json.loads(storage.read_text(layout.benchmark_file(out, "json")))
    assert listed[0]["target_share"] == rows[0]["target_share"] and listed[0]["fid_base"] == rows[1]["fid"]
    table = storage.read_text(layout.benchmark_file(out, "markdown"))
    assert "KID ×10³" in table and "target share" in table
    assert f"{rows[0]['kid'] * 1000:.3f}" in table

    # the figure: a row of sketches, then the base, then the customised model, tiles of at least 96 px, and
    # the model rows show the benchmark's first samples (the same latents for both models)
    with Image.open(io.BytesIO(storage.read_bytes(layout.benchmark_file(out, "compare")))) as fig:
        figure = np.asarray(fig.convert("RGB"))
    tile = tile_size(32)
    assert tile >= 96
    assert figure.shape[0] == 3 * (tile + 4) and figure.shape[1] == LABEL_WIDTH + COUNT * (tile + 4)
    for r, run in ((1, base), (2, customised)):
        first = samples(run, COUNT, COUNT)
        y0, x0 = r * (tile + 4), LABEL_WIDTH
        shown = figure[y0:y0 + tile:tile // 32, x0:x0 + tile:tile // 32]
        assert np.array_equal(shown, first[0])
    sketch_tile = figure[0:tile:tile // 32, LABEL_WIDTH:LABEL_WIDTH + tile:tile // 32]
    assert (sketch_tile < 128).any() and (sketch_tile > 128).any()  # strokes on paper


def test_classifier_extractor_needs_its_file(tmp_path):
    from pipeline.eval.features import FeatureExtractorError, build_extractor

    cfg = with_overrides(Config(), ["eval.feature_extractor=classifier"])
    with pytest.raises(FeatureExtractorError, match="needs eval.classifier"):
        build_extractor(cfg.eval)
    missing = tmp_path / "nope.pt"
    cfg = with_overrides(cfg, [f"eval.classifier={missing}"])
    with pytest.raises(FeatureExtractorError, match=f"{missing}: no such file"):
        build_extractor(cfg.eval)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    cfg = with_overrides(cfg, [f"eval.classifier={tmp_path / 'bad.pt'}"])
    with pytest.raises(FeatureExtractorError, match="bad.pt: not a classifier"):
        build_extractor(cfg.eval)
