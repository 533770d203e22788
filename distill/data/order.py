"""The deterministic order in which training reads data, and the per-step random generator:
both pure functions of the step, so a resumed run reads and draws what the uninterrupted
run did."""

from __future__ import annotations

import torch
from torch import Tensor

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


def collate(dataset, index: Tensor) -> dict[str, "Tensor | list[str]"]:
    """Stack the items ``dataset[i]`` for ``i`` in ``index`` into one batch dict.

    Tensors and numbers become one ``[B, ...]`` tensor; strings (prompts) stay a list of B str,
    the form text encoders take."""
    items = [dataset[int(i)] for i in index]
    return {
        key: [item[key] for item in items] if isinstance(items[0][key], str)
        else torch.stack([torch.as_tensor(item[key]) for item in items])
        for key in items[0]
    }
