"""Datasets and the deterministic order in which training reads them.

The built-in benchmark is scikit-learn's handwritten digits: 1,797 real 8x8 grey images in
10 classes, shipped inside scikit-learn, so it needs no network. A fixed 20% is held out
(the noise floor of the quality benchmark); teacher, classifier and distillation see only
the training split.
"""

from __future__ import annotations

import torch
from torch import Tensor

DIGITS_NUM_CLASSES = 10
DIGITS_HOLDOUT = 360  # images held out of 1,797, chosen once by a fixed permutation
_DIGITS_SPLIT_SEED = 0


def load_digits(split: str) -> tuple[Tensor, Tensor]:
    """Digits as ``(images [N, 1, 8, 8] in [-1, 1], labels [N] int64)``.

    ``split`` is ``"train"`` (1,437 images), ``"test"`` (the 360 held out) or ``"all"``.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"digits split must be 'train', 'test' or 'all', not {split!r}")
    raw = sk_load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 -> [-1, 1]
    labels = torch.tensor(raw.target, dtype=torch.int64)
    if split == "all":
        return images, labels
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_DIGITS_SPLIT_SEED))
    index = order[DIGITS_HOLDOUT:] if split == "train" else order[:DIGITS_HOLDOUT]
    return images[index], labels[index]


def reference_set(dataset: str) -> tuple[str, Tensor, Tensor | None]:
    """The real images that generated samples are scored against: ``(key, images [N, C, H, W]
    in [0, 1], labels [N] or None)``. ``key`` names the set in the reference-feature cache.
    For digits it is the training split, the distribution the teacher learnt."""
    if dataset != "digits":
        raise ValueError(f"no reference set for dataset {dataset!r}")
    images, labels = load_digits("train")
    return f"digits-train-{len(labels)}", (images + 1) / 2, labels


class DigitsDataset(torch.utils.data.Dataset):
    """Map-style view of one digits split; items are ``{"image": [1, 8, 8], "class_label": int}``."""

    num_classes = DIGITS_NUM_CLASSES

    def __init__(self, split: str = "train"):
        self.images, self.labels = load_digits(split)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"image": self.images[index], "class_label": self.labels[index]}


def step_generator(seed: int, step: int, rank: int = 0, stream: int = 0) -> torch.Generator:
    """A CPU generator whose state depends only on ``(seed, step, rank, stream)``.

    Every random draw of a training step comes from one of these, so a resumed run draws
    exactly what the uninterrupted run drew at the same step, whatever happened before.
    """
    mixed = (seed * 1_000_003 + step) * 65_537 + rank * 257 + stream
    return torch.Generator().manual_seed(mixed % (2**63 - 1))


class EpochSampler:
    """Index batches that walk a fresh seeded permutation each epoch, sharded across ranks.

    ``batch(step)`` is a pure function of the step, so data order survives a resume.
    Global batch ``k`` of epoch ``e`` is positions ``[k*B*W, (k+1)*B*W)`` of permutation
    ``e``; rank ``r`` takes its ``r``-th slice of ``B``. Epochs drop their last partial batch.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = num_items // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"dataset of {num_items} items is smaller than one global batch "
                f"({batch_size} x {world_size} processes)"
            )

    def batch(self, step: int) -> Tensor:
        epoch, k = divmod(step, self.batches_per_epoch)
        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        start = (k * self.world_size + self.rank) * self.batch_size
        return order[start : start + self.batch_size]


def collate(dataset, index: Tensor) -> dict[str, Tensor]:
    """Stack the items ``dataset[i]`` for ``i`` in ``index`` into one batch dict."""
    items = [dataset[int(i)] for i in index]
    return {key: torch.stack([torch.as_tensor(item[key]) for item in items]) for key in items[0]}
