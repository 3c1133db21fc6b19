"""Planning training runs on the driver: every input checked before any worker starts (the API Tune uses too).

A plan names the run, where it lives, what it reads (dataset, sketch set, base checkpoints, evaluation set) and
whether it is new, continues from a checkpoint, or has already finished. A run that has checkpoints made with
other settings is refused, naming the settings; so is a finished run asked for more iterations without
``train.resume``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

from pipeline import layout, storage
from pipeline.config import Config, PretrainConfig, SketchSetSpec, TrainConfig
from pipeline.models import factory
from pipeline.train import run_store
from pipeline.train.packed import PACKABLE
from pipeline.train.spec import RunSpec

log = logging.getLogger("sketchgan.train")

# Settings a continued run must share with the run it continues (others, e.g. iterations, may change).
MUST_MATCH = {
    "model": None,  # every key
    "data": ("sketcher", "sketcher_weights", "category"),
    "train": ("batch_size", "lr", "beta1", "beta2", "lambda_image", "lambda_weight", "r1_gamma", "r1_every",
              "gan_loss", "mixing", "trained", "augment", "transform_fake", "transform_real", "dsketch_init",
              "ema_half_life_kimg", "precision", "seed", "num_workers"),
    "pretrain": ("batch_size", "lr", "r1_gamma", "r1_every", "ema_half_life_kimg", "mixing", "augment",
                 "precision", "seed", "num_workers"),
}


# train.pack=auto: sets per packed group. On a CPU two groups of 4 on one core each were fastest here; on a
# whole GPU 4 sets at 256 px and batch 4 take about 15 GB on paper (fits a 24 GB device) and an H100 saturates from
# about 4-8 (benchmarks/README.md, "Packed customisations"): 4 per whole GPU, fewer on a fraction of one.
AUTO_PACK = 4


class TrainingInputError(ValueError):
    """A training input that is missing or unusable; raised before any worker starts."""


@dataclass
class RunPlan:
    """A validated run: its spec, its state (``new``, ``continue`` or ``finished``) and the data it reads."""

    spec: RunSpec
    state: str
    dataset_uri: str | None  # preprocessed dataset (real images), when the run needs them
    sketch_set: layout.SketchSet | None = None  # read once, here; every worker gets its sketches

    @property
    def run_name(self) -> str:
        return self.spec.run_name


def _input(func, *args, **kwargs):
    """Call a layout reader, turning its artefact errors into training input errors."""
    try:
        return func(*args, **kwargs)
    except layout.ArtifactError as exc:
        raise TrainingInputError(str(exc)) from None


def training_dataset(cfg: Config) -> layout.Dataset:
    """The configured dataset of real images, refused as a training input when missing or without pairs."""
    return _input(layout.open_dataset, layout.dataset_uri(cfg))


def sketch_set_uri(cfg: Config, spec: SketchSetSpec) -> str:
    return spec.uri or layout.sketchset_uri(cfg, spec.name)


def read_sketches(cfg: Config, spec: SketchSetSpec) -> layout.SketchSet:
    """The sketch set, each sketch decoded on the driver (a set is small), so an unreadable one fails before any
    worker starts, naming the set and the sketch. Sketches of another size are resized to ``model.size`` by
    the workers: say so, naming the set."""
    from pipeline.data.images import BadRecord, open_image

    sketch_set = _input(layout.read_sketch_set, sketch_set_uri(cfg, spec), spec.name)
    sizes = set()
    for rid, blob in zip(sketch_set.ids, sketch_set.blobs):
        try:
            with open_image(blob, cfg.data.max_image_pixels) as im:
                sizes.add(im.size)
        except BadRecord as exc:
            raise TrainingInputError(f"sketch set {spec.name!r}: sketch {rid!r} in "
                                     f"{layout.sketches_uri(sketch_set.uri)} is unusable ({exc.reason})") from None
    size = cfg.model.size
    other = sorted(s for s in sizes if s != (size, size))
    if other:
        log.warning("sketch set %r holds sketches of %s px, not model.size %d: they are resized to %dx%d",
                    spec.name, ", ".join(f"{w}x{h}" for w, h in other), size, size, size)
    return sketch_set


def check_base_checkpoints(cfg: Config) -> str:
    """Load the base G/D on the driver so a missing, unreadable or mismatched file fails before any worker
    starts (the error names the file and lists mismatched keys). Returns the base G's sha256."""
    from pipeline.models.checkpoints import load_into, load_state_dict, sha256_of

    arch = factory.generator_kwargs(cfg.model)
    if not cfg.model.base_g:
        raise TrainingInputError("model.base_g is not set: point it at the base generator (netG.pth), e.g. the "
                                 f"published StyleGAN2 checkpoint or {layout.final_uri('', layout.G_FILE)} of a "
                                 "`sketchgan pretrain` run")
    for key, uri, build in (("model.base_g", cfg.model.base_g, factory.build_generator),
                            ("model.base_d", cfg.model.base_d, factory.build_discriminator)):
        if not uri:
            continue
        if not storage.exists(uri):
            raise TrainingInputError(f"{key}: checkpoint {uri} does not exist")
        try:
            load_into(build(arch), load_state_dict(uri), source=f"{key} {uri}")
        except ValueError as exc:
            raise TrainingInputError(f"{key}: {exc}\n(the model section describes {arch})") from None
    if not cfg.model.base_d and (cfg.train.dsketch_init == "base" or cfg.train.lambda_image > 0):
        raise TrainingInputError("model.base_d is not set: the discriminators start from the base netD.pth "
                                 "(set model.base_d, or train.dsketch_init=random with train.lambda_image=0)")
    return sha256_of(cfg.model.base_g)


