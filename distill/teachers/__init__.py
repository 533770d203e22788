"""Teacher adapters, one per diffusers model family, chosen from the checkpoint's own config."""

from __future__ import annotations

import os

from diffusers import DiffusionPipeline

from distill.teachers.base import COND_PREFIX, Teacher, cached_condition, cat_conditions, real_x0
from distill.teachers.pixel_unet import PixelUNetTeacher

__all__ = ["COND_PREFIX", "Teacher", "PixelUNetTeacher", "cached_condition", "cat_conditions", "load_teacher", "real_x0",
           "teacher_from_pipeline"]


def load_teacher(path: str, revision: str | None = None) -> Teacher:
    """Load a teacher from a hub id or a local pipeline directory, picking the adapter from
    the pipeline's ``model_index.json`` (which components it has, and their classes)."""
    try:
        index = DiffusionPipeline.load_config(path, revision=revision)
    except Exception as err:  # hub errors, missing files: say where we looked
        raise FileNotFoundError(
            f"could not read the teacher's model_index.json from {path!r} "
            f"(a local pipeline directory or a hub id; HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {err}"
        ) from err
    return _adapter_class(index, path).from_pretrained(path, revision=revision)


def teacher_from_pipeline(pipe: DiffusionPipeline) -> Teacher:
    """The adapter over an already loaded pipeline (an export, or a teacher being exported)."""
    return _adapter_class(dict(pipe.config), type(pipe).__name__).from_pipeline(pipe)


def _adapter_class(index: dict, source: str) -> type:
    """The adapter for a pipeline, from its components and their classes (model_index.json)."""
    unet = index.get("unet")
    if unet is not None and unet[1] == "UNet2DModel":
        return PixelUNetTeacher
    components = {k: v for k, v in index.items() if not k.startswith("_")}
    raise ValueError(
        f"no teacher adapter for the pipeline at {source!r} ({index.get('_class_name')}, components {components}); "
        "supported: pixel UNet2DModel pipelines"
    )
