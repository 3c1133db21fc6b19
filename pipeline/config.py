"""One validated configuration for every stage, loaded from YAML plus `--set section.key=value` overrides.

Every section refuses unknown keys, wrong types and out-of-range values before any work starts; the
error names the field (``train.no_such_knob: extra inputs are not permitted``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, Field, ValidationError, field_validator

from pipeline.config_types import Location, Section
from pipeline.names import validate_name
from pipeline.studio.settings import StudioConfig

DEFAULT_ROOT = ".sketchgan"


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the culprit."""


class StorageConfig(Section):
    """Where everything is read and written: a local folder or ``s3://bucket/prefix``."""

    root: Location = Field(DEFAULT_ROOT, validate_default=True)
    # S3 retries: SKETCHGAN_S3_MAX_ATTEMPTS per process (default 8), so Ray workers retry alike


class SketchSetSpec(Section):
    """One user sketch set to customise a model from."""

    name: str
    uri: Location | None = None  # stored sketch set (Parquet); default <root>/sketchsets/<name>
    from_dir: Location | None = None  # folder/prefix of drawings to create it from when missing
    from_ids: Location | None = None  # file of dataset ids to create it from when missing
    evalset: Location | None = None  # evaluation set (Parquet of real images) for FID
    # dataset ids (a file, one per line) to make the evaluation set from; default: images whose sketches are nearest
    evalset_ids: Location | None = None
    # the class its sketches show (eval.classifier's name): the benchmark reports target_share, that class's
    # share of samples, for the models customised from this set and for the base
    target_class: str | None = None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return validate_name(v, "sketch set name")


class DataConfig(Section):
    """Preprocessing: LSUN (or image folder / Parquet) -> image/sketch pairs in Parquet."""

    source: Location | None = None  # LSUN LMDB folder, image folder/prefix or Parquet URI
    category: str = "cat"
    size: int = Field(256, ge=8, le=1024)
    sketcher: Literal["edges", "photosketch"] = "edges"
    sketcher_weights: Location | None = None  # PhotoSketch checkpoint URI
    limit: int | None = Field(None, ge=1)
    max_error_rate: float = Field(0.01, ge=0.0, le=1.0)
    batch_size: int = Field(32, ge=1, le=4096)
    dataset: Location | None = None  # preprocessed dataset URI; default <root>/datasets/<category>
    max_image_pixels: int = Field(89_478_485, ge=1)  # larger images are refused as decompression bombs
    num_actors: int | None = Field(None, ge=1)  # sketch actors; default one per GPU, else one per node
    actor_threads: int | None = Field(None, ge=1)  # torch threads per sketch actor; default the node's CPUs
    network_batch: int = Field(8, ge=1, le=1024)  # images per sketch-network call inside a batch
    # PhotoSketch's dtype: auto = bf16 on GPUs and CPUs with bf16 matrix units (AMX / AVX-512 BF16), else fp32
    sketch_precision: Literal["auto", "fp32", "bf16"] = "auto"
    rows_per_file: int = Field(2048, ge=1)  # rows per Parquet file of pairs (at least; per write task)

    @field_validator("category")
    @classmethod
    def _safe_category(cls, v: str) -> str:
        return validate_name(v, "category")


