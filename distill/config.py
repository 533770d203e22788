"""The recipe schema: nested dataclasses whose fields carry their defaults and help.

This is the only place defaults live. ``load(recipe, overrides)`` reads a YAML recipe,
applies ``section.key=value`` overrides, checks every key and type, checks the combination
of values and the files it names, and returns a ``Config``; every problem is a
``ConfigError`` that names the key and the recipe file, raised before any weights load.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A recipe problem: names the recipe file and the offending key."""


def _field(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TeacherConfig:
    path: str = _field(
        "models/digits-teacher",
        "diffusers checkpoint of the teacher: a hub id or a local pipeline directory (model_index.json)",
    )
    revision: Optional[str] = _field(None, "hub revision (branch, tag or commit) of `path`")
    guidance_scale: float = _field(1.0, "classifier-free guidance scale of the real score (1 = no guidance)")
    dtype: Literal["float32", "float16", "bfloat16"] = _field(
        "float32", "dtype of the frozen teacher parts (denoiser, VAE, text encoders); trainable copies stay float32"
    )


@dataclass
class LoraConfig:
    rank: int = _field(0, "LoRA rank (0: train every weight, no LoRA)")
    alpha: Optional[float] = _field(None, "LoRA alpha (scale alpha / rank); null = rank, a scale of 1")
    target_modules: list[str] = _field(
        ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
         "conv_shortcut", "time_emb_proj"],
        "module names (suffixes, as peft matches them) that get LoRA adapters",
    )


@dataclass
class StudentConfig:
    timesteps: list[int] = _field(
        [500],
        "the student's fixed timesteps, descending; each step denoises pure noise (first) or the previous "
        "output re-noised to that timestep. One step conditioned at t=500 works on digits; [999, 749, 499, 249] "
        "is the usual 4-step schedule",
    )
    lora: LoraConfig = _field(LoraConfig(), "train the student as a LoRA of the teacher (rank > 0) instead of all weights")
    backward_simulation: bool = _field(
        True,
        "multi-step training inputs come from running the student itself (DMD2 §4.5) rather than noised real images",
    )


@dataclass
class R1Config:
    kind: Literal["none", "approximated", "exact", "r2"] = _field(
        "none", "regulariser of the discriminator: none, approximated R1 (APT), exact R1 on real inputs, or R2 on generated "
        "inputs (R3GAN)"
    )
    weight: float = _field(
        1.0, "weight (gamma / 2) of the regulariser in the critic loss. Every kind penalises the same quantity, the mean "
        "over the discriminator's logits of each logit's squared input gradient, so one weight means the same for every "
        "regulariser and every head (one logit or hundreds of tokens); see distill/losses/r1.py")
    sigma: float = _field(
        0.01, "std of the Gaussian perturbation of real inputs for approximated R1 (its penalty is the mean squared "
        "change of the logits divided by sigma^2)")


@dataclass
class DiscriminatorConfig:
    backbone: Literal["fake_score", "dinov2", "teacher"] = _field(
        "fake_score",
        "features the GAN heads read: fake_score (DMD2's fake-score bottleneck), dinov2 (a frozen DINOv2 on decoded "
        "samples, ADD) or teacher (the frozen teacher's denoiser features on noised samples, LADD)",
    )
    dinov2: str = _field("facebook/dinov2-small", "DINOv2 checkpoint (hub id or local dir) of the dinov2 backbone")
    layers: list[int] = _field(
        [], "backbone layers the heads read (dinov2: hidden-state indices, [] = 4 evenly spaced; teacher: feature "
        "module indices, [] = all)"
    )
    head_width: int = _field(64, "channels of each per-layer head")
    augment: bool = _field(False, "differentiable translation + cutout of real and generated inputs (DiffAugment), ADD only")