def evalset_for(cfg: Config, spec: SketchSetSpec) -> str | None:
    """The evaluation set URI for FID at intervals, or None when none is configured / FID is off."""
    if not spec.evalset or not cfg.train.eval_every:
        return None
    uri = spec.evalset if ("/" in spec.evalset or ":" in spec.evalset) else layout.evalset_uri(cfg, spec.evalset)
    if not layout.evalset_exists(uri):
        raise TrainingInputError(f"sketch set {spec.name!r}: evaluation set {uri} not found (no "
                                 f"{layout.MANIFEST})")
    return uri


def config_differences(old: dict, new: dict, kind: str) -> list[str]:
    """The settings that must match and differ; a key the old run's config lacks (it predates the key) counts
    as that key's default."""
    defaults = Config().model_dump(mode="json")
    diffs = []
    for section in ("model", "data", kind):
        keys = MUST_MATCH[section]
        o, n, d = old.get(section, {}), new.get(section, {}), defaults.get(section, {})
        for key in keys if keys is not None else sorted(set(o) | set(n)):
            was = o.get(key, d.get(key))
            if was != n.get(key):
                diffs.append(f"{section}.{key}: {was!r} -> {n.get(key)!r}")
    return diffs


def check_continuation(spec: RunSpec) -> int | None:
    """If the run already has state, check it may continue with this config; returns its checkpoint iteration."""
    iteration = run_store.checkpoint_iteration(spec.run_uri)
    if iteration is None:
        return None
    info = layout.read_run_info(spec.run_uri)
    if info is not None:
        diffs = config_differences(info.get("config", {}), spec.config, spec.kind)
        if diffs:
            raise TrainingInputError(
                f"run {spec.run_name!r} at {spec.run_uri} has checkpoints made with other settings; continuing it "
                "would mix them:\n  " + "\n  ".join(diffs) +
                "\nchoose another run name (train.run_prefix / pretrain.run_name) or delete the run")
    return iteration


def finished_iterations(run_uri: str) -> int | None:
    run = layout.finished_run(run_uri)
    return int(run.metadata.get("iterations", 0)) if run is not None else None


def run_state(spec: RunSpec, resume_requested: bool) -> str:
    """``new`` | ``continue`` | ``finished`` for a run, refusing unsafe combinations."""
    done = finished_iterations(spec.run_uri)
    at = check_continuation(spec)
    total = spec.section.iterations
    if done is not None:
        if done == total and (at is None or at >= total):
            return "finished"
        if not resume_requested:
            raise TrainingInputError(f"run {spec.run_name!r} already finished with {done} iterations (asked "
                                     f"for {total}): pass --resume {spec.run_name} to continue it, or choose "
                                     "another run name")
        if at is None or at > total:
            raise TrainingInputError(f"run {spec.run_name!r}: cannot continue to {total} iterations from "
                                     f"checkpoint iteration {at}")
        return "continue"
    if resume_requested and at is None:
        raise TrainingInputError(f"cannot resume run {spec.run_name!r}: no checkpoint at {spec.run_uri}")
    return "continue" if at is not None else "new"


def check_workers(section: PretrainConfig | TrainConfig, what: str) -> None:
    if section.batch_size % section.num_workers:
        raise TrainingInputError(f"{what}.batch_size {section.batch_size} is not divisible by {what}.num_workers "
                                 f"{section.num_workers} (the global batch is split across the workers)")
    if section.use_gpu and section.gpus_per_worker == 0:
        log.info("%s.use_gpu is set without %s.gpus_per_worker: each worker takes one whole GPU", what, what)


def plan_train_run(cfg: Config, sketch: SketchSetSpec, run_name: str | None = None,
                   base_g_sha: str | None = None) -> RunPlan:
    """Validate one sketch set's run (inputs and resumable state)."""
    sketch_set = read_sketches(cfg, sketch)
    needs_images = cfg.train.lambda_image > 0
    dataset = training_dataset(cfg) if needs_images else None
    run_name = run_name or f"{cfg.train.run_prefix}-{sketch.name}"
    spec = RunSpec(kind="train", run_name=run_name, run_uri=layout.run_uri(cfg, run_name), cfg=cfg,
                   sketch_set={"name": sketch.name, "uri": sketch_set.uri, "id": sketch_set.manifest.get("id"),
                               "count": sketch_set.manifest.get("count")},
                   dataset_manifest_id=dataset.id if dataset else None,
                   base_g_sha256=base_g_sha, evalset_uri=evalset_for(cfg, sketch))
    state = run_state(spec, resume_requested=cfg.train.resume == run_name)
    return RunPlan(spec, state, dataset.uri if dataset else None, sketch_set)


