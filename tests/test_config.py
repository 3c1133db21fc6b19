from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, load_config, updated


def write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_defaults_are_the_papers_settings():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.train.lambda_image == 0.7
    assert cfg.train.r1_gamma == 10 and cfg.train.r1_every == 16
    assert (cfg.train.lr, cfg.train.beta1, cfg.train.beta2) == (0.002, 0.0, 0.99)
    assert cfg.train.mixing == 0.9 and cfg.train.trained == "mapping"
    assert cfg.storage.root == str(Path.cwd() / ".sketchgan")


def test_local_roots_are_made_absolute_so_ray_workers_agree(tmp_path, monkeypatch):
    # Ray Train workers run in their own working directory: a relative root must not follow them there.
    monkeypatch.chdir(tmp_path)
    assert load_config(None, ["storage.root=out/here"]).storage.root == str(tmp_path / "out" / "here")
    assert load_config(None, ["storage.root=s3://bucket/prefix"]).storage.root == "s3://bucket/prefix"
    cfg = load_config(None, ["data.source=lsun/cat", "data.dataset=s3://b/ds", "model.base_g=w/netG.pth",
                             "train.sketch_sets=[{name: a, from_dir: drawings, evalset: /abs/eval}]"])
    assert cfg.data.source == str(tmp_path / "lsun" / "cat") and cfg.data.dataset == "s3://b/ds"
    assert cfg.model.base_g == str(tmp_path / "w" / "netG.pth")
    spec = cfg.train.sketch_sets[0]
    assert spec.from_dir == str(tmp_path / "drawings") and spec.evalset == "/abs/eval"


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "train:\n  iterations: 5\nmodel:\n  size: 32\n")
    overrides = ["train.batch_size=8", "data.sketcher=photosketch", "train.augment=translation,cutout"]
    cfg = load_config(p, overrides)
    assert cfg.train.iterations == 5 and cfg.train.batch_size == 8
    assert cfg.model.size == 32 and cfg.data.sketcher == "photosketch"
    assert cfg.train.augment == "translation,cutout"


@pytest.mark.reliability
def test_unknown_key_is_named(tmp_path):
    p = write(tmp_path, "train:\n  no_such_knob: 3\n")
    with pytest.raises(ConfigError, match=r"train\.no_such_knob: extra inputs are not permitted"):
        load_config(p)


@pytest.mark.reliability
def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"trian: extra inputs are not permitted"):
        load_config(write(tmp_path, "trian:\n  iterations: 3\n"))


@pytest.mark.reliability
def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.iterations: input should be a valid integer"):
        load_config(write(tmp_path, "train:\n  iterations: lots\n"))


@pytest.mark.parametrize(
    "override, field",
    [("train.lambda_image=-1", "train.lambda_image"), ("model.size=48", "model.size"),
     ("data.max_error_rate=1.5", "data.max_error_rate"), ("train.iterations=0", "train.iterations")],
)
@pytest.mark.reliability
def test_out_of_range_is_named(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.reliability
def test_unknown_augmentation_and_sketcher_are_named():
    with pytest.raises(ConfigError, match="unknown augmentation policy 'rotate'"):
        load_config(None, ["train.augment=translation,rotate"])
    with pytest.raises(ConfigError, match=r"data\.sketcher"):
        load_config(None, ["data.sketcher=crayon"])


@pytest.mark.reliability
def test_unsafe_names_refused():
    with pytest.raises(ConfigError, match=r"sketch set name '\.\./evil' is not allowed"):
        load_config(None, ["train.sketch_sets=[{name: ../evil}]"])
    with pytest.raises(ConfigError, match="pretrain.run_name"):
        load_config(None, ["pretrain.run_name=a/b"])


@pytest.mark.reliability
def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["train.iterations"])
    with pytest.raises(ConfigError, match="the key must be section.key"):
        load_config(None, ["iterations=3"])


def test_updated_revalidates():
    cfg = load_config()
    new = updated(cfg, {"train.iterations": 7})
    assert new.train.iterations == 7 and cfg.train.iterations != 7
    with pytest.raises(ConfigError, match=r"train\.iterations"):
        updated(cfg, {"train.iterations": -7})


def test_round_trip_yaml(tmp_path):
    cfg = load_config(None, ["train.iterations=11", "storage.root=s3://b/p"])
    p = write(tmp_path, cfg.to_yaml())
    assert load_config(p) == cfg


def test_flag_values_fill_an_empty_section_of_the_file(tmp_path):
    p = write(tmp_path, "data:\ntrain:\n  iterations: 5\n")
    cfg = load_config(p, ["data.size=128"], values={"data.size": 64, "data.category": "horse"})
    assert (cfg.data.category, cfg.data.size, cfg.train.iterations) == ("horse", 128, 5)  # --set wins over a flag
    bad = write(tmp_path, "data: 3\n")
    with pytest.raises(ConfigError, match="data is not a section"):
        load_config(bad, values={"data.size": 64})


def test_pretraining_has_its_own_run_settings():
    cfg = load_config(None, ["train.num_workers=2", "train.log_every=7"])
    assert (cfg.pretrain.num_workers, cfg.pretrain.log_every) == (1, 20)
    cfg = load_config(None, ["pretrain.num_workers=3", "pretrain.checkpoint_every=9"])
    assert (cfg.pretrain.num_workers, cfg.pretrain.checkpoint_every, cfg.train.num_workers) == (3, 9, 1)
