"""The `sketchgan` command line (also `python -m pipeline` and the thin `jobs/*.py` entrypoints).

Every command takes ``--config FILE`` and repeatable ``--set section.key=value``; command-specific flags
are shorthands for config keys where one exists, so a flag, a ``--set`` and a YAML key mean the same.
The configuration is validated before any stage module (and so Ray, torch or MLflow) is imported.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.config import Config, ConfigError, load_config


@dataclass
class Command:
    name: str
    help: str
    target: str  # "module:function", called as function(cfg, args) -> int | None
    flags: list[tuple[tuple[str, ...], dict]] = field(default_factory=list)
    # flag dest -> config key it sets (when given on the command line)
    config_keys: dict[str, str] = field(default_factory=dict)
    subcommand: str | None = None  # e.g. "create" for `sketchset create`


def _flag(*names: str, **kwargs) -> tuple[tuple[str, ...], dict]:
    return names, kwargs


COMMANDS: list[Command] = [
    Command(
        "preprocess",
        "LSUN LMDB / image folder -> image + sketch pairs in Parquet (Ray Data)",
        "pipeline.data.preprocess:cli_main",
        [
            _flag("--source", help="LSUN LMDB folder, image folder/prefix or Parquet (local or s3://)"),
            _flag("--category", help="category name, e.g. cat, horse, church"),
            _flag("--out", help="output dataset URI (default <root>/datasets/<category>)"),
            _flag("--size", type=int, help="output resolution N (N x N)"),
            _flag("--sketcher", help="edges | photosketch"),
            _flag("--sketcher-weights", dest="sketcher_weights", help="PhotoSketch checkpoint URI"),
            _flag("--sketch-precision", dest="sketch_precision", choices=["auto", "fp32", "bf16"],
                  help="PhotoSketch's dtype (default auto: bf16 where the hardware has bf16 matrix units)"),
            _flag("--limit", type=int, help="process at most N images"),
            _flag("--max-error-rate", dest="max_error_rate", type=float,
                  help="fail when more than this share of records is bad (default 0.01)"),
        ],
        {"source": "data.source", "category": "data.category", "out": "data.dataset", "size": "data.size",
         "sketcher": "data.sketcher", "sketcher_weights": "data.sketcher_weights",
         "sketch_precision": "data.sketch_precision", "limit": "data.limit",
         "max_error_rate": "data.max_error_rate"},
    ),
    Command(
        "sketchset",
        "create a user sketch set (Parquet) from drawings or dataset ids",
        "pipeline.data.sketchsets:cli_main",
        [
            _flag("--name", required=True, help="sketch set name"),
            _flag("--from-dir", dest="from_dir", help="folder or s3:// prefix of drawings (PNG/JPEG)"),
            _flag("--from-ids", dest="from_ids", help="file listing dataset ids, one per line"),
            _flag("--dataset", help="preprocessed dataset URI (with --from-ids)"),
            _flag("--out", help="output URI (default <root>/sketchsets/<name>)"),
        ],
        subcommand="create",
    ),
    Command(
        "evalset",
        "create an evaluation set: real images whose sketches are nearest a sketch set",
        "pipeline.data.evalsets:cli_main",
        [
            _flag("--sketchset", required=True, help="sketch set URI"),
            _flag("--dataset", required=True, help="preprocessed dataset URI"),
            _flag("--n", type=int, default=None, help="number of images"),
            _flag("--out", help="output URI"),
        ],
        subcommand="create",
    ),
    Command("pretrain", "train a base StyleGAN2 from scratch on a Parquet image dataset (Ray Train)",
            "pipeline.train.trainer:pretrain_cli"),
    Command(
        "train",
        "customise the base GAN, one run per sketch set (Ray Train)",
        "pipeline.train.trainer:train_cli",
        [_flag("--resume", help="resume from this run's latest checkpoint")],
        {"resume": "train.resume"},
    ),
    Command(
        "tune",
        "sweep augmentation / regularisation settings (Ray Tune)",
        "pipeline.tune.sweep:cli_main",
        [_flag("--resume", action="store_true", default=None, help="restore an interrupted sweep")],
        {"resume": "tune.resume"},
    ),
    Command("benchmark", "FID / KID of models against their evaluation sets",
            "pipeline.eval.benchmark:cli_main"),
    Command("models", "list registered models (name, versions, aliases, FID)",
            "pipeline.registry.mlflow_registry:cli_list", subcommand="list"),
    Command(
        "generate",
        "write a grid of samples (or an interpolation strip) from a registered model or checkpoint",
        "pipeline.registry.generate:cli_main",
        [
            _flag("--model", required=True,
                  help="models:/NAME@ALIAS, models:/NAME/VERSION or a G checkpoint URI"),
            _flag("--n", type=int, default=16, help="number of samples"),
            _flag("--out", required=True, help="output PNG path"),
            _flag("--truncation", type=float, default=1.0, help="truncation psi"),
            _flag("--seed", type=int, default=0, help="first seed"),
            _flag("--interpolate", action="store_true", help="latent interpolation between two seeds"),
        ],
    ),
    Command("pipeline", "run the whole chain from one config (what jobs/pipeline.py submits)",
            "pipeline.chain:cli_main"),
    Command("demo", "run the whole pipeline on generated data on this machine",
            "pipeline.demo:cli_main"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sketchgan",
        description="Sketch Your Own GAN: customise pretrained StyleGAN2 models from sketches, on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if cmd.subcommand:
            inner = p.add_subparsers(dest="action", metavar="ACTION")
            inner.required = True
            p = inner.add_parser(cmd.subcommand, help=cmd.help, description=cmd.help)
        p.add_argument("--config", help="YAML config file")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (repeatable)")
        for names, kwargs in cmd.flags:
            p.add_argument(*names, **kwargs)
        p.set_defaults(_command=cmd)
    return parser


def _resolve(target: str) -> Callable:
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise NotImplementedError(f"this stage is not built yet ({module_name})") from None
        raise
    return getattr(module, func_name)


def load_command_config(args: argparse.Namespace) -> Config:
    """The validated config for a parsed command line: file, then flags, then ``--set`` overrides."""
    cmd: Command = args._command
    overrides = []
    for dest, key in cmd.config_keys.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides.append(f"{key}={_yaml_scalar(value)}")
    overrides.extend(args.overrides)
    return load_config(args.config, overrides)


def _yaml_scalar(value) -> str:
    import json

    # JSON is valid YAML, and quoting keeps strings such as "on" or "1e3" as strings.
    return json.dumps(value)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = load_command_config(args)
    except ConfigError as exc:
        print(f"sketchgan {args.command}: {exc}", file=sys.stderr)
        return 2
    try:
        func = _resolve(args._command.target)
    except NotImplementedError as exc:
        print(f"sketchgan {args.command}: {exc}", file=sys.stderr)
        return 3
    try:
        rc = func(cfg, args)
    except KeyboardInterrupt:
        print(f"sketchgan {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, LookupError) as exc:
        # Our errors are ValueError/OSError subclasses that name the culprit; show them without a traceback.
        if args.verbose:
            raise
        print(f"sketchgan {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
