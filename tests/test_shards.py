"""Sharded datasets: each epoch's order across ranks, reading, resume and the errors of a damaged set."""
from __future__ import annotations

from collections import Counter
from typing import List

import numpy as np
import pytest

from data.shards import ShardBatchSampler, buffer_shuffle

SHARD_SIZES = (10, 10, 10, 10, 10, 10, 7)  # 67 samples, a short last shard


def _sampler(rank: int, world_size: int, train: bool = True, buffer: int = 8, batch: int = 4) -> ShardBatchSampler:
    return ShardBatchSampler(sum(SHARD_SIZES), batch, 0, rank, world_size, train=train, shard_sizes=SHARD_SIZES,
                             buffer=buffer)


def _epoch(sampler: ShardBatchSampler, epoch: int, start_batch: int = 0) -> List[int]:
    sampler.set_epoch(epoch, start_batch)
    return [index for batch in sampler for index, _ in batch]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_sample_at_most_once_and_every_rank_the_same_batches(world_size: int) -> None:
    samplers = [_sampler(rank, world_size) for rank in range(world_size)]
    assert len({len(sampler) for sampler in samplers}) == 1
    for epoch in range(3):
        per_rank = [sampler.indices() for sampler in samplers]
        everything = [index for indices in per_rank for index in indices]
        assert len(everything) == len(set(everything)) == world_size * (67 // world_size)
        batched = [_epoch(sampler, epoch) for sampler in samplers]
        assert all(len(indices) == len(samplers[0]) * 4 for indices in batched)
        assert len(set(sum(batched, []))) == len(sum(batched, []))


def test_the_order_changes_every_epoch_and_is_a_function_of_seed_epoch_and_rank() -> None:
    a, b = _sampler(0, 2), _sampler(0, 2)
    assert _epoch(a, 0) == _epoch(b, 0) and _epoch(a, 1) == _epoch(b, 1)
    assert _epoch(a, 0) != _epoch(a, 1)
    assert sorted(_epoch(a, 0)) != sorted(_epoch(a, 1))  # another set of shards for this rank


def test_a_rank_reads_a_run_of_shards() -> None:
    """A rank's part of the stream is consecutive: 22 samples touch at most 2 whole shards and 2 parts."""
    shard_of = np.repeat(np.arange(len(SHARD_SIZES)), SHARD_SIZES)
    for epoch in range(4):
        for rank in range(3):
            indices = np.array(_set_epoch(_sampler(rank, 3), epoch).indices())
            assert len(set(shard_of[indices].tolist())) <= 4


def _set_epoch(sampler: ShardBatchSampler, epoch: int) -> ShardBatchSampler:
    sampler.set_epoch(epoch)
    return sampler


def test_the_shuffle_buffer_never_reads_further_ahead_than_its_size() -> None:
    stream = np.arange(1000) * 7
    for buffer in (1, 5, 64):
        out = buffer_shuffle(stream, buffer, np.random.default_rng(buffer))
        assert sorted(out.tolist()) == stream.tolist()
        position = {value: i for i, value in enumerate(stream.tolist())}
        assert all(position[value] < step + buffer for step, value in enumerate(out.tolist()))
    assert buffer_shuffle(stream, 1, np.random.default_rng(0)).tolist() == stream.tolist()
    mixed = buffer_shuffle(stream, 64, np.random.default_rng(0))
    assert np.mean(np.abs(np.argsort(mixed) - np.arange(1000))) > 10  # it does mix


def test_validation_covers_every_sample_once_in_consecutive_blocks() -> None:
    for world_size in (1, 2, 3, 5):
        parts = [_epoch(_sampler(rank, world_size, train=False), 0) for rank in range(world_size)]
        assert sum(parts, []) == list(range(67))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_resume_continues_with_the_very_next_batch() -> None:
    sampler = _sampler(1, 2)
    full = _epoch(sampler, 2)
    assert _epoch(sampler, 2, start_batch=3) == full[3 * 4:]


def test_shard_order_spreads_samples_of_every_shard_over_ranks_across_epochs() -> None:
    counts = Counter()
    for epoch in range(20):
        for index in _set_epoch(_sampler(0, 2), epoch).indices():
            counts[index] += 1
    assert len(counts) == 67  # rank 0 sees every sample in some epoch
