"""A packed group's loop without Ray: each set's run folder holds what a separate run's holds, a set's
checkpoint continues as a separate run, and a group killed mid-run (even between two sets' checkpoints)
resumes every set exactly where an uninterrupted group would be. Grouping and `train.pack` on the driver."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train_loop import bare_epochs, sketches_of, tiny_cfg
from tiny_data import write_pairs_dataset, write_random_base, write_sketch_set

from pipeline import layout, storage
from pipeline.train import loop, packed_loop, run_store
from pipeline.train import plan as planning
from pipeline.train.spec import RunSpec

CPU = torch.device("cpu")
SETS = ("tri", "sq")


@pytest.fixture
def world(tmp_path):
    torch.set_num_threads(1)
    write_pairs_dataset(str(tmp_path / "datasets" / "shapes"), n=24)
    for i, name in enumerate(SETS):
        write_sketch_set(str(tmp_path / "sketchsets" / name), n=3, name=name, seed=1 + 10 * i)
    g, d = write_random_base(tmp_path, tiny_cfg(tmp_path).model, seed=7)
    common = [f"model.base_g={g}", f"model.base_d={d}", "train.batch_size=8", "train.checkpoint_every=2",
              "train.log_every=2", "train.sample_every=2", "train.r1_every=2", "train.keep_checkpoints=1"]
    return tmp_path, common


def specs_for(root: Path, cfg, prefix: str, sets=SETS) -> list[RunSpec]:
    return [RunSpec(kind="train", run_name=f"{prefix}-{s}", run_uri=str(root / "runs" / f"{prefix}-{s}"), cfg=cfg,
                    sketch_set={"name": s, "id": f"id-{s}"}, base_g_sha256="same") for s in sets]


def run_group(root: Path, cfg, prefix: str, **kwargs) -> dict:
    sketches = [sketches_of(str(root / "sketchsets" / s)) for s in SETS]
    return packed_loop.run_packed_worker(specs_for(root, cfg, prefix), bare_epochs(str(root / "datasets" / "shapes"),
                                         8), sketches, device=CPU, **kwargs)


def files_below(run_uri: str) -> list[str]:
    return sorted(str(Path(f).relative_to(run_uri)) for f in storage.list_files(run_uri))


def final_g(run_uri: str) -> dict[str, torch.Tensor]:
    return torch.load(layout.final_uri(run_uri, layout.G_FILE), weights_only=True)


def test_each_set_of_a_group_leaves_a_separate_run_s_files(world):
    root, common = world
    cfg = tiny_cfg(root, *common, "train.iterations=4")
    finals = run_group(root, cfg, "packed")
    assert sorted(finals) == ["packed-sq", "packed-tri"] and all(m["iteration"] == 4 for m in finals.values())
    loop.run_worker(specs_for(root, cfg, "alone", ("tri",))[0], bare_epochs(str(root / "datasets" / "shapes"), 8),
                    sketches_of(str(root / "sketchsets" / "tri")), device=CPU)
    alone, packed = str(root / "runs" / "alone-tri"), str(root / "runs" / "packed-tri")
    # the same files (checkpoints 4 only: keep_checkpoints=1; samples 0, 2, 4; metrics; final output)
    assert files_below(packed) == files_below(alone) == files_below(str(root / "runs" / "packed-sq"))
    assert layout.read_metrics(packed)[-1].keys() == layout.read_metrics(alone)[-1].keys()
    a, b = (storage.read_json(layout.final_metadata_uri(u)) for u in (alone, packed))
    assert a.keys() == b.keys() and b["sketch_set"]["name"] == "tri" and b["iterations"] == 4
    # the same training, up to float32 rounding of the batched passes (measured: at most 7.6e-6 after 4 steps)
    ga, gb = final_g(alone), final_g(packed)
    assert all((ga[k] - gb[k]).abs().max() < 1e-4 for k in ga)
    base = torch.load(cfg.model.base_g, weights_only=True)
    assert any(not torch.equal(gb[k], base[k]) for k in gb if k.startswith("style."))
    assert any(not torch.equal(gb[k], final_g(str(root / "runs" / "packed-sq"))[k]) for k in gb)
    # a set's checkpoint continues as a separate run, from where the group left it
    more = tiny_cfg(root, *common, "train.iterations=6")
    loop.run_worker(specs_for(root, more, "packed", ("sq",))[0], bare_epochs(str(root / "datasets" / "shapes"), 8),
                    sketches_of(str(root / "sketchsets" / "sq")), device=CPU)
    meta = storage.read_json(layout.final_metadata_uri(str(root / "runs" / "packed-sq")))
    assert meta["resumed_at"] == [4] and meta["iterations"] == 6


def test_a_group_killed_between_two_sets_checkpoints_resumes_every_set_bit_for_bit(world, monkeypatch):
    root, common = world
    cfg = tiny_cfg(root, *common, "train.iterations=6")
    run_group(root, cfg, "straight")

    real_save, saved = run_store.save_checkpoint, []

    def dies_after_one_set_at_4(run_uri, iteration, state, keep, name=None, rotate=True):
        if iteration == 4 and saved:
            raise KeyboardInterrupt("killed")  # the process dies: the other set's checkpoint 4 is never written
        if iteration == 4:
            saved.append(run_uri)
        return real_save(run_uri, iteration, state, keep, name=name, rotate=rotate)

    monkeypatch.setattr(run_store, "save_checkpoint", dies_after_one_set_at_4)
    with pytest.raises(KeyboardInterrupt):
        run_group(root, cfg, "killed")
    monkeypatch.setattr(run_store, "save_checkpoint", real_save)
    specs = specs_for(root, cfg, "killed")
    # one set has checkpoint 4, the other only 2; with keep_checkpoints=1 the first still has 2 as well
    assert sorted(run_store.checkpoint_iteration(s.run_uri) for s in specs) == [2, 4]
    assert packed_loop.group_start(specs) == 2
    run_group(root, cfg, "killed")
    for s in SETS:
        a, b = final_g(str(root / "runs" / f"straight-{s}")), final_g(str(root / "runs" / f"killed-{s}"))
        assert all(torch.equal(a[k], b[k]) for k in a), s
        meta = storage.read_json(layout.final_metadata_uri(str(root / "runs" / f"killed-{s}")))
        assert meta["resumed_at"] == [2]
        assert [r["iteration"] for r in layout.read_metrics(str(root / "runs" / f"killed-{s}"))] == [2, 4, 6]
        # only the last checkpoint is kept once every set has it
        assert [Path(u).name for u in storage.list_files(str(root / "runs" / f"killed-{s}" / "checkpoints"),
                                                         ".pt")] == [Path(layout.checkpoint_uri("", 6)).name]


def test_groups_hold_runs_of_one_base_and_start_in_near_equal_sizes(world):
    root, common = world
    cfg = tiny_cfg(root, *common)
    plans = [planning.RunPlan(spec, "new", None) for spec in specs_for(root, cfg, "g", [f"s{i}" for i in range(7)])]
    assert [len(g) for g in planning.pack_groups(plans, 3)] == [2, 3, 2]
    assert [len(g) for g in planning.pack_groups(plans, 8)] == [7]
    other = specs_for(root, cfg, "h", ["x", "y"])
    other[1].base_g_sha256 = "another base"
    mixed = planning.pack_groups([planning.RunPlan(s, "new", None) for s in other], 8)
    assert [[p.run_name for p in g] for g in mixed] == [["h-x"], ["h-y"]]
    arch = tiny_cfg(root, *common, "model.channel_max=16")
    assert planning.pack_key(specs_for(root, arch, "a")[0]) != planning.pack_key(specs_for(root, cfg, "a")[0])


def test_train_pack_packs_what_can_be_and_refuses_what_cannot(world, monkeypatch):
    from pipeline.train import raytrain

    root, common = world
    assert planning.pack_size(tiny_cfg(root, *common, "train.pack=3")) == 3
    assert planning.pack_size(tiny_cfg(root, *common)) == 4  # auto on a CPU, and per whole GPU
    assert planning.pack_size(tiny_cfg(root, *common, "train.use_gpu=true")) == 4
    assert planning.pack_size(tiny_cfg(root, *common, "train.use_gpu=true", "train.gpus_per_worker=0.5")) == 2
    assert planning.pack_size(tiny_cfg(root, *common, "train.use_gpu=true", "train.gpus_per_worker=0.1")) == 1
    assert planning.pack_size(tiny_cfg(root, *common, "train.trained=all")) == 1  # auto: nothing to pack
    with pytest.raises(planning.TrainingInputError, match="train.pack=2 cannot be used: train.trained='all'"):
        planning.pack_size(tiny_cfg(root, *common, "train.trained=all", "train.pack=2"))
    with pytest.raises(planning.TrainingInputError, match="train.num_workers=2: a packed group trains on one"):
        planning.pack_size(tiny_cfg(root, *common, "train.num_workers=2", "train.pack=2"))

    def no_ray():
        raise AssertionError("Ray would have started")

    monkeypatch.setattr(raytrain, "ensure_ray", no_ray)  # refused by `train` before Ray starts
    with pytest.raises(planning.TrainingInputError, match="train.pack=2 cannot be used"):
        raytrain.train_all(tiny_cfg(root, *common, "train.trained=all", "train.pack=2",
                                    "train.sketch_sets=[{name: tri}]"))


def test_a_failing_set_fails_alone_the_rest_of_its_group_trains(world, monkeypatch):
    """One set's failure fails its group's step: `train_all` then trains the group's sets one by one, so only
    the failing set is reported (and counted) as failed."""
    from pipeline.train import raytrain

    root, common = world
    cfg = tiny_cfg(root, *common, "train.pack=2", "train.sketch_sets=[{name: tri}, {name: sq}]")
    calls = []

    def fit_group(group, data, callbacks=None):
        names = [p.run_name for p in group]
        calls.append(names)
        if "train-sq" in names:
            raise RuntimeError("NaN in D_sketch")
        return [{"run_name": n, "run_uri": "", "reused": False} for n in names]

    monkeypatch.setattr(raytrain, "ensure_ray", lambda: None)
    monkeypatch.setattr(raytrain, "prepare_run_inputs", lambda plans: {})
    monkeypatch.setattr(raytrain, "fit_group", fit_group)
    with pytest.raises(raytrain.TrainingRunError, match=r"1 of 2 training runs failed:\n  train-sq: NaN") as err:
        raytrain.train_all(cfg)
    assert "train-tri" not in str(err.value)
    assert calls[0] == ["train-tri", "train-sq"] and sorted(calls[1:]) == [["train-sq"], ["train-tri"]]
