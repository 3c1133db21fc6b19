"""The `sketchgan` command line (also `python -m pipeline` and the thin `jobs/*.py` entrypoints).

Every command takes ``--config FILE`` and repeatable ``--set section.key=value``. `COMMANDS` is the whole wiring:
each command's handler (in `pipeline.commands`) and each of its flags, mapped either to the config key it sets
(so a flag, a ``--set`` and a YAML key mean the same) or, for what is not a pipeline setting (the sketch set to
create, the file to write), to the handler argument it fills. The configuration is validated before any stage
module (and so Ray, torch or MLflow) is imported.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline import commands
from pipeline.config import ConfigError, load_config
from pipeline.demo import DEMO_CONFIG


@dataclass
class Flag:
    """A command-line flag and where its value goes: a config key (``key``) or a handler argument (``arg``)."""

    names: tuple[str, ...]
    key: str | None = None
    arg: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # argparse keyword arguments

    @property
    def dest(self) -> str:
        return self.arg or self.key.replace(".", "__")


def to_key(*names: str, key: str, **options) -> Flag:
    return Flag(names, key=key, options=options)


def to_arg(*names: str, arg: str, **options) -> Flag:
    return Flag(names, arg=arg, options=options)


@dataclass
class Command:
    name: str
    help: str
    handler: Callable[..., int]  # handler(cfg, **arguments) -> exit code
    flags: list[Flag] = field(default_factory=list)
    subcommand: str | None = None  # e.g. "create" for `sketchset create`
    default_config: str | None = None  # the config file used when --config is not given


COMMANDS: list[Command] = [
    Command("preprocess", "LSUN LMDB / image folder -> image + sketch pairs in Parquet (Ray Data)",
            commands.preprocess_command, [
        to_key("--source", key="data.source", help="LSUN LMDB folder, image folder/prefix or Parquet (local or s3://)"),
        to_key("--category", key="data.category", help="category name, e.g. cat, horse, church"),
        to_key("--out", key="data.dataset", help="output dataset URI (default <root>/datasets/<category>)"),
        to_key("--size", key="data.size", type=int, help="output resolution N (N x N)"),
        to_key("--sketcher", key="data.sketcher", help="edges | photosketch"),
        to_key("--sketcher-weights", key="data.sketcher_weights", help="PhotoSketch checkpoint URI"),
        to_key("--sketch-precision", key="data.sketch_precision", choices=["auto", "fp32", "bf16"],
               help="PhotoSketch's dtype (default auto: bf16 where the hardware has bf16 matrix units)"),
        to_key("--limit", key="data.limit", type=int, help="process at most N images"),
        to_key("--max-error-rate", key="data.max_error_rate", type=float,
               help="fail when more than this share of records is bad (default 0.01)"),
    ]),
    Command("sketchset", "create a user sketch set (Parquet) from drawings or dataset ids",
            commands.sketchset_create_command, [
        to_arg("--name", arg="name", required=True, help="sketch set name"),
        to_arg("--from-dir", arg="from_dir", help="folder or s3:// prefix of drawings (PNG/JPEG)"),
        to_arg("--from-ids", arg="from_ids", help="file listing dataset ids, one per line"),
        to_arg("--dataset", arg="dataset", help="preprocessed dataset URI (with --from-ids)"),
        to_arg("--out", arg="out", help="output URI (default <root>/sketchsets/<name>)"),
    ], subcommand="create"),
    Command("evalset", "create an evaluation set: real images whose sketches are nearest a sketch set",
            commands.evalset_create_command, [
                to_arg("--sketchset", arg="sketchset", required=True, help="sketch set URI"),
                to_arg("--dataset", arg="dataset", required=True, help="preprocessed dataset URI"),
                to_arg("--n", arg="n", type=int, help="number of images"),
                to_arg("--out", arg="out", help="output URI"),
            ], subcommand="create"),
    Command("pretrain", "train a base StyleGAN2 from scratch on a Parquet image dataset (Ray Train)",
            commands.pretrain_command),
    Command("train", "customise the base GAN, one run per sketch set (Ray Train)", commands.train_command, [
        to_key("--resume", key="train.resume", help="resume from this run's latest checkpoint"),
    ]),
    Command("tune", "sweep augmentation / regularisation settings (Ray Tune)", commands.tune_command, [
        to_key("--resume", key="tune.resume", action="store_true", default=None, help="restore an interrupted sweep"),
    ]),
    Command("benchmark", "FID / KID of models against their evaluation sets", commands.benchmark_command),
    Command("models", "list registered models (name, versions, aliases, FID)", commands.models_list_command,
            subcommand="list"),
    Command("generate", "write a grid of samples (or an interpolation strip) from a registered model or checkpoint",
            commands.generate_command, [
                to_arg("--model", arg="model", required=True,
                       help="models:/NAME@ALIAS, models:/NAME/VERSION, a run, a base folder or a G checkpoint"),
                to_arg("--n", arg="n", type=int, default=16, help="number of samples"),
                to_arg("--out", arg="out", required=True, help="output PNG path"),
                to_arg("--truncation", arg="truncation", type=float, default=1.0, help="truncation psi"),
                to_arg("--seed", arg="seed", type=int, default=0, help="first seed"),
                to_arg("--interpolate", arg="interpolate", action="store_true",
                       help="latent interpolation between two seeds"),
                to_arg("--edit", arg="edits", action="append",
                       help="GANSpace edit COMP:SCALAR:FIRST-LAST (repeatable; scalar in standard deviations)"),
                to_arg("--ganspace", arg="ganspace", help="components npz (default: the one beside the base)"),
                to_arg("--compare", arg="compare", action="store_true",
                       help="with --edit: the same latents without the edits above"),
                to_arg("--latent", arg="latent", help="render a `sketchgan project` latent.pt through the model"),
            ]),
    Command("blend", "interpolate two models of the same base (in W or in weights); register a blend",
            commands.blend_command, [
                to_arg("--a", arg="a", required=True, help="first model (alpha 0)"),
                to_arg("--b", arg="b", required=True, help="second model (alpha 1)"),
                to_arg("--space", arg="space", choices=["w", "weights"], default="weights",
                       help="interpolate W latents or the weights"),
                to_arg("--steps", arg="steps", type=int, default=5, help="columns from alpha 0 to 1"),
                to_arg("--out", arg="out", help="output PNG (rows: seeds, columns: alpha)"),
                to_arg("--n", arg="n", type=int, default=4, help="seeds (rows)"),
                to_arg("--seed", arg="seed", type=int, default=0, help="first seed"),
                to_arg("--truncation", arg="truncation", type=float, default=1.0, help="truncation psi"),
                to_arg("--alpha", arg="alpha", type=float, help="one blend instead of a strip"),
                to_arg("--register", arg="register", action="store_true",
                       help="with --alpha and --space weights: register the blend as a model version"),
            ]),
    Command("project", "invert an image into a base model's latent space (latent.pt, reconstruction.png)",
            commands.project_command, [
                to_arg("--image", arg="image", required=True, help="the photo or drawing (path or URI)"),
                to_arg("--base", arg="base", required=True, help="the model to project into (usually the base)"),
                to_arg("--out", arg="out", required=True, help="output folder"),
                to_arg("--steps", arg="steps", type=int, default=1000, help="optimisation steps"),
                to_arg("--space", arg="space", choices=["w", "w+", "z"], default="w+",
                       help="latent space (z: to render through mapping-customised models)"),
                to_arg("--vgg-weights", arg="vgg_weights",
                       help="torchvision vgg16 state dict: LPIPS distance (default: pixel distance)"),
                to_arg("--lpips-weights", arg="lpips_weights", help="LPIPS's v0.1 vgg.pth linear weights"),
                to_arg("--seed", arg="seed", type=int, default=0, help="noise seed"),
            ]),
    Command("ganspace", "compute GANSpace components of a base generator's W space (stored beside the base)",
            commands.ganspace_compute_command, [
                to_arg("--base", arg="base", required=True, help="base folder, G checkpoint, run or models:/..."),
                to_arg("--samples", arg="samples", type=int, default=100_000, help="latents sampled for the PCA"),
                to_arg("--components", arg="components", type=int, help="components kept (default min(80, D))"),
                to_arg("--seed", arg="seed", type=int, default=0x6A5, help="sampling seed"),
                to_arg("--force", arg="force", action="store_true", help="recompute even when present"),
            ], subcommand="compute"),
    Command("pipeline", "run the whole chain from one config (what jobs/pipeline.py submits)",
            commands.pipeline_command),
    Command("studio", "the web studio: draw sketch sets, customise, watch runs, compare and use models",
            commands.studio_command, [
                to_key("--port", key="studio.port", type=int, help="port (default 8765)"),
                to_key("--host", key="studio.host", help="address to bind (default 127.0.0.1; any other needs "
                                                         "SKETCHGAN_STUDIO_TOKEN)"),
                to_key("--ray-address", key="studio.ray_address",
                       help="a cluster's Jobs API, http://HEAD:8265 (default: a local Ray instance)"),
            ], default_config=str(DEMO_CONFIG)),
    Command("demo", "run the whole pipeline on generated data on this machine", commands.demo_command,
            default_config=str(DEMO_CONFIG)),
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
        default = f" (default {cmd.default_config})" if cmd.default_config else ""
        p.add_argument("--config", help=f"YAML config file{default}")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (repeatable)")
        for flag in cmd.flags:
            options = dict(flag.options)
            if flag.key and options.get("action") is None:
                options.setdefault("metavar", flag.names[0].lstrip("-").upper().replace("-", "_"))
            p.add_argument(*flag.names, dest=flag.dest, **options)
        p.set_defaults(_command=cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    cmd: Command = args._command
    given = {f.key: getattr(args, f.dest) for f in cmd.flags if f.key and getattr(args, f.dest) is not None}
    try:
        cfg = load_config(args.config or cmd.default_config, args.overrides, values=given)
    except ConfigError as exc:
        print(f"sketchgan {args.command}: {exc}", file=sys.stderr)
        return 2
    arguments = {f.arg: getattr(args, f.dest) for f in cmd.flags if f.arg}
    try:
        rc = cmd.handler(cfg, **arguments)
    except KeyboardInterrupt:
        print(f"sketchgan {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, LookupError) as exc:
        # Our errors are ValueError/OSError subclasses that name the culprit; show them without a traceback.
        if args.verbose:
            raise
        hint = ""
        if isinstance(exc, OSError) and str(exc).startswith("[Errno") and exc.filename is None:
            # a system error from inside a library names no file: say where to look
            hint = f" ({type(exc).__name__} without a file name; --verbose shows where it came from)"
        print(f"sketchgan {args.command}: error: {exc}{hint}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
