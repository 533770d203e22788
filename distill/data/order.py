"""The deterministic order in which training reads data, and the per-step random generator:
both pure functions of the step, so a resumed run reads and draws what the uninterrupted
run did."""

from __future__ import annotations

import torch
from torch import Tensor

def _step_seed(seed: int, step: int, rank: int, stream: int) -> int:
    return ((seed * 1_000_003 + step) * 65_537 + rank * 257 + stream) % (2**63 - 1)


class StepGenerator(torch.Generator):
    """A step's CPU generator (``step_generator``) that also knows the step's first rank:
    ``shared()`` is a fresh generator in the state rank 0's generator starts the step in, so
    every rank can replay rank 0's draws and agree on what must not differ between ranks (how
    many network calls a step makes: under FSDP every forward is a collective)."""

    _shared_seed: int

    def shared(self) -> torch.Generator:
        return torch.Generator().manual_seed(self._shared_seed)


def step_generator(seed: int, step: int, rank: int = 0, stream: int = 0) -> StepGenerator:
    """A CPU generator whose state depends only on ``(seed, step, rank, stream)``.

    Every random draw of a training step comes from one of these, so a resumed run draws
    exactly what the uninterrupted run drew at the same step, whatever happened before.
    Its ``shared()`` generator is the same on every rank (see ``StepGenerator``).
    """
    generator = StepGenerator()
    generator.manual_seed(_step_seed(seed, step, rank, stream))
    generator._shared_seed = _step_seed(seed, step, 0, stream)
    return generator


def agreed(generator: torch.Generator, draw, local):
    """``draw(g)`` on rank 0's generator of this step (``StepGenerator.shared``), the same on
    every rank, for a choice all ranks must make alike; ``draw`` replays rank 0's draws from
    the step's start. ``local`` (the caller's own draw) where ``generator`` knows no ranks."""
    shared = getattr(generator, "shared", None)
    return local if shared is None else draw(shared())


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
    return collate_items([dataset[int(i)] for i in index])


def collate_items(items: list[dict]) -> dict[str, "Tensor | list[str]"]:
    """``collate`` of items already read."""
    return {
        key: [item[key] for item in items] if isinstance(items[0][key], str)
        else torch.stack([torch.as_tensor(item[key]) for item in items])
        for key in items[0]
    }


class _NumberedItems(torch.utils.data.Dataset):
    """``dataset`` read by (micro-batch, index) pairs: items come back numbered."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, dict]:
        number, index = key
        return number, self.dataset[index]


class _StepBatches(torch.utils.data.Sampler):
    """Micro-batches ``order.batch(i)`` for i = start, start + 1, ... (endless), numbered."""

    def __init__(self, order: EpochSampler, start: int):
        self.order, self.start = order, start

    def __iter__(self):
        number = self.start
        while True:
            yield [(number, int(i)) for i in self.order.batch(number)]
            number += 1


def _collate_numbered(pairs: list[tuple[int, dict]]) -> tuple[int, dict]:
    return pairs[0][0], collate_items([item for _, item in pairs])


class StepBatches:
    """The micro-batches of a run from micro-batch ``start`` on, in ``order``: ``get(i)`` is
    ``collate(dataset, order.batch(i))``, read ahead by ``num_workers`` DataLoader worker
    processes (``prefetch`` batches each) when there are any, in the calling process
    otherwise. Still a pure function of ``i``: workers only read ahead, so a resumed run
    (a new ``start``) reads what the uninterrupted run read. Micro-batches are asked for in
    order, one after the other."""

    def __init__(self, dataset, order: EpochSampler, *, start: int, num_workers: int, prefetch: int = 2,
                 pin_memory: bool = False):
        self.dataset, self.order, self.next = dataset, order, start
        self._loader = None
        if num_workers > 0:
            loader = torch.utils.data.DataLoader(
                _NumberedItems(dataset), batch_sampler=_StepBatches(order, start), collate_fn=_collate_numbered,
                num_workers=num_workers, prefetch_factor=prefetch, persistent_workers=True, pin_memory=pin_memory)
            self._loader = iter(loader)

    def get(self, number: int) -> dict:
        if number != self.next:
            raise RuntimeError(f"micro-batch {number} asked for, but {self.next} is next")
        self.next += 1
        if self._loader is None:
            return collate(self.dataset, self.order.batch(number))
        read, batch = next(self._loader)
        if read != number:
            raise RuntimeError(f"the data loader read micro-batch {read} where {number} was due")
        return batch