@dataclass
class MethodConfig:
    name: Literal["dmd2", "add"] = _field(
        "dmd2", "distillation method: dmd2, or add (ADD; LADD is add with discriminator.backbone=teacher and distill_weight=0)"
    )
    dmd_weight: float = _field(1.0, "weight of the distribution-matching loss in the generator loss")
    gan_weight: float = _field(
        0.0, "weight of the generator's GAN loss (0 disables the GAN head and needs no real images)"
    )
    critic_gan_weight: float = _field(1.0, "weight of the discriminator's GAN loss in the critic loss (DMD2)")
    distill_weight: float = _field(2.5, "ADD: weight (lambda) of the score-distillation loss; 0 for LADD")
    distill_weighting: Literal["exponential", "sds", "constant"] = _field(
        "exponential", "ADD: c(t) of the score-distillation loss: alpha_t, alpha_t*sigma_t (SDS) or 1"
    )
    gan_loss: Optional[Literal["non_saturating", "hinge", "relativistic"]] = _field(
        None, "adversarial loss of the GAN term; null = the method's paper's: non_saturating for dmd2, hinge for add"
    )
    fake_score_updates: int = _field(
        5, "critic updates (fake score and GAN head; ADD: discriminator) per student update: DMD2's two time-scale update rule"
    )
    t_min: int = _field(20, "smallest timestep at which student samples are re-noised for DMD and the GAN")
    t_max: int = _field(980, "largest timestep at which student samples are re-noised for DMD and the GAN")
    r1: R1Config = _field(R1Config(), "discriminator regulariser")
    discriminator: DiscriminatorConfig = _field(DiscriminatorConfig(), "the GAN discriminator: backbone and heads")
    fake_score_lora: LoraConfig = _field(
        LoraConfig(), "DMD2: train the fake score as a LoRA (rank > 0); with a LoRA student too, teacher, student and "
        "fake score share one frozen base"
    )


# method.gan_loss when the recipe leaves it null: the loss each method's paper trains with
PAPER_GAN_LOSS = {"dmd2": "non_saturating", "add": "hinge"}


@dataclass
class DataConfig:
    dataset: Literal["digits", "classes", "prompts", "image_captions"] = _field(
        "digits",
        "training data: digits (the built-in scikit-learn digits), classes (class labels only, each of the teacher's "
        "classes 100 times per epoch: data-free distribution matching for class-conditional teachers such as DiT), "
        "prompts (text only: data-free distribution matching) or image_captions (images with captions: real images for "
        "the GAN and ADD)",
    )
    path: Optional[str] = _field(
        None, "prompts: a .txt file (one prompt per line) or an HF datasets directory / hub id; image_captions: an "
        "imagefolder directory (metadata.jsonl captions), a parquet file or directory, or an HF datasets hub id"
    )
    split: str = _field("train", "split of an HF dataset")
    prompt_column: str = _field("text", "column holding the prompt / caption")
    image_column: str = _field("image", "column holding the image (image_captions)")
    resolution: Optional[int] = _field(
        None, "image_captions: side of the square training images (resize the short side, centre crop); null = the teacher's"
    )
    cache_dir: Optional[str] = _field(
        None, "opt-in cache of VAE latents and text embeddings on disk (keyed by data and teacher), so long runs "
        "encode once; null = encode every batch"
    )
    batch_size: int = _field(64, "samples per process per micro-batch")


@dataclass
class OptimizerConfig:
    lr: float = _field(1e-5, "learning rate (constant after warm-up)")
    betas: list[float] = _field([0.0, 0.999], "Adam betas")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    warmup_steps: int = _field(0, "linear learning-rate warm-up, in optimizer steps")


@dataclass
class TrainConfig:
    max_steps: int = _field(1000, "student updates to run")
    max_minutes: Optional[float] = _field(
        None, "wall-clock budget: stop (and checkpoint) after this many minutes even if max_steps is not reached"
    )
    gradient_accumulation_steps: int = _field(1, "micro-batches per optimizer step, for both optimizers")
    mixed_precision: Literal["no", "fp16", "bf16"] = _field("no", "mixed precision, through Accelerate")
    max_grad_norm: float = _field(1.0, "gradient clipping norm for student and critic (0 disables)")
    max_nonfinite_steps: int = _field(
        5, "an update whose loss or gradient is not finite is skipped (no weight moves) and counted; after this many "
        "student steps in a row with a skipped update the run stops, its last checkpoint intact"
    )
    gradient_checkpointing: bool = _field(
        False, "recompute the student's and fake score's activations in the backward pass (less memory, ~30% slower)"
    )
    ema_decay: float = _field(0.99, "EMA decay of the student's weights (0 disables EMA)")
    checkpoint_every: int = _field(200, "save a resumable checkpoint every N student steps")
    keep_checkpoints: int = _field(2, "how many recent checkpoints to keep")
    log_every: int = _field(10, "log losses every N student steps")
    sample_every: int = _field(200, "write a sample grid every N student steps (0 disables)")
    num_grid_samples: int = _field(64, "images in each sample grid")


