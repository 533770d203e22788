"""Class labels without images: data-free distillation of a class-conditional teacher (DiT)."""

from __future__ import annotations

import torch
from torch import Tensor

CLASS_REPEATS = 100  # items per class in one epoch of ClassLabelDataset


class ClassLabelDataset(torch.utils.data.Dataset):
    """Class labels without images, for data-free distillation of a class-conditional teacher
    (DMD2 without its GAN term needs only what to condition on); items are
    ``{"class_label": int64 scalar}``.

    Item ``i`` is class ``i % num_classes``, and there are ``num_classes * repeats`` items, so
    every epoch of a seeded permutation (``EpochSampler``) is class-balanced and holds many
    global batches even for 10 classes; the order within it is the sampler's."""

    def __init__(self, num_classes: int, *, repeats: int = CLASS_REPEATS):
        if not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"num_classes must be a positive int, not {num_classes!r}")
        if not isinstance(repeats, int) or repeats <= 0:
            raise ValueError(f"repeats must be a positive int, not {repeats!r}")
        self.num_classes, self.repeats = num_classes, repeats

    @property
    def identity(self) -> str:
        return f"classes|{self.num_classes}|{self.repeats}"

    def __len__(self) -> int:
        return self.num_classes * self.repeats

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} class labels")
        return {"class_label": torch.tensor(index % self.num_classes, dtype=torch.int64)}