def sketch_sets_to_train(cfg: Config) -> list[SketchSetSpec]:
    """The configured sketch sets, or the one of the run named by ``train.resume`` when none is listed."""
    sets, resume, prefix = list(cfg.train.sketch_sets), cfg.train.resume, cfg.train.run_prefix
    if resume:
        names = [f"{prefix}-{s.name}" for s in sets]
        if sets and resume not in names:
            raise TrainingInputError(f"train.resume={resume!r} is not one of this config's runs "
                                     f"({', '.join(names)})")
        if not sets:
            info = layout.read_run_info(layout.run_uri(cfg, resume))
            if info is None:
                raise TrainingInputError(f"cannot resume run {resume!r}: "
                                         f"{layout.run_info_uri(layout.run_uri(cfg, resume))} does not exist")
            sk = info.get("sketch_set") or {}
            if info.get("kind") != "train" or not sk.get("name"):
                raise TrainingInputError(f"run {resume!r} is not a GANSketching training run")
            if resume != f"{prefix}-{sk['name']}":
                raise TrainingInputError(f"run {resume!r} does not follow train.run_prefix={prefix!r}: "
                                         "set train.run_prefix to the prefix it was made with")
            sets = [SketchSetSpec(name=sk["name"], uri=sk.get("uri"))]
    if not sets:
        raise TrainingInputError("train.sketch_sets is empty: list at least one sketch set to customise from")
    return sets


def plan_train(cfg: Config) -> list[RunPlan]:
    """Validate everything every run needs, before any worker starts."""
    sets = sketch_sets_to_train(cfg)
    names = [s.name for s in sets]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TrainingInputError(f"train.sketch_sets lists {', '.join(dupes)} more than once")
    check_workers(cfg.train, "train")
    storage.ensure_writable(cfg.storage.root)
    base_sha = check_base_checkpoints(cfg)
    return [plan_train_run(cfg, s, base_g_sha=base_sha) for s in sets]


def pack_key(spec: RunSpec) -> str:
    """Runs pack together only when this is equal: the same base (its sha256), architecture, data and every
    setting but the sketch set (so different bases, architectures or objectives never share a step)."""
    config = spec.cfg.model_dump(mode="json")
    for key in ("sketch_sets", "resume", "run_prefix"):
        config["train"].pop(key, None)
    return json.dumps({"config": config, "base_g_sha256": spec.base_g_sha256,
                       "dataset": spec.dataset_manifest_id}, sort_keys=True)


def pack_size(cfg: Config) -> int:
    """Sets per packed group from ``train.pack``: ``auto`` packs what can be (1 when nothing can); an explicit
    pack > 1 with settings that cannot pack is refused, naming them."""
    t = cfg.train
    reasons = []
    if t.trained not in PACKABLE:
        reasons.append(f"train.trained={t.trained!r} trains the synthesis network, which every set would need "
                       "its own copy of")
    if t.num_workers > 1:
        reasons.append(f"train.num_workers={t.num_workers}: a packed group trains on one worker")
    if t.pack == "auto":
        if reasons:
            return 1
        return max(1, int(AUTO_PACK * (t.gpus_per_worker or 1.0))) if t.use_gpu else AUTO_PACK
    if t.pack > 1 and reasons:
        raise TrainingInputError(f"train.pack={t.pack} cannot be used: " + "; ".join(reasons) +
                                 " (set train.pack=1, or auto to pack only what can be)")
    return t.pack


def pack_groups(plans: list[RunPlan], size: int) -> list[list[RunPlan]]:
    """The runs to train, grouped: runs that may share a step (`pack_key`) and start at the same checkpoint
    iteration, split into groups of at most ``size`` of near-equal size, in the plans' order."""
    buckets: dict[tuple, list[RunPlan]] = {}
    for plan in plans:
        start = run_store.resumable_iteration(plan.spec.run_uri)
        buckets.setdefault((pack_key(plan.spec), start, plan.dataset_uri), []).append(plan)
    groups = []
    for members in buckets.values():
        n = math.ceil(len(members) / size)
        bounds = [round(i * len(members) / n) for i in range(n + 1)]
        groups += [members[a:b] for a, b in zip(bounds, bounds[1:])]
    return groups


def plan_pretrain(cfg: Config) -> RunPlan:
    """Validate a pretraining run: its dataset, workers and resumable state."""
    check_workers(cfg.pretrain, "pretrain")
    storage.ensure_writable(cfg.storage.root)
    dataset = training_dataset(cfg)
    run_name = cfg.pretrain.run_name
    spec = RunSpec(kind="pretrain", run_name=run_name, run_uri=layout.run_uri(cfg, run_name), cfg=cfg,
                   dataset_manifest_id=dataset.id)
    # no --resume for pretraining: an unfinished run continues, a finished one may be extended
    state = run_state(spec, resume_requested=finished_iterations(spec.run_uri) is not None)
    return RunPlan(spec, state, dataset.uri, None)