class ModelConfig(Section):
    """The StyleGAN2 architecture and where its base weights come from."""

    size: int = Field(256, ge=32, le=1024)
    style_dim: int = Field(512, ge=8)
    n_mlp: int = Field(8, ge=1, le=16)
    channel_multiplier: int = Field(2, ge=1, le=8)
    channel_max: int = Field(512, ge=4)  # caps every layer's width: small values give tiny test models
    lr_mlp: float = Field(0.01, gt=0)
    w_shift: bool = False
    base_g: Location | None = None  # netG.pth (published or from `sketchgan pretrain`)
    base_d: Location | None = None  # netD.pth

    @field_validator("size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"must be a power of two, got {v}")
        return v


def _known_policies(v: str) -> str:
    known = {"translation", "cutout", "color"}
    for name in (p.strip() for p in v.split(",") if p.strip()):
        if name not in known:
            raise ValueError(f"unknown augmentation policy {name!r} (known: {', '.join(sorted(known))})")
    return v


Augment = Annotated[str, AfterValidator(_known_policies)]  # comma list of DiffAugment policies, or ""


class GANSettings(Section):
    """What plain StyleGAN2 training and GANSketching share: the optimiser, R1, style mixing, precision."""

    lr: float = Field(0.002, gt=0)
    r1_gamma: float = Field(10.0, ge=0)
    r1_every: int = Field(16, ge=1)
    mixing: float = Field(0.9, ge=0, le=1)
    precision: Literal["fp32", "bf16"] = "fp32"


class ObjectiveSettings(GANSettings):
    """The GANSketching objective (the paper's defaults): the only place these defaults are written."""

    lambda_image: float = Field(0.7, ge=0)
    lambda_weight: float = Field(0.0, ge=0)
    # per-network rates; None = lr (the paper). The mapping carries StyleGAN2's 0.01 multiplier (model.lr_mlp):
    # lr_mapping = lr / lr_mlp moves it as fast as the synthesis network
    lr_mapping: float | None = Field(None, gt=0)
    lr_d: float | None = Field(None, gt=0)
    gan_loss: Literal["softplus", "hinge", "lsgan"] = "softplus"
    trained: Literal["mapping", "w_shift", "all"] = "mapping"
    beta1: float = Field(0.0, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    augment: Augment = "translation"
    transform_fake: str = "toSketch,to3ch"
    transform_real: str = "to3ch"


class RunSettings(Section):
    """How a training run is run: Ray Train resources, seed, outputs, restarts (pretrain and train each have
    their own)."""

    seed: int = 0
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    sample_every: int = Field(200, ge=1)
    log_every: int = Field(20, ge=1)
    max_failures: int = Field(3, ge=0)
    # PACK: few nodes (fast collectives); SPREAD: different nodes where it can (a lost node stops fewer workers)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class PretrainConfig(GANSettings, RunSettings):
    """Ordinary StyleGAN2 training from scratch (the demo's and tests' base model)."""

    iterations: int = Field(2000, ge=1)
    batch_size: int = Field(16, ge=1)
    ema_half_life_kimg: float = Field(10.0, ge=0)
    augment: Augment = ""
    run_name: str = "base"

    @field_validator("run_name")
    @classmethod
    def _safe_run(cls, v: str) -> str:
        return validate_name(v, "run name")


class TrainConfig(ObjectiveSettings, RunSettings):
    """GANSketching fine-tuning, one run per sketch set."""

    sketch_sets: list[SketchSetSpec] = Field(default_factory=list)
    iterations: int = Field(1000, ge=1)
    batch_size: int = Field(4, ge=1)
    dsketch_init: Literal["base", "random"] = "base"
    # not in GANSketching (0 = off): publish a running average of G (half-life in kimg; damps a high rate)
    ema_half_life_kimg: float = Field(0.0, ge=0)
    max_concurrent_runs: int = Field(4, ge=1)  # trainers at once (a packed group is one)
    # sketch sets trained together in one worker's step (train/packed.py); auto: what the device packs well
    pack: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    eval_every: int | None = Field(None, ge=1)
    run_prefix: str = "train"
    resume: str | None = None  # a run name whose latest checkpoint to resume from

    @field_validator("run_prefix")
    @classmethod
    def _safe_prefix(cls, v: str) -> str:
        return validate_name(v, "run prefix")

    @field_validator("resume")
    @classmethod
    def _safe_resume(cls, v: str | None) -> str | None:
        return v if v is None else validate_name(v, "run name")


class TuneConfig(Section):
    """Ray Tune sweep over training settings (one sketch set; each trial is one `train` run)."""

    search: Literal["grid", "random"] = "grid"
    num_samples: int = Field(1, ge=1)  # grid: repeats of the grid; random: number of trials
    param_space: dict[str, list[Any]] = Field(default_factory=dict)  # train.<key> -> values
    metric: str | None = None  # default: fid when an evaluation set is configured, else loss_sketch
    mode: Literal["min", "max"] = "min"
    max_concurrent_trials: int = Field(2, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0)  # CPUs of a trial's training workers in all
    gpus_per_trial: float = Field(0.0, ge=0)  # GPUs of a trial's training workers in all (fractions share)
    driver_cpus: float = Field(0.01, gt=0)  # what each trial's (lightweight) Tune driver reserves
    grace_period: int = Field(1, ge=1)  # training iterations before ASHA may stop a trial
    reduction_factor: int = Field(2, ge=2)
    name: str = "sweep"
    sketch_set: str | None = None  # which of train.sketch_sets to sweep (default: the only one)
    resume: bool = False

    @field_validator("param_space")
    @classmethod
    def _train_keys(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not key.startswith("train.") or key.count(".") != 1:
                raise ValueError(f"{key!r}: sweep keys are train.<field> (e.g. train.lr)")
            if not isinstance(values, list) or not values:
                raise ValueError(f"{key!r}: give a non-empty list of values")
        return v

    @field_validator("name")
    @classmethod
    def _safe_sweep_name(cls, v: str) -> str:
        return validate_name(v, "sweep name")


class RegistryConfig(Section):
    """MLflow tracking and the model registry."""

    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else a local store under the root
    experiment: str = "sketchgan"
    model_prefix: str = "sketchgan"
    auto_register: bool = True  # register each finished customisation
    champion_alias: str = "champion"
    # which generator of a run a version holds: its best by validation FID (when measured), or its last
    checkpoint: Literal["best", "last"] = "best"

    @field_validator("model_prefix")
    @classmethod
    def _safe_model_prefix(cls, v: str) -> str:
        return validate_name(v, "registered model prefix")


class EvalConfig(Section):
    """FID/KID benchmarking."""

    models: list[dict[str, Any]] = Field(default_factory=list)
    # a model (as eval.models[].model, e.g. the base) scored on each evaluation set: rows gain fid_base etc.
    baseline: str | None = None
    n_samples: int = Field(1000, ge=2)
    batch_size: int = Field(50, ge=1)
    # "inception" (clean-fid's 2015-12-05 TF Inception), "randconv" (seeded, for tests), "classifier" (its
    # penultimate features) or "package.module:factory" returning an nn.Module / FeatureExtractor.
    feature_extractor: str = "inception"
    # a classifier of the category's images (`pipeline.eval.shape_classifier`): rows whose sketch set has a
    # target_class gain target_share, the share of samples classified as that class
    classifier: Location | None = None
    inception_weights: Location | None = None  # path or URI of inception-2015-12-05.pt; default clean-fid's cache
    inception_download: bool = True  # try clean-fid's download URL (short timeout) when not cached
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    truncation: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    name: str = "benchmark"
    num_actors: int | None = Field(None, ge=1)  # default: one per GPU, else one per cpus_per_actor CPUs
    cpus_per_actor: float = Field(1.0, gt=0)
    resize_threads: int | None = Field(None, ge=1)  # PIL resize threads; default: the CPUs available
    log_mlflow: bool = True  # log a benchmark run and set FID on registered model versions
    pr_k: int = Field(3, ge=1)  # improved precision/recall's neighbourhood (the paper's k)
    ppl_samples: int = Field(1000, ge=0)  # path-length pairs per model (0: off; StyleGAN used 100,000)
    fidelity_samples: int = Field(100, ge=0)  # samples whose sketches are compared with the sketch set (0: off)
    vgg_weights: Location | None = None  # torchvision vgg16 state dict: LPIPS for PPL (with lpips_weights)
    lpips_weights: Location | None = None  # the lpips package's v0.1 vgg.pth; without both, PPL in pixels

    @field_validator("name")
    @classmethod
    def _safe_benchmark_name(cls, v: str) -> str:
        return validate_name(v, "benchmark name")


class Config(Section):
    """The whole configuration: one section per pipeline stage."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    studio: StudioConfig = Field(default_factory=StudioConfig)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        msg = msg[0].lower() + msg[1:] if msg else msg
        lines.append(f"{loc}: {msg}")
    return f"invalid configuration ({source}):\n  " + "\n  ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into a key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if len(path) < 2 or any(not p for p in path):
        raise ConfigError(f"--set {text!r}: the key must be section.key (e.g. train.iterations=100)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {exc}") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw config mapping (validation happens afterwards)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                values: dict[str, Any] | None = None) -> Config:
    """Load and validate a config file (or the defaults): the file, then ``values`` (``{"section.key": value}``,
    e.g. from command-line flags), then ``--set`` overrides; validated once."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {source}: not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {source}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {source}: the top level must be a mapping of sections")
        data = loaded
    for key, value in (values or {}).items():
        section, _, field = key.partition(".")
        if data.get(section) is None:
            data[section] = {}
        if not isinstance(data[section], dict):
            raise ConfigError(f"config file {source}: {section} is not a section")
        data[section][field] = value
    data = apply_overrides(data, list(overrides or []))
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def updated(cfg: Config, changes: dict[str, Any]) -> Config:
    """A new validated config: ``cfg`` with ``{"section.key": value}`` changes (Python values, not strings)."""
    data = cfg.model_dump()
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if not field or not isinstance(data.get(section), dict):
            raise ConfigError(f"{key}: expected section.key (e.g. train.lr)")
        data[section][field] = value
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, "derived configuration")) from None
