"""The training loop without Ray (bit-exact resume, data streams, checkpoints) and the driver-side checks that
refuse bad inputs before any worker starts."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from tiny_data import write_pairs_dataset, write_random_base, write_sketch_set

from pipeline import layout, storage
from pipeline.config import load_config
from pipeline.train import loop, raytrain, run_store, streams
from pipeline.train import plan as planning
from pipeline.train.spec import RunSpec

REPO = Path(__file__).resolve().parents[1]


def make_base(root: Path, cfg) -> tuple[str, str]:
    return write_random_base(root, cfg.model, seed=7)


def tiny_cfg(root: Path, *overrides: str):
    return load_config(REPO / "configs" / "tiny.yaml", [f"storage.root={root}", *overrides])


@pytest.fixture
def setup(tmp_path):
    torch.set_num_threads(1)
    write_pairs_dataset(str(tmp_path / "datasets" / "shapes"), n=24)
    write_sketch_set(str(tmp_path / "sketchsets" / "tri"), n=3)
    cfg = tiny_cfg(tmp_path)
    g, d = make_base(tmp_path, cfg)
    return tmp_path, g, d


def bare_epochs(dataset_uri: str, batch: int, seed: int = 0):
    """A plain (Ray-free) epoch reader: the same contract as a Ray Data shard's iter_batches."""
    table = pq.read_table(io.BytesIO(storage.read_bytes(storage.list_files(dataset_uri, ".parquet")[0])))
    blobs = table.column("image").to_pylist()

    def make_epoch(epoch: int):
        order = torch.randperm(len(blobs), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        for i in range(0, len(order) - batch + 1, batch):
            yield {"image": [blobs[j] for j in order[i:i + batch]]}

    return make_epoch


def sketches_of(uri: str, size: int = 32) -> torch.Tensor:
    return streams.decode_png_batch(layout.read_sketch_set(uri).blobs, 1, size)


def spec_for(root: Path, cfg, run: str) -> RunSpec:
    return RunSpec(kind="train", run_name=run, run_uri=str(root / "runs" / run),
                        cfg=cfg, sketch_set={"name": "tri", "id": "x"})


def test_bare_loop_stopped_and_resumed_matches_straight_run(setup):
    root, g, d = setup
    common = [f"model.base_g={g}", f"model.base_d={d}", "train.batch_size=8", "train.checkpoint_every=2",
              "train.log_every=2", "train.sample_every=100", "train.r1_every=2"]
    make_epoch = bare_epochs(str(root / "datasets" / "shapes"), 8)  # 3 batches per epoch: resume crosses epochs
    sk = sketches_of(str(root / "sketchsets" / "tri"))

    straight = tiny_cfg(root, *common, "train.iterations=5")
    loop.run_worker(spec_for(root, straight, "straight"), make_epoch, sk, device=torch.device("cpu"))

    first = tiny_cfg(root, *common, "train.iterations=4")
    loop.run_worker(spec_for(root, first, "resumed"), make_epoch, sk, device=torch.device("cpu"))
    ckpt = run_store.load_checkpoint(run_store.latest_checkpoint(str(root / "runs" / "resumed")))
    assert ckpt["iteration"] == 4 and ckpt["data_position"] == {"epoch": 1, "index": 1}
    loop.run_worker(spec_for(root, straight, "resumed"), make_epoch, sk, device=torch.device("cpu"))

    a = torch.load(root / "runs" / "straight" / "final" / "G.pth", weights_only=True)
    b = torch.load(root / "runs" / "resumed" / "final" / "G.pth", weights_only=True)
    assert a.keys() == b.keys()
    changed = [k for k in a if k.startswith("style.")]
    base = torch.load(g, weights_only=True)
    assert any(not torch.equal(a[k], base[k]) for k in changed), "training did not change the mapping network"
    for k in a:
        assert torch.equal(a[k], b[k]), k
    meta = storage.read_json(str(root / "runs" / "resumed" / "final" / "metadata.json"))
    assert meta["resumed_at"] == [4] and meta["iterations"] == 5


def test_several_workers_without_a_process_group_are_refused(setup):
    root, g, d = setup
    cfg = tiny_cfg(root, f"model.base_g={g}", f"model.base_d={d}", "train.batch_size=8")
    with pytest.raises(RuntimeError, match="2 workers but no torch.distributed process group"):
        loop.run_worker(spec_for(root, cfg, "split"), bare_epochs(str(root / "datasets" / "shapes"), 4),
                        sketches_of(str(root / "sketchsets" / "tri")), world_size=2, device=torch.device("cpu"))
    assert not (root / "runs" / "split").exists()  # refused before anything was written


def test_a_run_with_an_ema_publishes_the_average_not_the_last_weights(setup):
    root, g, d = setup
    cfg = tiny_cfg(root, f"model.base_g={g}", f"model.base_d={d}", "train.batch_size=8", "train.iterations=3",
                   "train.checkpoint_every=3", "train.sample_every=100", "train.trained=all",
                   "train.ema_half_life_kimg=0.02")
    loop.run_worker(spec_for(root, cfg, "ema"), bare_epochs(str(root / "datasets" / "shapes"), 8),
                    sketches_of(str(root / "sketchsets" / "tri")), device=torch.device("cpu"))
    published = torch.load(root / "runs" / "ema" / "final" / "G.pth", weights_only=True)
    state = run_store.load_checkpoint(run_store.latest_checkpoint(str(root / "runs" / "ema")))["step"]
    for k in published:
        assert torch.equal(published[k], state["G_ema"][k]), k
    assert any(not torch.equal(published[k], state["G"][k]) for k in published), "published the last weights"


def test_image_stream_resumes_at_its_position():
    def make_epoch(epoch):
        for i in range(3):
            yield {"image": [_png(epoch * 10 + i)]}

    s = streams.ImageStream(make_epoch, size=4, batch=1)
    seen = [_value(next(s)) for _ in range(5)]
    assert seen == [0, 1, 2, 10, 11]
    again = streams.ImageStream(make_epoch, size=4, batch=1, **s.position())
    assert [_value(next(again)) for _ in range(3)] == [12, 20, 21]


def test_image_stream_refuses_a_dataset_smaller_than_a_batch():
    s = streams.ImageStream(lambda epoch: iter(()), size=4, batch=8)
    with pytest.raises(ValueError, match="fewer rows per worker than one batch"):
        next(s)


def _png(v: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (v, v, v)).save(buf, format="PNG")
    return buf.getvalue()


def _value(x: torch.Tensor) -> int:
    return round((x[0, 0, 0, 0].item() + 1) * 127.5)


@pytest.mark.reliability
def test_small_sketch_set_is_sampled_with_replacement_with_a_warning_naming_it(caplog):
    sk = torch.arange(2).float().view(2, 1, 1, 1)
    with caplog.at_level(logging.WARNING, logger="sketchgan.train"):
        s = streams.SketchSampler(sk, "one-cat", batch=5)
    assert "one-cat" in caplog.text and "replacement" in caplog.text
    batch = s.sample(torch.Generator().manual_seed(0))
    assert batch.shape[0] == 5 and set(batch.flatten().tolist()) <= {0.0, 1.0}
    big = streams.SketchSampler(torch.arange(6).float().view(6, 1, 1, 1), "six", batch=6)
    assert sorted(big.sample(torch.Generator().manual_seed(0)).flatten().tolist()) == list(range(6))
    with pytest.raises(ValueError, match="'none'.*empty"):
        streams.SketchSampler(torch.zeros(0, 1, 1, 1), "none", batch=2)


def test_checkpoints_rotate_and_publish_latest(tmp_path):
    run = str(tmp_path / "run")
    for it in (2, 4, 6, 8):
        run_store.save_checkpoint(run, it, {"iteration": it, "x": torch.tensor([it])}, keep=2)
    names = [u.rsplit("/", 1)[-1] for u in storage.list_files(run + "/checkpoints", ".pt")]
    assert names == ["ckpt-00000006.pt", "ckpt-00000008.pt"]
    assert run_store.load_checkpoint(run_store.latest_checkpoint(run))["iteration"] == 8
    run_store.save_checkpoint(run, 4, {"iteration": 4}, keep=2, name="best")
    assert storage.read_json(run + "/checkpoints/best.json")["iteration"] == 4
    assert run_store.load_checkpoint(run_store.latest_checkpoint(run))["iteration"] == 8


# -- validation before any worker starts -----------------------------------------------------------------
@pytest.fixture
def no_workers(monkeypatch):
    """Fail the test if anything tries to prepare data or start a trainer."""
    def boom(*a, **k):
        raise AssertionError("a worker would have started")

    monkeypatch.setattr(raytrain, "prepare_run_inputs", boom)
    monkeypatch.setattr(raytrain, "trainer_for", boom)


@pytest.mark.reliability
def test_missing_sketch_set_is_refused_by_name(setup, no_workers):
    root, g, d = setup
    # two sets that would train in one packed group: the missing one is refused by name before any group starts
    cfg = tiny_cfg(root, f"model.base_g={g}", f"model.base_d={d}", "train.pack=2",
                   "train.sketch_sets=[{name: tri}, {name: horse-ears}]")
    with pytest.raises(planning.TrainingInputError, match="sketch set 'horse-ears' not found"):
        raytrain.train_all(cfg)


@pytest.mark.reliability
def test_empty_sketch_set_is_refused_by_name(setup, no_workers):
    root, g, d = setup
    write_sketch_set(str(root / "sketchsets" / "blank"), n=0, name="blank")
    cfg = tiny_cfg(root, f"model.base_g={g}", f"model.base_d={d}", "train.sketch_sets=[{name: blank}]")
    with pytest.raises(planning.TrainingInputError, match="sketch set 'blank'.*empty"):
        raytrain.train_all(cfg)


@pytest.mark.reliability
def test_unreadable_base_checkpoint_is_refused_by_name(setup, no_workers):
    root, g, d = setup
    bad = root / "garbage.pth"
    bad.write_bytes(b"not a checkpoint at all")
    cfg = tiny_cfg(root, f"model.base_g={bad}", f"model.base_d={d}", "train.sketch_sets=[{name: tri}]")
    with pytest.raises(planning.TrainingInputError, match=r"model\.base_g.*garbage\.pth"):
        raytrain.train_all(cfg)
    cfg = tiny_cfg(root, f"model.base_g={g}", f"model.base_d={root / 'nope.pth'}", "train.sketch_sets=[{name: tri}]")
    with pytest.raises(planning.TrainingInputError, match=r"model\.base_d.*nope\.pth.*does not exist"):
        raytrain.train_all(cfg)


@pytest.mark.reliability
def test_mismatched_base_checkpoint_lists_the_differences(setup, no_workers):
    root, g, d = setup
    cfg = tiny_cfg(root, f"model.base_g={g}", f"model.base_d={d}", "model.style_dim=32",
                   "train.sketch_sets=[{name: tri}]")
    with pytest.raises(planning.TrainingInputError, match=r"(?s)model\.base_g.*netG\.pth.*mis-shaped keys"):
        raytrain.train_all(cfg)


def test_missing_dataset_and_indivisible_batch_are_refused(setup, no_workers):
    root, g, d = setup
    cfg = tiny_cfg(root, f"model.base_g={g}", f"model.base_d={d}", "train.sketch_sets=[{name: tri}]",
                   "data.category=horse")
    with pytest.raises(planning.TrainingInputError, match="datasets/horse is missing"):
        raytrain.train_all(cfg)
    cfg = tiny_cfg(root, f"model.base_g={g}", f"model.base_d={d}", "train.sketch_sets=[{name: tri}]",
                   "train.num_workers=3")
    with pytest.raises(planning.TrainingInputError, match="batch_size 8 is not divisible by train.num_workers 3"):
        raytrain.train_all(cfg)
    with pytest.raises(planning.TrainingInputError, match="datasets/horse is missing"):
        raytrain.pretrain(tiny_cfg(root, "data.category=horse"))


def test_continuing_a_run_with_other_settings_is_refused(setup, no_workers):
    root, g, d = setup
    cfg = tiny_cfg(root, f"model.base_g={g}", f"model.base_d={d}", "train.sketch_sets=[{name: tri}]")
    run = root / "runs" / "train-tri"
    run_store.save_checkpoint(str(run), 2, {"iteration": 2}, keep=1)
    other = tiny_cfg(root, f"model.base_g={g}", f"model.base_d={d}", "train.sketch_sets=[{name: tri}]",
                     "train.lr=0.01")
    storage.write_json(str(run / "run.json"), {"kind": "train", "config": other.model_dump(mode="json"),
                                               "sketch_set": {"name": "tri"}})
    with pytest.raises(planning.TrainingInputError, match=r"train\.lr: 0\.01 -> 0\.002"):
        raytrain.train_all(cfg)
    with pytest.raises(planning.TrainingInputError, match="cannot resume run 'train-nothing'"):
        raytrain.train_all(tiny_cfg(root, f"model.base_g={g}", f"model.base_d={d}", "train.resume=train-nothing"))


def test_settings_a_run_predates_count_as_their_defaults():
    """A run recorded before a setting existed continues when the setting is at its default, not otherwise."""
    new = load_config(None).model_dump(mode="json")
    old = load_config(None).model_dump(mode="json")
    del old["pretrain"]["num_workers"]
    assert planning.config_differences(old, new, "pretrain") == []
    new["pretrain"]["num_workers"] = 2
    assert planning.config_differences(old, new, "pretrain") == ["pretrain.num_workers: 1 -> 2"]


def test_a_run_whose_validation_fid_peaks_early_registers_the_early_generator(setup, monkeypatch):
    """FID at intervals (scripted here: 5, 2, 3, 4 at iterations 2, 4, 6, 8) keeps the best generator beside the
    last; registration takes the best (iteration 4, the same weights as a straight 4-iteration run) by default,
    the last with registry.checkpoint=last, and the champion follows validation FID."""
    from dataclasses import replace

    from pipeline.models.checkpoints import load_state_dict, sha256_of
    from pipeline.registry import mlflow_registry, tracking
    from pipeline.train import evaluate

    root, g, d = setup
    scripted = iter([5.0, 2.0, 3.0, 4.0])

    class ScriptedFid:
        def __init__(self, cfg, evalset_uri, device):
            assert evalset_uri == "/evalset/validation-part-is-read-by-the-real-one"

        def __call__(self, G):
            return next(scripted)

    monkeypatch.setattr(evaluate, "FidEvaluator", ScriptedFid)
    cfg = tiny_cfg(root, f"model.base_g={g}", f"model.base_d={d}", "train.iterations=8", "train.batch_size=4",
                   "train.eval_every=2", "train.checkpoint_every=4", "train.log_every=2")
    make_epoch = bare_epochs(str(root / "datasets" / "shapes"), 4)
    sk = sketches_of(str(root / "sketchsets" / "tri"))
    spec = replace(spec_for(root, cfg, "peaks"), evalset_uri="/evalset/validation-part-is-read-by-the-real-one")
    loop.run_worker(spec, make_epoch, sk, device=torch.device("cpu"))
    short = tiny_cfg(root, f"model.base_g={g}", f"model.base_d={d}", "train.iterations=4", "train.batch_size=4",
                     "train.checkpoint_every=4", "train.log_every=2")
    loop.run_worker(spec_for(root, short, "four"), make_epoch, sk, device=torch.device("cpu"))

    run = layout.open_finished_run(spec.run_uri)
    best_g = layout.final_uri(spec.run_uri, layout.G_BEST_FILE)
    assert run.metadata["best"] == {"fid": 2.0, "iteration": 4, "g_sha256": sha256_of(best_g)}
    early, four = load_state_dict(best_g), load_state_dict(layout.final_uri(str(root / "runs" / "four"), "G.pth"))
    assert all(torch.equal(early[k], four[k]) for k in four), "the kept best is not the iteration-4 generator"
    assert sha256_of(best_g) != run.metadata["g_sha256"]  # the last one differs

    name, version = mlflow_registry.register_run(cfg, spec.run_uri)
    client = tracking.client(cfg)
    tags = client.get_model_version(name, version).tags
    assert tags["sketchgan.checkpoint"] == "best@4" and float(tags["fid_validation"]) == 2.0
    assert "fid" not in tags  # the benchmark's (test part) FID comes later, from the benchmark
    got = mlflow_registry.resolve_model(f"models:/{name}/{version}", cfg).load_generator(cfg, "cpu").state_dict()
    assert all(torch.equal(got[k], early[k]) for k in early)
    last_name, last_version = mlflow_registry.register_run(
        tiny_cfg(root, f"model.base_g={g}", "registry.checkpoint=last"), spec.run_uri)
    assert (last_name, last_version) == (name, str(int(version) + 1))
    last_tags = client.get_model_version(name, last_version).tags
    assert last_tags["sketchgan.checkpoint"] == "last@8" and float(last_tags["fid_validation"]) == 4.0
    # the champion is chosen by validation FID (2.0 beats 4.0), whatever a benchmark later says of the test part
    assert str(client.get_model_version_by_alias(name, "champion").version) == version
    mlflow_registry.set_version_fid(name, last_version, 0.1, cfg)
    assert str(client.get_model_version_by_alias(name, "champion").version) == version
