"""The built-in benchmark: scikit-learn's handwritten digits, 1,797 real 8x8 grey images in
10 classes shipped inside scikit-learn, so it needs no network. A fixed 20% is held out (the
noise floor of the quality benchmark); teacher, classifier and distillation see only the
training split."""

from __future__ import annotations

import torch
from torch import Tensor

DIGITS_NUM_CLASSES = 10
DIGITS_HOLDOUT = 360  # images held out of 1,797, chosen once by a fixed permutation
DIGITS_TRAIN_SIZE = 1797 - DIGITS_HOLDOUT  # the training split: 1,437 images
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


class DigitsDataset(torch.utils.data.Dataset):
    """Map-style view of one digits split; items are ``{"image": [1, 8, 8], "class_label": int}``."""

    num_classes = DIGITS_NUM_CLASSES

    def __init__(self, split: str = "train"):
        self.images, self.labels = load_digits(split)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"image": self.images[index], "class_label": self.labels[index]}
