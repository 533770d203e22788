"""Teacher adapters, one per diffusers model family, chosen from the checkpoint's own config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from huggingface_hub import hf_hub_download

from distill.teachers.base import COND_PREFIX, Teacher, cached_condition
from distill.teachers.pixel_unet import PixelUNetTeacher
from distill.teachers.stable_diffusion import StableDiffusionTeacher, StableDiffusionXLTeacher
from distill.teachers.sd3 import StableDiffusion3Teacher
from distill.teachers.transformer import DiTTeacher, PixArtTeacher

__all__ = ["COND_PREFIX", "DiTTeacher", "PixArtTeacher", "Teacher", "PixelUNetTeacher", "StableDiffusion3Teacher", "StableDiffusionTeacher", "StableDiffusionXLTeacher", "cached_condition",
           "class_count", "load_teacher", "teacher_from_pipeline"]


def load_teacher(path: str, revision: str | None = None, dtype: torch.dtype = torch.float32,
                 image_size: int | None = None) -> Teacher:
    """Load a teacher from a hub id or a local pipeline directory, picking the adapter from
    the pipeline's ``model_index.json`` (which components it has, and their classes).
    ``dtype``: of its frozen parts; ``image_size``: train and sample at this side instead of
    the checkpoint's default (latent models)."""
    try:
        index = DiffusionPipeline.load_config(path, revision=revision)
    except Exception as err:  # hub errors, missing files: say where we looked
        raise FileNotFoundError(
            f"could not read the teacher's model_index.json from {path!r} "
            f"(a local pipeline directory or a hub id; HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {err}"
        ) from err
    return _adapter_class(index, path).from_pretrained(path, revision=revision, dtype=dtype, image_size=image_size)


def class_count(path: str, revision: str | None = None) -> int | None:
    """The teacher's number of classes from its config files alone (no weights), as its
    adapter reads them (``num_classes_in``); None for a teacher without classes, or whose
    configs cannot be read here (the load then says why)."""
    try:
        index = DiffusionPipeline.load_config(path, revision=revision)
        adapter = _adapter_class(index, path)
    except Exception:
        return None
    if not hasattr(adapter, "num_classes_in"):
        return None
    configs = {}
    for name in [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)]:
        try:
            local = Path(path).expanduser() / name / "config.json"
            file = local if local.parent.parent.is_dir() else hf_hub_download(path, "config.json", subfolder=name,
                                                                               revision=revision)
            configs[name] = json.loads(Path(file).read_text())
        except Exception:  # tokenizers and schedulers have no config.json
            continue
    try:
        return adapter.num_classes_in(configs)
    except KeyError:
        return None


def teacher_from_pipeline(pipe: DiffusionPipeline, image_size: int | None = None) -> Teacher:
    """The adapter over an already loaded pipeline (an export, or a teacher being exported)."""
    return _adapter_class(dict(pipe.config), type(pipe).__name__).from_pipeline(pipe, image_size=image_size)


def _adapter_class(index: dict, source: str) -> type:
    """The adapter for a pipeline, from its components and their classes (model_index.json)."""
    def has(name: str) -> bool:  # absent components are missing or saved as [null, null]
        return bool(index.get(name)) and index[name][0] is not None

    unet = index.get("unet")
    if unet is not None and unet[1] == "UNet2DModel":
        return PixelUNetTeacher
    if unet is not None and unet[1] == "UNet2DConditionModel" and has("vae") and has("text_encoder"):
        return StableDiffusionXLTeacher if has("text_encoder_2") else StableDiffusionTeacher
    transformer = index.get("transformer")
    if transformer is not None and transformer[1] == "FluxTransformer2DModel": from distill.teachers.flux import FluxTeacher; return FluxTeacher  # noqa: E701,E702 (FluxTeacher picks dev / schnell)
    if (transformer is not None and transformer[1] == "SD3Transformer2DModel" and has("vae") and has("text_encoder")
            and has("text_encoder_2")):
        return StableDiffusion3Teacher  # text_encoder_3 (T5) may be absent, as the pipeline allows
    if transformer is not None and transformer[0] is not None and has("vae"):
        name = transformer[1]  # legacy checkpoints name Transformer2DModel for both (diffusers remaps it by norm type)
        if name == "DiTTransformer2DModel" or (name == "Transformer2DModel" and not has("text_encoder")):
            return DiTTeacher
        if has("text_encoder") and index["text_encoder"][1] == "T5EncoderModel" and name in ("PixArtTransformer2DModel",
                                                                                             "Transformer2DModel"):
            return PixArtTeacher
    components = {k: v for k, v in index.items() if not k.startswith("_")}
    raise ValueError(
        f"no teacher adapter for the pipeline at {source!r} ({index.get('_class_name')}, components {components}); "
        "supported: pixel UNet2DModel pipelines; Stable Diffusion 1.x / 2.x (UNet2DConditionModel, AutoencoderKL vae, "
        "CLIP text_encoder), SDXL (the same with text_encoder_2), DiT (DiTPipeline), PixArt-alpha / sigma and SD3 (StableDiffusion3Pipeline)"
    )
