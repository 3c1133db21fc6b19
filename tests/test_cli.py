import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["preprocess", "sketchset", "evalset", "pretrain", "train", "tune", "benchmark", "models",
            "generate", "demo"]


def test_module_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "pipeline", "--help"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    for name in COMMANDS:
        assert name in out


def test_console_script_help():
    exe = Path(sys.executable).with_name("sketchgan")
    if not exe.exists():
        pytest.fail(f"console script missing at {exe}: is the project installed (pip install -e .)?")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", ["preprocess", "train", "tune", "benchmark", "pretrain"])
def test_subcommand_help_shows_config_and_set(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--set" in out


@pytest.mark.reliability
def test_unknown_key_exits_nonzero_naming_it(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  no_such_knob: 1\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", "--config", str(cfg)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "train.no_such_knob: extra inputs are not permitted" in proc.stderr


def test_flag_and_set_are_validated(capsys):
    assert main(["preprocess", "--size", "3"]) == 2
    assert "data.size" in capsys.readouterr().err
    assert main(["train", "--set", "train.iterations=-1"]) == 2
    assert "train.iterations" in capsys.readouterr().err


def test_preprocess_sketch_precision_flag(capsys):
    with pytest.raises(SystemExit) as exc:  # argparse refuses a value outside the choices
        main(["preprocess", "--sketch-precision", "fp16"])
    assert exc.value.code == 2 and "--sketch-precision" in capsys.readouterr().err


def test_a_system_error_without_a_file_name_says_where_to_look(monkeypatch, capsys):
    from pipeline import cli

    cmd = next(c for c in cli.COMMANDS if c.name == "pipeline")

    def fails(cfg):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(cmd, "handler", fails)
    assert main(["pipeline"]) == 1
    err = capsys.readouterr().err
    assert "error: [Errno 2] No such file or directory (FileNotFoundError without a file name; --verbose" in err

    def names_it(cfg):
        raise FileNotFoundError(2, "No such file or directory", "/data/x.pth")

    monkeypatch.setattr(cmd, "handler", names_it)
    assert main(["pipeline"]) == 1
    assert capsys.readouterr().err.strip().endswith("No such file or directory: '/data/x.pth'")