@dataclass
class EvalConfig:
    features: list[str] = _field(
        ["classifier"],
        "feature spaces for FD, KID, precision and recall: classifier (eval.classifier's features), dinov2 "
        "(FD-DINOv2, eval.dinov2) and/or inception (classic FID; needs torch-fidelity and network); the first "
        "one's FD picks the best checkpoint. [] disables scoring",
    )
    classifier: Optional[str] = _field(
        "models/digits-classifier",
        "classifier (hub id or local dir) for the classifier feature space and class accuracy (null: none)",
    )
    dinov2: str = _field("facebook/dinov2-large", "DINOv2 checkpoint (hub id or local dir) for the dinov2 feature space")
    clip: Optional[str] = _field(
        None, "CLIP model (hub id or local dir, e.g. openai/clip-vit-large-patch14) for the CLIP score of text-conditioned "
        "samples against their prompts (null: no CLIP score)"
    )
    num_samples: int = _field(2000, "samples generated for the final scores (metrics.json)")
    every: int = _field(
        0, "score the EMA student every N student steps during training, log it and keep the best checkpoint (0: only at the end)"
    )
    every_num_samples: int = _field(1000, "samples generated for each evaluation during training")
    nearest_k: int = _field(3, "k of the k-nearest-neighbour manifolds of precision and recall (Kynkäänniemi et al. 2019)")
    kid_subsets: int = _field(100, "random subsets averaged by KID")
    kid_subset_size: int = _field(1000, "samples per KID subset (capped at the smaller set's size)")
    cache_dir: str = _field("~/.cache/distill/reference", "where reference-set features are cached, keyed by dataset and extractor")
    batch_size: int = _field(500, "generation and feature-extraction batch for scoring")


@dataclass
class OptimConfig:
    student: OptimizerConfig = _field(OptimizerConfig(lr=1e-5), "optimizer of the student (generator)")
    critic: OptimizerConfig = _field(
        OptimizerConfig(lr=1e-4), "optimizer of the critic: fake score network and GAN head"
    )


@dataclass
class Config:
    output_dir: str = _field("runs/digits-dmd2-1step", "run directory: checkpoints, logs, samples, scores")
    seed: int = _field(0, "seed of every random draw of the run")
    resume: Optional[str] = _field(
        None, "continue a run: 'latest' (newest checkpoint in output_dir) or a checkpoint directory"
    )
    teacher: TeacherConfig = _field(TeacherConfig(), "the pretrained model to distill")
    student: StudentConfig = _field(StudentConfig(), "the few-step generator")
    method: MethodConfig = _field(MethodConfig(), "the distillation method and its losses")
    data: DataConfig = _field(DataConfig(), "training data")
    optim: OptimConfig = _field(OptimConfig(), "optimizers")
    train: TrainConfig = _field(TrainConfig(), "training loop")
    eval: EvalConfig = _field(EvalConfig(), "scoring at the end of training")


# ---------------------------------------------------------------------------------------
# Loading and type checking


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widened to float)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{source}: {key}: expected {_describe(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key, source)
            except ConfigError:
                continue
        raise bad
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if origin is Literal:
        if isinstance(value, bool) and not value and "no" in typing.get_args(tp):
            return "no"  # YAML 1.1 reads a bare `no` (e.g. mixed_precision: no) as false
        if not isinstance(value, bool) and value in typing.get_args(tp):
            return value
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{source}: {key}: must be a finite number, got {value!r}")
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(base: Any, data: dict, prefix: str, source: str) -> Any:
    """``base`` (a dataclass instance holding the defaults) updated with ``data``, checked."""
    cls = type(base)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = f"{prefix}{unknown[0]}"
        section = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"{source}: {key}: unknown key; {section} takes {', '.join(names)}")
    values = {}
    for k, v in data.items():
        default = getattr(base, k)
        if dataclasses.is_dataclass(default):
            v = {} if v is None else v  # a section whose keys are all commented out
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: {prefix}{k}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(default))}, got {v!r}")
            values[k] = _build(default, v, f"{prefix}{k}.", source)
        else:
            values[k] = _coerce(v, hints[k], f"{prefix}{k}", source)
    return dataclasses.replace(base, **values)


