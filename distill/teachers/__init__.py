"""Teacher adapters, one per diffusers model family, chosen from the checkpoint's own config."""

from __future__ import annotations

from diffusers import DiffusionPipeline

from distill.teachers.base import Teacher, cat_conditions
from distill.teachers.pixel_unet import PixelUNetTeacher

__all__ = ["Teacher", "PixelUNetTeacher", "cat_conditions", "load_teacher"]


def load_teacher(path: str, revision: str | None = None) -> Teacher:
    """Load a teacher from a hub id or a local pipeline directory, picking the adapter from
    the pipeline's ``model_index.json`` (which components it has, and their classes)."""
    try:
        index = DiffusionPipeline.load_config(path, revision=revision)
    except Exception as err:  # hub errors, missing files: say where we looked
        raise FileNotFoundError(
            f"could not read the teacher's model_index.json from {path!r} "
            f"(a local pipeline directory or a hub id; HF_HUB_OFFLINE={__import__('os').environ.get('HF_HUB_OFFLINE', '0')}): {err}"
        ) from err
    unet = index.get("unet")
    if unet is not None and unet[1] == "UNet2DModel":
        return PixelUNetTeacher.from_pretrained(path, revision=revision)
    components = {k: v for k, v in index.items() if not k.startswith("_")}
    raise ValueError(
        f"no teacher adapter for the pipeline at {path!r} ({index.get('_class_name')}, components {components}); "
        "supported: pixel UNet2DModel pipelines"
    )
