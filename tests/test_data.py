"""Digits splits, the resumable epoch sampler, per-step generators and collation."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from distill.data import (
    DIGITS_HOLDOUT,
    DigitsDataset,
    EpochSampler,
    collate,
    load_digits,
    step_generator,
)


@pytest.fixture(scope="module")
def splits():
    return {split: load_digits(split) for split in ("train", "test", "all")}


def _rows(images, labels) -> list[bytes]:
    return [img.numpy().tobytes() + bytes([int(lab)]) for img, lab in zip(images, labels)]


def test_split_shapes_and_ranges(splits):
    expected = {"train": 1437, "test": 360, "all": 1797}
    for split, (images, labels) in splits.items():
        n = expected[split]
        assert images.shape == (n, 1, 8, 8), split
        assert labels.shape == (n,), split
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert float(images.min()) == -1.0 and float(images.max()) == 1.0
        assert set(labels.tolist()) == set(range(10)), split
    assert DIGITS_HOLDOUT == 360


def test_splits_disjoint_and_complete(splits):
    train, test, everything = (_rows(*splits[s]) for s in ("train", "test", "all"))
    assert len(set(everything)) == len(everything)  # digits has no duplicate images, so sets suffice
    assert not set(train) & set(test)
    assert Counter(train) + Counter(test) == Counter(everything)


def test_splits_deterministic(splits):
    for split in ("train", "test"):
        images, labels = load_digits(split)
        assert torch.equal(images, splits[split][0])
        assert torch.equal(labels, splits[split][1])


def test_split_is_shuffled_not_a_prefix(splits):
    # a held-out set taken from the end of the file would be the same writers; the split is a permutation
    all_images = splits["all"][0]
    assert not torch.equal(splits["test"][0], all_images[-DIGITS_HOLDOUT:])
    assert not torch.equal(splits["train"][0], all_images[: 1797 - DIGITS_HOLDOUT])


def test_bad_split():
    with pytest.raises(ValueError, match="'val'"):
        load_digits("val")


def test_dataset_items(splits):
    dataset = DigitsDataset("test")
    assert len(dataset) == 360
    assert dataset.num_classes == 10
    item = dataset[5]
    assert set(item) == {"image", "class_label"}
    assert item["image"].shape == (1, 8, 8)
    assert torch.equal(item["image"], splits["test"][0][5])
    assert int(item["class_label"]) == int(splits["test"][1][5])


# --- EpochSampler -------------------------------------------------------------------------


def test_sampler_ranks_partition_an_epoch():
    num_items, batch, world = 1437, 64, 2
    samplers = [EpochSampler(num_items, batch, seed=3, rank=r, world_size=world) for r in range(world)]
    per_epoch = samplers[0].batches_per_epoch
    assert per_epoch == num_items // (batch * world) == 11
    seen = []
    for step in range(per_epoch):
        for sampler in samplers:
            index = sampler.batch(step)
            assert index.shape == (batch,)
            assert index.dtype == torch.int64
            seen += index.tolist()
    assert len(seen) == per_epoch * batch * world
    assert len(set(seen)) == len(seen)
    assert 0 <= min(seen) and max(seen) < num_items


def test_sampler_ranks_differ_at_each_step():
    a = EpochSampler(100, 10, seed=0, rank=0, world_size=2)
    b = EpochSampler(100, 10, seed=0, rank=1, world_size=2)
    assert not set(a.batch(0).tolist()) & set(b.batch(0).tolist())


def test_sampler_batch_is_pure():
    sampler = EpochSampler(200, 16, seed=1)
    forward = [sampler.batch(s) for s in range(30)]
    backward = [sampler.batch(s) for s in reversed(range(30))][::-1]
    fresh = EpochSampler(200, 16, seed=1)
    for step in (29, 7, 0, 12):
        assert torch.equal(fresh.batch(step), forward[step])
    for f, b in zip(forward, backward):
        assert torch.equal(f, b)
    assert torch.equal(sampler.batch(5), sampler.batch(5))


def test_sampler_new_epoch_new_order():
    sampler = EpochSampler(200, 16, seed=1)
    per_epoch = sampler.batches_per_epoch
    assert per_epoch == 12
    epoch0 = torch.cat([sampler.batch(s) for s in range(per_epoch)])
    epoch1 = torch.cat([sampler.batch(per_epoch + s) for s in range(per_epoch)])
    assert not torch.equal(epoch0, epoch1)
    assert not torch.equal(sampler.batch(0), sampler.batch(per_epoch))
    # within an epoch every batch is fresh
    assert len(set(epoch0.tolist())) == len(epoch0) == 192


def test_sampler_seed_changes_order():
    assert not torch.equal(EpochSampler(200, 16, seed=0).batch(0), EpochSampler(200, 16, seed=1).batch(0))


def test_sampler_batch_too_large():
    with pytest.raises(ValueError) as excinfo:
        EpochSampler(10, 8, seed=0, world_size=2)
    message = str(excinfo.value)
    assert "10" in message and "8 x 2" in message
    EpochSampler(16, 8, seed=0, world_size=2)  # exactly one global batch is fine
    with pytest.raises(ValueError):
        EpochSampler(5, 6, seed=0)


# --- step_generator -------------------------------------------------------------------------


def _draw(generator, n=8):
    return torch.randn(n, generator=generator)


def test_step_generator_reproducible():
    assert torch.equal(_draw(step_generator(7, 100, 1)), _draw(step_generator(7, 100, 1)))
    assert torch.equal(_draw(step_generator(7, 100)), _draw(step_generator(7, 100, 0, 0)))


@pytest.mark.parametrize("other", [(7, 101, 1, 0), (7, 100, 0, 0), (7, 100, 1, 1), (8, 100, 1, 0)])
def test_step_generator_arguments_change_draws(other):
    assert not torch.equal(_draw(step_generator(7, 100, 1, 0)), _draw(step_generator(*other)))


def test_step_generator_distinct_over_steps_and_ranks():
    seeds = {step_generator(0, step, rank).initial_seed() for step in range(200) for rank in range(8)}
    assert len(seeds) == 200 * 8


def test_step_generator_is_cpu_and_independent_of_global_rng():
    torch.manual_seed(123)
    a = _draw(step_generator(0, 5))
    torch.manual_seed(456)
    torch.randn(10)
    b = _draw(step_generator(0, 5))
    assert torch.equal(a, b)
    assert step_generator(0, 5).device == torch.device("cpu")


# --- collate ------------------------------------------------------------------------------


def test_collate_shapes_and_values():
    dataset = DigitsDataset("train")
    index = torch.tensor([4, 0, 17, 4, 1436])
    batch = collate(dataset, index)
    assert set(batch) == {"image", "class_label"}
    assert batch["image"].shape == (5, 1, 8, 8)
    assert batch["class_label"].shape == (5,)
    assert batch["class_label"].dtype == torch.int64
    assert torch.equal(batch["image"], dataset.images[index])
    assert torch.equal(batch["class_label"], dataset.labels[index])


def test_collate_with_sampler_batch():
    dataset = DigitsDataset("train")
    sampler = EpochSampler(len(dataset), 4, seed=0)
    batch = collate(dataset, sampler.batch(3))
    assert batch["image"].shape == (4, 1, 8, 8) and batch["class_label"].shape == (4,)
    assert torch.equal(batch["image"], dataset.images[sampler.batch(3)])
