"""Student -> a diffusers pipeline directory that stock diffusers loads and samples.

The exported scheduler is a stock diffusers class (``distill.schedulers.few_step_scheduler``:
LCM, DDIM or flow Euler) configured so that the pipeline's own loop (its timesteps for N steps,
set as the teacher adapter's ``pipeline_set_timesteps`` says it sets them, then the model and
``scheduler.step`` per timestep) reproduces the student's sampler exactly. Every fact of the
teacher's family that the export needs (the denoiser's component, kohya names, the call that
samples the student, the trained size) is its adapter's.

A LoRA student is exported three ways (``FORMATS``): the pipeline with the LoRA fused into
its denoiser; ``lora/``, diffusers' LoRA format for ``pipe.load_lora_weights`` on the
teacher's own pipeline; and ``kohya/``, the same weights under kohya / ComfyUI key names
(``distill.export.lora``). ``distill.export.card`` writes the model card.

A fully trained student has two more: ``lora-extract``, a LoRA of chosen rank taken from it
by truncated SVD of its weights' difference from the teacher's, written in the LoRA formats
(``distill.export.extracted``; the card reports how far its images are from the full
student's); and ``single-file``, the pipeline as one checkpoint in the
original key layout for AUTOMATIC1111 / ComfyUI, for the families whose layout
``distill.teachers.single_file`` knows (``single_file_layout``; ``SINGLE_FILE``).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Sequence

import yaml

from distill.export.card import model_card
from distill.export.lora import KOHYA_DIR, KOHYA_FILE, LORA_DIR, save_diffusers_lora, save_kohya_lora
from distill.runs import STUDENT, load_run, read_metrics
from distill.schedulers import few_step_scheduler
from distill.students import fuse, is_lora_checkpoint, load_student, lora_state_dict
from distill.teachers import load_pipeline, teacher_from_pipeline

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
    images of its distance for a text-to-image teacher) and ``"single-file"`` (where ``single_file_layout`` knows the family)."""
    run = load_run(run_dir, checkpoint)
    student_dir = run.checkpoint / STUDENT
    teacher_path, revision, timesteps = run.config.teacher.path, run.config.teacher.revision, run.config.student.timesteps
    pipe = load_pipeline(teacher_path, revision)
    lora = is_lora_checkpoint(student_dir)
    resolution = run.config.data.resolution  # trained at another size than the checkpoint's default
    teacher = teacher_from_pipeline(pipe, image_size=resolution)
    # the timesteps the pipeline's call gives are the student's (set as the adapter says the pipeline sets them)
    scheduler = few_step_scheduler(teacher.scheduler_config, timesteps, set_timesteps=teacher.pipeline_set_timesteps)
    component = teacher.component
    formats = _formats(formats, lora, type(pipe), teacher.kohya_prefix)
    if "lora-extract" in formats and (rank is None or rank < 1):
        raise ValueError(f"export format lora-extract needs the LoRA's rank, at least 1 (--rank N), got {rank}")
    if "single-file" in formats:
        from distill.teachers.single_file import single_file_layout

        single_file_layout(pipe)  # raises for a pipeline the original layout has no names for, before anything is written
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
            save_kohya_lora(teacher.kohya_prefix, state, lora_config, out_dir / KOHYA_DIR / KOHYA_FILE)
        student = fuse(student)  # pipe's own denoiser, now with the LoRA merged
    extracted = None
    if "lora-extract" in formats:
        from distill.export.extracted import export_extracted_lora

        extracted = export_extracted_lora(pipe=pipe, teacher=teacher, component=component, student=student, rank=rank,
                                          timesteps=timesteps, out_dir=out_dir, prompts=prompts)
    if resolution is not None:  # the pipeline's default height / width: the trained size, where it can be
        teacher.register_sample_size(student)
    pipe.register_modules(**{component: student, "scheduler": scheduler})
    if "single-file" in formats:
        from distill.teachers.single_file import save_single_file

        save_single_file(pipe, out_dir / SINGLE_FILE)
    if "pipeline" in formats:
        pipe.save_pretrained(out_dir, safe_serialization=True)
    else:
        scheduler.save_pretrained(out_dir / "scheduler")

    call = inspect.signature(type(pipe).__call__).parameters
    (out_dir / "README.md").write_text(
        model_card(
            teacher=teacher_path,
            recipe=run.recipe,
            timesteps=timesteps,
            scheduler=type(scheduler).__name__,
            component=component,
            denoiser_class=denoiser_class,
            num_classes=teacher.num_classes,
            metrics=read_metrics(run_dir),
            checkpoint=run.checkpoint.name,
            text="prompt" in call,
            label_call="class_labels" in call,
            formats=formats,
            lora=lora_info,
            image_size=resolution,
            extracted=extracted,
            call_kwargs=teacher.pipeline_kwargs(),
            embedded_guidance=teacher.guidance == "embedded",
            global_rng=not teacher.step_uses_generator,
        )
    )
    (out_dir / RECIPE_FILE).write_text(yaml.safe_dump(run.recipe, sort_keys=False))
    return out_dir


def _formats(requested: Sequence[str] | None, lora: bool, pipeline_class: type, kohya_prefix: str | None) -> tuple[str, ...]:
    has_loader = hasattr(pipeline_class, "save_lora_weights")
    if requested is None:
        if not (lora and has_loader):
            return ("pipeline",)
        return ("pipeline", "lora", "kohya") if kohya_prefix is not None else ("pipeline", "lora")  # kohya names only some families' modules
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
    if "kohya" in requested and kohya_prefix is None:
        raise ValueError(f"no kohya / ComfyUI key names are known for {pipeline_class.__name__}'s denoiser: export the "
                         "pipeline or the diffusers LoRA (formats pipeline, lora)")
    return requested
