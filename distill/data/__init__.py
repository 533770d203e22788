"""Datasets and the deterministic order in which training reads them.

- ``digits``: the built-in benchmark (scikit-learn's digits, no network);
- ``order``: ``step_generator``, ``EpochSampler``, ``collate`` and ``StepBatches`` (resumable data
  order, read ahead by DataLoader workers);
- ``classes``: class labels only, for data-free distillation of class-conditional latent
  teachers (DiT);
- ``text``: prompts and captioned images through Hugging Face ``datasets``;
- ``reference``: the real images samples are scored against;
- ``cache``: the on-disk cache of VAE latents and text embeddings.

``make_dataset`` builds the training dataset a recipe's ``data.dataset`` names.
"""

from __future__ import annotations

import torch

from distill.data.cache import CachedDataset, cache_path, cached_dataset
from distill.data.classes import CLASS_REPEATS, ClassLabelDataset
from distill.data.digits import DIGITS_HOLDOUT, DIGITS_NUM_CLASSES, DigitsDataset, load_digits
from distill.data.order import EpochSampler, StepBatches, StepGenerator, agreed, collate, collate_items, step_generator
from distill.data.reference import image_reference_set, reference_set
from distill.data.text import ImageCaptionDataset, PromptDataset, preprocess_image

__all__ = ["CLASS_REPEATS", "CachedDataset", "ClassLabelDataset", "DIGITS_HOLDOUT", "DIGITS_NUM_CLASSES", "DigitsDataset",
           "EpochSampler", "ImageCaptionDataset", "StepBatches", "StepGenerator", "agreed", "collate_items", "PromptDataset", "cache_path", "cached_dataset", "collate",
           "image_reference_set", "load_digits", "make_dataset", "preprocess_image", "reference_set", "step_generator"]


def make_dataset(*, dataset: str, path: str | None, split: str, prompt_column: str, image_column: str,
                 resolution: int | None, num_classes: int | None = None, on_bad_item: str = "error",
                 min_image_size: int | None = None) -> torch.utils.data.Dataset:
    """The training dataset named by ``dataset`` (the config's ``data.*`` values):
    ``digits`` -> DigitsDataset("train"), ``classes`` -> ClassLabelDataset(``num_classes``: the
    caller passes the teacher's), ``prompts`` -> PromptDataset, ``image_captions`` ->
    ImageCaptionDataset (``resolution`` required: the caller passes the teacher's image size
    when the config leaves it null; ``on_bad_item`` / ``min_image_size``: see
    ``distill.data.items``)."""
    if dataset in ("digits", "classes") and path is not None:
        raise ValueError(f"{dataset} reads no path; got path {path!r}")
    if dataset == "digits":
        return DigitsDataset("train")
    if dataset == "classes":
        if num_classes is None:
            raise ValueError("dataset 'classes' needs num_classes: the teacher is not class-conditional")
        return ClassLabelDataset(num_classes)
    if dataset not in ("prompts", "image_captions"):
        raise ValueError(f"unknown dataset {dataset!r}; expected 'digits', 'classes', 'prompts' or 'image_captions'")
    if path is None:
        raise ValueError(f"dataset {dataset!r} needs a path (a file, directory or hub id)")
    if dataset == "prompts":
        return PromptDataset(path, split=split, column=prompt_column)
    if resolution is None:
        raise ValueError("dataset 'image_captions' needs a resolution (the side of the square training images)")
    return ImageCaptionDataset(path, split=split, image_column=image_column, caption_column=prompt_column,
                               resolution=resolution, on_bad_item=on_bad_item, min_image_size=min_image_size)
