"""The family registry: which adapter reads a diffusers pipeline, as diffusers' AutoPipeline
tables map names to classes.

An adapter is registered once (``register``, in ``distill.teachers``) with the pipeline classes
whose checkpoints it reads (``model_index.json``'s ``_class_name``). A checkpoint of a
registered pipeline class goes to that adapter when its components fit (``adapter.reads``);
any other checkpoint (an unknown or a custom pipeline class, or a registered one missing a
component, e.g. an SDXL pipeline saved without its second text encoder) goes to the adapter
whose components it has."""

from __future__ import annotations

import os

import torch
from diffusers import DiffusionPipeline

from distill.teachers.base import Teacher

ADAPTERS: list[type] = []  # registered adapter classes, in registration order
PIPELINES: dict[str, type] = {}  # pipeline class name -> adapter class


def register(adapter: type, pipelines: tuple[str, ...] = ()) -> type:
    """Register ``adapter`` for checkpoints of the pipeline classes named ``pipelines`` (and for
    any checkpoint whose components it ``reads``)."""
    for name in pipelines:
        if PIPELINES.get(name, adapter) is not adapter:
            raise ValueError(f"{name} is registered to {PIPELINES[name].__name__} already")
        PIPELINES[name] = adapter
    if adapter not in ADAPTERS:
        ADAPTERS.append(adapter)
    return adapter


def adapter_class(index: dict, source: str) -> type:
    """The adapter class for a pipeline's ``model_index.json`` ``index`` (``source``: where it
    was read, for the error): the one registered for its pipeline class if its components fit,
    else the one whose components they are."""
    named = PIPELINES.get(index.get("_class_name"))
    if named is not None and named.reads(index):
        return named
    fitting = [adapter for adapter in ADAPTERS if adapter.reads(index)]
    if len(fitting) == 1:
        return fitting[0]
    components = {k: v for k, v in index.items() if not k.startswith("_")}
    if fitting:
        raise ValueError(f"the pipeline at {source!r} ({index.get('_class_name')}, components {components}) reads as "
                         f"{[a.__name__ for a in fitting]}: register its pipeline class with one of them")
    raise ValueError(
        f"no teacher adapter for the pipeline at {source!r} ({index.get('_class_name')}, components {components}); "
        f"supported: {'; '.join(adapter.family for adapter in ADAPTERS)}"
    )


def read_index(path: str, revision: str | None = None) -> dict:
    """A pipeline's ``model_index.json`` (a local directory or a hub id)."""
    try:
        return DiffusionPipeline.load_config(path, revision=revision)
    except Exception as err:  # hub errors, missing files: say where we looked
        raise FileNotFoundError(
            f"could not read the teacher's model_index.json from {path!r} "
            f"(a local pipeline directory or a hub id; HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {err}"
        ) from err


def load_teacher(path: str, revision: str | None = None, dtype: torch.dtype = torch.float32,
                 image_size: int | None = None) -> Teacher:
    """Load a teacher from a hub id or a local pipeline directory, picking the adapter from
    the pipeline's ``model_index.json`` (``adapter_class``). ``dtype``: of its frozen parts;
    ``image_size``: train and sample at this side instead of the checkpoint's default (latent
    models)."""
    return adapter_class(read_index(path, revision), path).from_pretrained(path, revision=revision, dtype=dtype,
                                                                         image_size=image_size)


def load_pipeline(path: str, revision: str | None = None) -> DiffusionPipeline:
    """The stock pipeline of a teacher or an export (safetensors only), its absent components
    passed as None as its adapter says they must be."""
    index = read_index(path, revision)
    absent = adapter_class(index, path).absent_components(index)
    return DiffusionPipeline.from_pretrained(path, revision=revision, use_safetensors=True, **absent)


def teacher_from_pipeline(pipe: DiffusionPipeline, image_size: int | None = None) -> Teacher:
    """The adapter over an already loaded pipeline (an export, or a teacher being exported)."""
    return adapter_class(dict(pipe.config), type(pipe).__name__).from_pipeline(pipe, image_size=image_size)
