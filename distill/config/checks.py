"""The checks of a recipe beyond keys and types: value ranges, combinations, and the files
it names (teacher, data, evaluation models), all before any weights load. Sections check
themselves where they can (``LoraConfig.check``, each method's ``check``); this module runs
them and the checks that span sections. A check reports with ``distill.sections.fail(key,
message)``; ``validate`` adds the recipe file.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

from distill.config.schema import Config, EvalConfig, check_scale_settings
from distill.errors import ConfigError, SettingError
from distill.sections import check_not_negative, check_positive, fail, local_or_hub


@contextmanager
def keyed_errors(source: str):
    """Re-raise a section check's ``SettingError`` as a ``ConfigError`` that names ``source``."""
    try:
        yield
    except SettingError as err:
        raise ConfigError(f"{source}: {err.key}: {err.message}") from None


def teacher_scheduler_config(path: str, revision: str | None = None) -> dict | None:
    """The teacher's scheduler config read from a local directory (no weights), else None."""
    return _local_json(path, "scheduler/scheduler_config.json")


def _local_json(path: str, name: str) -> dict | None:
    local = local_or_hub(path)
    candidate = local / name if local is not None else None
    return json.loads(candidate.read_text()) if candidate is not None and candidate.is_file() else None


def teacher_adapter_class(path: str) -> type | None:
    """The adapter class a local teacher's model_index.json picks (no weights load), else None
    (a hub id: checked when it loads)."""
    from distill.teachers import adapter_class

    index = _local_json(path, "model_index.json")
    if index is None:
        return None
    try:
        return adapter_class(index, path)
    except ValueError as err:
        fail("teacher.path", str(err))


def validate(config: Config, source: str) -> None:
    """Check value ranges, combinations and the files the config names."""
    with keyed_errors(source):
        _check(config)


def _check(config: Config) -> None:
    t, s, d, m = config.train, config.student, config.data, config.method
    check_positive({
        "data.batch_size": d.batch_size,
        "train.max_steps": t.max_steps,
        "train.gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train.checkpoint_every": t.checkpoint_every,
        "train.keep_checkpoints": t.keep_checkpoints,
        "train.log_every": t.log_every,
        "train.max_nonfinite_steps": t.max_nonfinite_steps,
        "optim.student.lr": config.optim.student.lr,
        "optim.critic.lr": config.optim.critic.lr,
        "train.num_grid_samples": t.num_grid_samples,
    })
    check_not_negative({
        "train.sample_every": t.sample_every,
        "eval.every": config.eval.every,
        "train.max_grad_norm": t.max_grad_norm,
        **({"teacher.guidance_scale": config.teacher.guidance_scale} if config.teacher.guidance_scale is not None else {}),
    })
    if not 0.0 <= t.ema_decay < 1.0:
        fail("train.ema_decay", f"must be in [0, 1), got {t.ema_decay}")
    for name in ("student", "critic"):
        betas = getattr(config.optim, name).betas
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            fail(f"optim.{name}.betas", f"must be two numbers in [0, 1), got {betas}")
    if t.max_minutes is not None and t.max_minutes <= 0:
        fail("train.max_minutes", f"must be positive, got {t.max_minutes}")

    ts = s.timesteps
    if not ts:
        fail("student.timesteps", "needs at least one timestep")
    if min(ts) < 1:
        fail("student.timesteps", f"timesteps must be at least 1 (t=0 is the clean image), got {ts}")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        fail("student.timesteps", f"must be strictly descending, got {ts}")
    m.check(num_steps=len(ts), backward_simulation=s.backward_simulation)
    s.lora.check("student.lora")
    _check_data(config)
    check_scale_settings(config)

    adapter = teacher_adapter_class(config.teacher.path)
    scheduler = teacher_scheduler_config(config.teacher.path, config.teacher.revision)
    if adapter is not None and scheduler is not None:
        _check_timesteps(config, scheduler, adapter)
    check_eval(config.eval)


