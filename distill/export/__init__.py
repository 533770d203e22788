"""Student -> a diffusers pipeline directory that stock diffusers loads and samples.

The exported scheduler is a stock diffusers class (``distill.schedulers.few_step_scheduler``:
LCM, DDIM or flow Euler) configured so that the standard loop (``scheduler.set_timesteps(N)``,
then the model and ``scheduler.step`` per timestep) reproduces the student's sampler exactly.

A LoRA student is exported three ways (``FORMATS``): the pipeline with the LoRA fused into
its denoiser; ``lora/``, diffusers' LoRA format for ``pipe.load_lora_weights`` on the
teacher's own pipeline; and ``kohya/``, the same weights under kohya / ComfyUI key names
(``distill.export.lora``). ``distill.export.card`` writes the model card.

A fully trained student has two more: ``lora-extract``, a LoRA of chosen rank taken from it
by truncated SVD of its weights' difference from the teacher's, written in the LoRA formats
(``distill.export.extracted``; the card reports how far its images are from the full
student's); and ``single-file``, an SD 1.x / 2.x / SDXL pipeline as one checkpoint in the
original key layout for AUTOMATIC1111 / ComfyUI (``distill.single_file``, ``SINGLE_FILE``).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Sequence

import torch
import yaml
from diffusers import DiffusionPipeline

from distill.export.card import model_card
from distill.export.lora import KOHYA_DIR, KOHYA_FILE, LORA_DIR, save_diffusers_lora, save_kohya_lora
from distill.runs import STUDENT, load_run, read_metrics
from distill.schedulers import few_step_scheduler
from distill.students import ADAPTER_WEIGHTS, fuse, is_lora_checkpoint, load_student, lora_state_dict

FORMATS = ("pipeline", "lora", "kohya", "lora-extract", "single-file")
RECIPE_FILE = "distill_recipe.yaml"  # the run's resolved recipe, beside the model card
SINGLE_FILE = "distill_student.safetensors"  # the single-file checkpoint, in the original layout
__all__ = ["FORMATS", "KOHYA_DIR", "KOHYA_FILE", "LORA_DIR", "RECIPE_FILE", "SINGLE_FILE", "export"]


def export(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "latest",
           formats: Sequence[str] | None = None, rank: int | None = None, prompts: list[str] | None = None) -> Path:
    """Write the run's student (EMA weights) to ``out_dir`` with a model card; returns ``out_dir``.

    ``formats`` (default: every one the student has): ``"pipeline"``, the teacher's pipeline
    with the student's denoiser (a LoRA fused in) and a few-step scheduler, in ``out_dir``;
    for a LoRA student also ``"lora"`` (``lora/``, for ``pipe.load_lora_weights`` on the
    teacher's pipeline) and ``"kohya"`` (``kohya/distill_lora.safetensors``). The LoRA
    formats need a LoRA student and a pipeline class with a diffusers LoRA loader; the
    default leaves them out where the pipeline has none. ``scheduler/`` is always written.
    A full student also takes ``"lora-extract"`` (needs ``rank``; ``prompts`` condition the
    images of its distance for a text-to-image teacher) and ``"single-file"`` (SD / SDXL)."""
    run = load_run(run_dir, checkpoint)
    student_dir = run.checkpoint / STUDENT
    teacher_path, revision, timesteps = run.config.teacher.path, run.config.teacher.revision, run.config.student.timesteps
    # components saved as [null, null] (e.g. SD3 without T5) load only when passed as None again
    absent = {k: None for k, v in DiffusionPipeline.load_config(teacher_path, revision=revision).items()
              if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is None}
    pipe = DiffusionPipeline.from_pretrained(teacher_path, revision=revision, use_safetensors=True, **absent)
    lora = is_lora_checkpoint(student_dir)
    resolution = run.config.data.resolution  # trained at another size than the checkpoint's default
    teacher = _teacher_or_none(pipe, resolution)
    scheduler_config = teacher.scheduler_config if teacher else {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}
    scheduler = few_step_scheduler(scheduler_config, timesteps)
    component = _denoiser_component(pipe, teacher, student_dir)
    formats = _formats(formats, lora, type(pipe), component)
    if "lora-extract" in formats and (rank is None or rank < 1):
        raise ValueError(f"export format lora-extract needs the LoRA's rank, at least 1 (--rank N), got {rank}")
    if "single-file" in formats:
        from distill.single_file import _layout

        _layout(pipe)  # an SD / SDXL pipeline, before anything is written
    teacher_denoiser = pipe.components[component]
    denoiser_class = type(teacher_denoiser).__name__
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    student = load_student(teacher_denoiser, student_dir)
    lora_info = None
    if lora:
        state, lora_config = lora_state_dict(student)
        lora_info = {"rank": lora_config.r, "alpha": lora_config.lora_alpha}
        if "lora" in formats:
            save_diffusers_lora(type(pipe), component, state, lora_config, out_dir / LORA_DIR)
        if "kohya" in formats:
            save_kohya_lora(component, state, lora_config, out_dir / KOHYA_DIR / KOHYA_FILE)
        student = fuse(student)  # pipe's own denoiser, now with the LoRA merged
    extracted = None
    if "lora-extract" in formats:
        from distill.export.extracted import export_extracted_lora

        extracted = export_extracted_lora(pipe=pipe, teacher=teacher, component=component, student=student, rank=rank,
                                          timesteps=timesteps, out_dir=out_dir, prompts=prompts)
    if resolution is not None and teacher is not None and hasattr(student.config, "sample_size"):
        # the pipelines' default height / width is sample_size x the VAE factor: make it the trained size
        student.register_to_config(sample_size=teacher.sample_shape[-1])
    pipe.register_modules(**{component: student, "scheduler": scheduler})
    if "single-file" in formats:
        from distill.single_file import save_single_file

        save_single_file(pipe, out_dir / SINGLE_FILE)
    if "pipeline" in formats:
        pipe.save_pretrained(out_dir, safe_serialization=True)
    else:
        scheduler.save_pretrained(out_dir / "scheduler")

    (out_dir / "README.md").write_text(
        model_card(
            teacher=teacher_path,
            recipe=run.recipe,
            timesteps=timesteps,
            scheduler=type(scheduler).__name__,
            component=component,
            denoiser_class=denoiser_class,
            num_classes=teacher.num_classes if teacher else None,
            metrics=read_metrics(run_dir),
            checkpoint=run.checkpoint.name,
            text="prompt" in inspect.signature(type(pipe).__call__).parameters,
            label_call="class_labels" in inspect.signature(type(pipe).__call__).parameters,
            formats=formats,
            lora=lora_info,
            image_size=resolution,
            extracted=extracted,
        )
    )
    (out_dir / RECIPE_FILE).write_text(yaml.safe_dump(run.recipe, sort_keys=False))
    return out_dir


def _formats(requested: Sequence[str] | None, lora: bool, pipeline_class: type, component: str) -> tuple[str, ...]:
    has_loader = hasattr(pipeline_class, "save_lora_weights")
    if requested is None:
        if not (lora and has_loader):
            return ("pipeline",)
        return FORMATS if component == "unet" else ("pipeline", "lora")  # kohya keys name UNet modules only
    requested = tuple(requested)
    unknown = [f for f in requested if f not in FORMATS]
    if unknown or not requested:
        raise ValueError(f"unknown export format(s) {unknown or requested}; choose from {list(FORMATS)}")
    if "lora-extract" in requested and lora:
        raise ValueError("export format lora-extract takes a LoRA from a fully trained student, but this run trained a "
                         "LoRA (student.lora.rank > 0): export its own LoRA with formats lora / kohya")
    wants_lora = [f for f in requested if f in ("lora", "kohya")]
    if wants_lora and not lora:
        raise ValueError(f"export formats {wants_lora} need a LoRA student, but this run trained every weight "
                         "(student.lora.rank = 0): export the pipeline, or a LoRA extracted from it (lora-extract --rank N)")
    if wants_lora and not has_loader:
        raise ValueError(f"{pipeline_class.__name__} has no diffusers LoRA loader, so formats {wants_lora} do not "
                         "apply: export the pipeline (the LoRA fused in)")
    return requested


def _teacher_or_none(pipe, image_size: int | None = None):
    """The teacher adapter over ``pipe``, or None for a pipeline no adapter reads yet (its
    scheduler then comes from ``pipe.scheduler`` and it has no class labels)."""
    from distill.teachers import teacher_from_pipeline

    try:
        return teacher_from_pipeline(pipe, image_size=image_size)
    except ValueError:
        return None


def _denoiser_component(pipe, teacher, student_dir: Path) -> str:
    """The pipeline component the student replaces: the teacher adapter's denoiser; without
    an adapter, the component of the saved student's class (full) or the one that has every
    module the LoRA adapts."""
    modules = {name: m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    if teacher is not None:
        found = [n for n, m in modules.items() if m is teacher.denoiser] or [
            n for n, m in modules.items() if type(m) is type(teacher.denoiser)]
    elif is_lora_checkpoint(student_dir):
        from safetensors import safe_open

        with safe_open(student_dir / ADAPTER_WEIGHTS, "pt") as f:
            targets = {key.split(".lora_")[0] for key in f.keys()}
        found = [n for n, m in modules.items() if targets <= {name for name, _ in m.named_modules()}]
    else:
        class_name = json.loads((student_dir / "config.json").read_text())["_class_name"]
        found = [n for n, m in modules.items() if type(m).__name__ == class_name]
    if len(found) != 1:
        raise ValueError(f"cannot tell which component of {type(pipe).__name__} the student replaces (candidates {found})")
    return found[0]
