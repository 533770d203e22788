"""Teacher adapters, one per diffusers model family, chosen from the checkpoint's own config
by the family registry (``distill.teachers.registry``). A family is one adapter module and
one ``register`` line below."""

from __future__ import annotations

from distill.teachers.base import COND_PREFIX, Teacher, TeacherBase, cached_condition
from distill.teachers.flux import FluxTeacher
from distill.teachers.pixel_unet import PixelUNetTeacher
from distill.teachers.registry import (ADAPTERS, PIPELINES, adapter_class, load_pipeline, load_teacher, read_index,
                                       register, teacher_from_pipeline)
from distill.teachers.sd3 import StableDiffusion3Teacher
from distill.teachers.stable_diffusion import StableDiffusionTeacher, StableDiffusionXLTeacher
from distill.teachers.transformer import DiTTeacher, PixArtTeacher

register(PixelUNetTeacher, pipelines=("DDPMPipeline", "DDIMPipeline"))
register(StableDiffusionTeacher, pipelines=("StableDiffusionPipeline",))
register(StableDiffusionXLTeacher, pipelines=("StableDiffusionXLPipeline",))
register(DiTTeacher, pipelines=("DiTPipeline",))
register(PixArtTeacher, pipelines=("PixArtAlphaPipeline", "PixArtSigmaPipeline"))
register(StableDiffusion3Teacher, pipelines=("StableDiffusion3Pipeline",))
register(FluxTeacher, pipelines=("FluxPipeline",))

__all__ = ["ADAPTERS", "COND_PREFIX", "DiTTeacher", "FluxTeacher", "PIPELINES", "PixArtTeacher", "PixelUNetTeacher",
           "StableDiffusion3Teacher", "StableDiffusionTeacher", "StableDiffusionXLTeacher", "Teacher", "TeacherBase",
           "adapter_class", "cached_condition", "load_pipeline", "load_teacher", "read_index", "register",
           "teacher_from_pipeline"]