def _check_timesteps(config: Config, scheduler: dict, adapter: type) -> None:
    """The student's timesteps and the method's against the teacher's scheduler config, and
    whether an export's scheduler can give them under the pipeline's call (the adapter class's
    ``pipeline_set_timesteps``, as the export builds it)."""
    from distill.schedulers import few_step_scheduler
    from distill.schedules import schedule_from_config

    schedule = schedule_from_config(scheduler)
    last = schedule.last_timestep  # a flow-matching teacher's t = T is pure noise (sigma = 1): a flow student starts there
    ts = config.student.timesteps
    for key, value in {"student.timesteps": max(ts), **config.method.timestep_settings()}.items():
        if value > last:
            fail(key, f"{value} is beyond the teacher's {schedule.num_train_timesteps} training timesteps (at most {last})")
    try:
        few_step_scheduler(scheduler, ts, set_timesteps=adapter.pipeline_set_timesteps)
    except ValueError as err:
        fail("student.timesteps", str(err))


def _check_data(config: Config) -> None:
    d, s = config.data, config.student
    if d.dataset == "digits":
        if d.path is not None:
            fail("data.path", "the built-in digits take no path (set data.dataset to prompts or image_captions)")
        if d.cache_dir is not None:
            fail("data.cache_dir", "the built-in digits are encoded by nothing: the cache is for latent teachers' data")
        return
    if d.dataset == "classes":
        if d.path is not None:
            fail("data.path", "classes are the teacher's own class labels and read no path")
        if d.cache_dir is not None:
            fail("data.cache_dir", "class labels are encoded by nothing: the cache is for images and prompts")
        if config.eval.clip is not None:
            fail("eval.clip", "the CLIP score compares samples with their prompts; class labels have none")
    elif d.path is None:
        fail("data.path", f"the {d.dataset} dataset needs a path: a local file or directory, or an HF datasets hub "
             "id (on the command line: data.path=...)")
    needs_images = config.method.needs_real_images(num_steps=len(s.timesteps), backward_simulation=s.backward_simulation)
    if d.dataset in ("prompts", "classes") and needs_images:
        fix = "use image_captions" if d.dataset == "prompts" else "no class-labelled image dataset is supported yet"
        fail("data.dataset", f"{d.dataset} have no real images, but method {config.method.name} (its GAN term, or "
             f"training without backward simulation) needs them: {fix}")
    if d.resolution is not None and d.resolution <= 0:
        fail("data.resolution", f"must be positive, got {d.resolution}")
    if "classifier" in config.eval.features:
        fail("eval.features", f"the classifier feature space is the digits classifier's; score {d.dataset} "
             "samples in dinov2 (FD-DINOv2) or inception features, or set eval.features: [] and eval.clip")
    if d.dataset in ("prompts", "classes") and config.eval.cmmd:
        fail("eval.cmmd", f"{d.dataset} have no reference images for CMMD: train on image_captions, or give distill "
             "eval --reference")
    if d.dataset in ("prompts", "classes") and config.eval.features:
        fail("eval.features", f"{d.dataset} have no reference images for FD / precision / recall: set "
             "eval.features: [] (and eval.clip for the CLIP score of prompts) or train on image_captions")


def check_eval(e: EvalConfig) -> None:
    """The ``eval`` section alone (also ``distill eval``'s settings, which have no recipe)."""
    from distill.features import FEATURE_SPACES

    check_positive({f"eval.{name}": getattr(e, name) for name in
                    ("num_samples", "every_num_samples", "batch_size", "nearest_k", "kid_subsets", "kid_subset_size")
                    if getattr(e, name) is not None})
    for name in e.features:
        if name not in FEATURE_SPACES:
            fail("eval.features", f"unknown feature space {name!r}; choose from {', '.join(FEATURE_SPACES)}")
    if len(set(e.features)) != len(e.features):
        fail("eval.features", f"lists a feature space twice: {e.features}")
    if "classifier" in e.features and e.classifier is None:
        fail("eval.features", "the classifier feature space needs eval.classifier (or drop it from eval.features)")
    if e.cmmd and e.clip is None:
        fail("eval.cmmd", "CMMD embeds images with CLIP: set eval.clip (distill eval --clip) to a CLIP model, a local "
             "directory or hub id, e.g. openai/clip-vit-large-patch14-336 (the paper's)")
    if e.every and not e.features:
        fail("eval.every", "evaluation during training needs at least one feature space in eval.features")
    for name in ("num_samples", "every_num_samples"):
        if e.features and getattr(e, name) is not None and getattr(e, name) <= e.nearest_k:
            fail(f"eval.{name}", f"precision/recall with eval.nearest_k={e.nearest_k} need more samples")
