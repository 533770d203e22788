"""The real images generated samples are scored against: the digits' training split, or a
fixed subset of a captioned dataset's images."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from torch import Tensor

from distill.data.digits import load_digits
from distill.data.text import ImageCaptionDataset

def reference_set(dataset: str) -> tuple[str, Tensor, Tensor | None]:
    """The real images that generated samples are scored against: ``(key, images [N, C, H, W]
    in [0, 1], labels [N] or None)``. ``key`` names the set in the reference-feature cache.
    For digits it is the training split, the distribution the teacher learnt."""
    if dataset != "digits":
        raise ValueError(f"no reference set for dataset {dataset!r}")
    images, labels = load_digits("train")
    return f"digits-train-{len(labels)}", (images + 1) / 2, labels




def image_reference_set(dataset: ImageCaptionDataset, num: int | None = None) -> tuple[str, Tensor, None]:
    """Real images of a captioned dataset to score students against, like ``reference_set``:
    ``(key, images [N, 3, R, R] in [0, 1], None)``.

    ``num`` caps N with a fixed seeded subset (a prefix would inherit whatever order the files
    have); None takes every image. ``key`` names the data, resolution and subset and is safe
    as part of a file name (the reference-feature cache uses it). Holds N*3*R*R floats."""
    if not isinstance(dataset, ImageCaptionDataset):
        raise TypeError(f"reference images need an ImageCaptionDataset, not a {type(dataset).__name__}")
    total = len(dataset)
    if num is None or num >= total:
        index = list(range(total))
    else:
        # sorted: rows read in storage order
        index = sorted(torch.randperm(total, generator=torch.Generator().manual_seed(0))[:num].tolist())
    images = torch.stack([(dataset[i]["image"] + 1) / 2 for i in index])
    selection = "all" if len(index) == total else f"seed0-{len(index)}"
    digest = hashlib.sha256(f"{dataset.identity}|{selection}".encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(dataset.path.rstrip("/\\")).name)[:40] or "data"
    return f"{name}-{dataset.resolution}px-{len(index)}-{digest}", images, None