def _set_override(data: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: override {dotted}: {k} is not a section")
        node = child
    node[keys[-1]] = value


def load_eval(overrides: list[str], source: str) -> Config:
    """Defaults with ``eval.*`` / ``data.*`` overrides, only those sections validated: the
    settings of ``distill eval`` on an export or a teacher, which has no recipe."""
    data: dict = {}
    for item in overrides:
        key, raw = item.split("=", 1)
        if key.split(".")[0] not in ("eval", "data"):
            raise ConfigError(f"{source}: {key}: only eval.* and data.* settings apply here")
        _set_override(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None, source)
    config = _build(Config(), data, "", source)
    _validate_eval(config.eval, source)
    return config


def load(recipe: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a recipe YAML (or only defaults when ``recipe`` is None), apply ``key=value``
    overrides (values parsed as YAML), validate, and return the config."""
    source = str(recipe) if recipe is not None else "<defaults>"
    data: dict = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"{source}: recipe file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a recipe is a mapping of sections, got {type(data).__name__}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        _set_override(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None, source)
    config = from_dict(data, source)
    validate(config, source)
    return config


def from_dict(data: dict, source: str) -> Config:
    """A config from a (resolved) recipe mapping, every key checked and every missing one at
    the schema's default, without the checks of files and combinations ``load`` adds: how a
    finished run's ``config.yaml`` is read back, even if its teacher has moved since."""
    config = _build(Config(), data, "", source)
    if config.method.gan_loss is None:
        config.method.gan_loss = PAPER_GAN_LOSS[config.method.name]
    return config


# ---------------------------------------------------------------------------------------
# Combinations and files


def _fail(source: str, key: str, message: str) -> None:
    raise ConfigError(f"{source}: {key}: {message}")


def _local_or_hub(path: str) -> Path | None:
    """The local directory `path` names, or None when it reads as a hub id (org/name)."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    # org/name; a dot in the name is fine (stable-diffusion-xl-base-1.0), a file extension is not
    file_like = p.suffix.lower() in (".txt", ".yaml", ".yml", ".json", ".jsonl", ".csv", ".parquet", ".safetensors", ".bin")
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~")) and not file_like
    return None if looks_like_hub_id else p


def teacher_scheduler_config(path: str, revision: str | None = None) -> dict | None:
    """The teacher's scheduler config read from a local directory (no weights), else None."""
    local = _local_or_hub(path)
    if local is None:
        return None
    candidate = local / "scheduler" / "scheduler_config.json"
    return json.loads(candidate.read_text()) if candidate.is_file() else None


def validate(config: Config, source: str) -> None:
    """Check value ranges, combinations and the files the config names."""
    positive = {
        "data.batch_size": config.data.batch_size,
        "train.max_steps": config.train.max_steps,
        "train.gradient_accumulation_steps": config.train.gradient_accumulation_steps,
        "train.checkpoint_every": config.train.checkpoint_every,
        "train.keep_checkpoints": config.train.keep_checkpoints,
        "train.log_every": config.train.log_every,
        "train.max_nonfinite_steps": config.train.max_nonfinite_steps,
        "method.fake_score_updates": config.method.fake_score_updates,
        "optim.student.lr": config.optim.student.lr,
        "optim.critic.lr": config.optim.critic.lr,
        "train.num_grid_samples": config.train.num_grid_samples,
    }
    for key, value in positive.items():
        if value <= 0:
            _fail(source, key, f"must be positive, got {value}")
    for key, value in {
        "train.sample_every": config.train.sample_every,
        "eval.every": config.eval.every,
        "train.max_grad_norm": config.train.max_grad_norm,
        "method.gan_weight": config.method.gan_weight,
        "method.dmd_weight": config.method.dmd_weight,
        "method.r1.weight": config.method.r1.weight,
        "teacher.guidance_scale": config.teacher.guidance_scale,
    }.items():
        if value < 0:
            _fail(source, key, f"must not be negative, got {value}")
    if not 0.0 <= config.train.ema_decay < 1.0:
        _fail(source, "train.ema_decay", f"must be in [0, 1), got {config.train.ema_decay}")
    for name in ("student", "critic"):
        betas = getattr(config.optim, name).betas
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            _fail(source, f"optim.{name}.betas", f"must be two numbers in [0, 1), got {betas}")
    if config.train.max_minutes is not None and config.train.max_minutes <= 0:
        _fail(source, "train.max_minutes", f"must be positive, got {config.train.max_minutes}")

    ts = config.student.timesteps
    if not ts:
        _fail(source, "student.timesteps", "needs at least one timestep")
    if min(ts) < 1:
        _fail(source, "student.timesteps", f"timesteps must be at least 1 (t=0 is the clean image), got {ts}")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        _fail(source, "student.timesteps", f"must be strictly descending, got {ts}")
    if not 0 <= config.method.t_min < config.method.t_max:
        _fail(source, "method.t_min", f"need 0 <= t_min < t_max, got {config.method.t_min} and {config.method.t_max}")
    if config.method.r1.kind != "none" and config.method.gan_weight == 0:
        _fail(source, "method.r1.kind", f"{config.method.r1.kind!r} regularises the GAN discriminator, but method.gan_weight is 0")
    m = config.method
    if m.name == "add":
        if m.discriminator.backbone == "fake_score":
            _fail(source, "method.discriminator.backbone", "ADD has no fake score network: choose dinov2 or teacher")
        if m.gan_weight == 0:
            _fail(source, "method.gan_weight", "ADD's adversarial term needs method.gan_weight > 0")
    else:
        if m.discriminator.backbone != "fake_score" and m.gan_weight == 0:
            _fail(source, "method.discriminator.backbone",
                  f"a {m.discriminator.backbone} discriminator serves DMD2's GAN term, but method.gan_weight is 0")
        if m.discriminator.augment:
            _fail(source, "method.discriminator.augment", "augmentation is implemented for ADD only")
    if m.distill_weight < 0:
        _fail(source, "method.distill_weight", f"must not be negative, got {m.distill_weight}")
    if m.discriminator.head_width <= 0:
        _fail(source, "method.discriminator.head_width", f"must be positive, got {m.discriminator.head_width}")
    if m.discriminator.backbone == "dinov2":
        local = _local_or_hub(m.discriminator.dinov2)
        if local is not None and not (local / "config.json").is_file():
            _fail(source, "method.discriminator.dinov2", f"{local.resolve()} has no config.json (give a DINOv2 directory or a hub id)")
    if config.method.r1.kind == "approximated" and config.method.r1.sigma <= 0:
        _fail(source, "method.r1.sigma", f"must be positive, got {config.method.r1.sigma}")
    _validate_lora(config.student.lora, "student.lora", source)
    _validate_lora(m.fake_score_lora, "method.fake_score_lora", source)
    if m.name == "add" and m.fake_score_lora.rank > 0:
        _fail(source, "method.fake_score_lora.rank", "ADD has no fake score network")
    _validate_data(config, source)

    local = _local_or_hub(config.teacher.path)
    if local is not None and not (local / "model_index.json").is_file():
        where = "does not exist" if not local.exists() else "has no model_index.json"
        _fail(source, "teacher.path", f"{local.resolve()} {where} (give a diffusers pipeline directory or a hub id)")
    scheduler = teacher_scheduler_config(config.teacher.path, config.teacher.revision)
    if scheduler is not None:
        from distill.schedules import FlowSchedule, schedule_from_config

        num_train = scheduler.get("num_train_timesteps", 1000)
        # a flow-matching teacher's t = T is pure noise (sigma = 1): a flow student starts there
        last = num_train if isinstance(schedule_from_config(scheduler), FlowSchedule) else num_train - 1
        for key, value in (("student.timesteps", max(ts)), ("method.t_max", config.method.t_max)):
            if value > last:
                _fail(source, key, f"{value} is beyond the teacher's {num_train} training timesteps (at most {last})")
        from distill.export import few_step_scheduler

        try:
            few_step_scheduler(scheduler, ts)
        except ValueError as err:
            _fail(source, "student.timesteps", str(err))
    _validate_eval(config.eval, source)
    if config.resume not in (None, "latest") and not Path(config.resume).is_dir():
        _fail(source, "resume", f"checkpoint directory {Path(config.resume).resolve()} does not exist")


def _validate_lora(lora: LoraConfig, key: str, source: str) -> None:
    if lora.rank < 0:
        _fail(source, f"{key}.rank", f"must be 0 (no LoRA) or positive, got {lora.rank}")
    if lora.alpha is not None and lora.alpha <= 0:
        _fail(source, f"{key}.alpha", f"must be positive, got {lora.alpha}")
    if lora.rank > 0 and not lora.target_modules:
        _fail(source, f"{key}.target_modules", "a LoRA needs at least one target module")


def _validate_data(config: Config, source: str) -> None:
    d, m = config.data, config.method
    if d.dataset == "digits":
        if d.path is not None:
            _fail(source, "data.path", "the built-in digits take no path (set data.dataset to prompts or image_captions)")
        if d.cache_dir is not None:
            _fail(source, "data.cache_dir", "the built-in digits are encoded by nothing: the cache is for latent teachers' data")
        return
    if d.dataset == "classes":
        if d.path is not None:
            _fail(source, "data.path", "classes are the teacher's own class labels and read no path")
        if d.cache_dir is not None:
            _fail(source, "data.cache_dir", "class labels are encoded by nothing: the cache is for images and prompts")
        if config.eval.clip is not None:
            _fail(source, "eval.clip", "the CLIP score compares samples with their prompts; class labels have none")
    elif d.path is None:
        _fail(source, "data.path", f"the {d.dataset} dataset needs a path: a local file or directory, or an HF datasets hub "
              "id (on the command line: data.path=...)")
    local = _local_or_hub(d.path) if d.path is not None else None
    if local is not None and not local.exists():
        _fail(source, "data.path", f"{local.resolve()} does not exist")
    needs_images = m.name == "add" or m.gan_weight > 0 or (
        len(config.student.timesteps) > 1 and not config.student.backward_simulation)
    if d.dataset in ("prompts", "classes") and needs_images:
        fix = "use image_captions" if d.dataset == "prompts" else "no class-labelled image dataset is supported yet"
        _fail(source, "data.dataset", f"{d.dataset} have no real images, but the GAN / ADD term (or training without "
              f"backward simulation) needs them: {fix}")
    if d.resolution is not None and d.resolution <= 0:
        _fail(source, "data.resolution", f"must be positive, got {d.resolution}")
    if "classifier" in config.eval.features:
        _fail(source, "eval.features", f"the classifier feature space is the digits classifier's; score {d.dataset} "
              "samples in dinov2 (FD-DINOv2) or inception features, or set eval.features: [] and eval.clip")
    if d.dataset in ("prompts", "classes") and config.eval.features:
        _fail(source, "eval.features", f"{d.dataset} have no reference images for FD / precision / recall: set "
              "eval.features: [] (and eval.clip for the CLIP score of prompts) or train on image_captions")


def _validate_eval(e: EvalConfig, source: str) -> None:
    from distill.features import FEATURE_SPACES

    for name in ("num_samples", "every_num_samples", "batch_size", "nearest_k", "kid_subsets", "kid_subset_size"):
        if getattr(e, name) <= 0:
            _fail(source, f"eval.{name}", f"must be positive, got {getattr(e, name)}")
    for name in e.features:
        if name not in FEATURE_SPACES:
            _fail(source, "eval.features", f"unknown feature space {name!r}; choose from {', '.join(FEATURE_SPACES)}")
    if len(set(e.features)) != len(e.features):
        _fail(source, "eval.features", f"lists a feature space twice: {e.features}")
    if "classifier" in e.features and e.classifier is None:
        _fail(source, "eval.features", "the classifier feature space needs eval.classifier (or drop it from eval.features)")
    if e.every and not e.features:
        _fail(source, "eval.every", "evaluation during training needs at least one feature space in eval.features")
    for name in ("num_samples", "every_num_samples"):
        if e.features and getattr(e, name) <= e.nearest_k:
            _fail(source, f"eval.{name}", f"precision/recall with eval.nearest_k={e.nearest_k} need more samples")
    if "dinov2" in e.features:
        local = _local_or_hub(e.dinov2)
        if local is not None and not (local / "config.json").is_file():
            _fail(source, "eval.dinov2", f"{local.resolve()} has no config.json (give a DINOv2 directory or a hub id)")
    if e.clip is not None:
        local = _local_or_hub(e.clip)
        if local is not None and not (local / "config.json").is_file():
            _fail(source, "eval.clip", f"{local.resolve()} has no config.json (give a CLIP directory or a hub id)")
    if e.classifier is not None:
        local = _local_or_hub(e.classifier)
        if local is not None and not (local / "config.json").is_file():
            _fail(source, "eval.classifier", f"{local.resolve()} has no config.json (give a classifier directory or a hub id)")


def check_output_dir(config: Config, source: str) -> None:
    """A new run must not write into another run's directory (it would mix their logs)."""
    if config.resume is None and any((Path(config.output_dir) / "checkpoints").glob("step-*")):
        _fail(source, "output_dir", f"{Path(config.output_dir).resolve()} already holds a run; "
              "continue it with resume=latest or choose another output_dir")


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def dump(config: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (loadable again with ``load``)."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def describe(defaults: Any = None, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(key, help, default) for every field, for `distill validate --keys`."""
    defaults = Config() if defaults is None else defaults
    rows = []
    for f in dataclasses.fields(defaults):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(value, f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", f.metadata.get("help", ""), value))
    return rows
