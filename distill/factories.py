"""The objects recipe sections describe, built from them: what the trainer and the CLI
(``distill eval``) both build. Each takes the one section it reads, never the whole config."""

from __future__ import annotations

from pathlib import Path

import torch

from distill.config import DataConfig, EvalConfig, TeacherConfig
from distill.data import image_reference_set, make_dataset
from distill.evaluate import Scorer


def scorer_from_config(e: EvalConfig, dataset: str, device, reference=None) -> Scorer:
    """The ``Scorer`` a recipe's ``eval`` section describes, for its dataset (``reference``:
    see ``eval_reference``)."""
    return Scorer(feature_spaces=e.features, dataset=dataset, classifier=e.classifier, dinov2=e.dinov2,
                  cache_dir=e.cache_dir, nearest_k=e.nearest_k, kid_subsets=e.kid_subsets,
                  kid_subset_size=e.kid_subset_size, batch_size=e.batch_size, device=device, clip=e.clip, cmmd=e.cmmd,
                  reference=reference)


def dataset_from_config(d: DataConfig, *, resolution: int, num_classes: int | None = None):
    """The dataset a recipe's ``data`` section names (images at ``resolution``)."""
    return make_dataset(dataset=d.dataset, path=d.path, split=d.split, prompt_column=d.prompt_column,
                        image_column=d.image_column, resolution=resolution, num_classes=num_classes,
                        on_bad_item=d.on_bad_item, min_image_size=d.min_image_size)


def eval_reference(dataset, e: EvalConfig) -> tuple[str, torch.Tensor] | None:
    """The real images samples are scored against when the data is an image-caption set (a
    fixed subset of ``eval.num_samples``); None for the built-in digits (their own reference
    set) and for prompts (no images)."""
    if not e.features or not hasattr(dataset, "table"):
        return None
    key, images, _ = image_reference_set(dataset, num=min(e.num_samples, len(dataset)))
    return key, images


def teacher_identity(t: TeacherConfig, image_size) -> str:
    """Names the teacher's encoders for the latent / embedding cache: path, revision, dtype,
    image size and, for a local directory, the size and time of every weight file."""
    parts = [t.path, str(t.revision), t.dtype, f"{image_size[0]}x{image_size[1]}"]
    local = Path(t.path).expanduser()
    if local.is_dir():
        for weights in sorted(local.rglob("*.safetensors")):
            stat = weights.stat()
            parts.append(f"{weights.relative_to(local)}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)
