"""Sharded datasets: each epoch's order across ranks, reading, resume and the errors of a damaged set."""
from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from config import _C
from data import build_loader
from data.shards import ShardBatchSampler, ShardIndex, buffer_shuffle

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


# -----------------------------------------------------------------------------
# Reading real shards (converted from a small toy folder) with both loaders
# -----------------------------------------------------------------------------
LOADERS = ["pytorch", "dali"]
CPU = torch.device("cpu")


@pytest.fixture
def folder(toy_folder: Path) -> Path:
    return toy_folder


@pytest.fixture
def shards(toy_shards: Path) -> Path:
    return toy_shards


def _config(root: Path, loader: str, data_format: str = "shards", **data):
    cfg = _C.clone()
    cfg.DATA.DATASET, cfg.DATA.DATA_PATH, cfg.DATA.FORMAT, cfg.DATA.LOADER = "imagenet", str(root), data_format, loader
    cfg.DATA.IMG_SIZE, cfg.DATA.BATCH_SIZE, cfg.DATA.NUM_WORKERS, cfg.MODEL.NUM_CLASSES = 32, 8, 1, 10
    for key, value in data.items():
        cfg.DATA[key] = value
    return cfg


@pytest.mark.parametrize("loader", LOADERS)
def test_validation_from_shards_is_the_folders_batch_for_batch(folder: Path, shards: Path, loader: str) -> None:
    """The val shards hold the folder's files in its order: the same bytes give the same batches."""
    from_folder, from_shards = (list(build_loader(_config(root, loader, data_format), CPU).val)
                                for root, data_format in ((folder, "folder"), (shards, "shards")))
    assert len(from_folder) == len(from_shards) == 4
    for (images_a, labels_a), (images_b, labels_b) in zip(from_folder, from_shards):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)


@pytest.mark.parametrize("loader", LOADERS)
def test_a_training_epoch_delivers_every_rank_the_same_batches_of_distinct_samples(shards: Path,
                                                                                   loader: str) -> None:
    world_size, seen = 2, []
    for rank in range(world_size):
        train = build_loader(_config(shards, loader), CPU, rank=rank, world_size=world_size).train
        train.set_epoch(1)
        batches = list(train)
        assert len(batches) == len(train) == 120 // 2 // 8 and all(images.shape[0] == 8 for images, _ in batches)
        seen += [index for batch in train.sampler for index, _ in batch]
    assert len(seen) == len(set(seen)) == 2 * 7 * 8


def test_resume_mid_epoch_gives_the_very_next_batches(shards: Path) -> None:
    train = build_loader(_config(shards, "pytorch"), CPU).train
    train.set_epoch(3)
    full = list(train)
    train.set_epoch(3, start_batch=5)
    rest = list(train)
    assert len(rest) == len(full) - 5
    for (images_a, labels_a), (images_b, labels_b) in zip(full[5:], rest):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)


def _damage_one_member(root: Path) -> str:
    """Overwrite the image bytes of the first training sample of shard 1 in place; returns its name."""
    index = ShardIndex.load(root / "train")
    shard = index.shards[1]
    with open(root / "train" / shard.file, "r+b") as f:
        f.seek(shard.offsets[0])
        f.write(b"\xff\xd8\xff" + b"\x00" * (shard.sizes[0] - 3))
    return f"{shard.file}:{shard.keys[0]}"


@pytest.mark.parametrize("loader", LOADERS)
def test_a_corrupt_member_is_skipped_named_and_counted(shards: Path, tmp_path: Path, loader: str, caplog) -> None:
    root = tmp_path / "damaged"
    shutil.copytree(shards, root)
    name = _damage_one_member(root)
    caplog.set_level(logging.WARNING)
    train = build_loader(_config(root, loader), CPU).train
    for epoch in range(2):
        train.set_epoch(epoch)
        assert sum(images.shape[0] for images, _ in train) == len(train) * 8
    assert train.num_bad == 1
    assert [record.getMessage().split(" (")[0] for record in caplog.records if name in record.getMessage()] == \
        [f"unreadable image {name}"]


def test_a_missing_or_truncated_shard_is_one_error_naming_it(shards: Path, tmp_path: Path) -> None:
    root = tmp_path / "broken"
    shutil.copytree(shards, root)
    shard = root / "train" / "shard-000002.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=f"shard {shard} has {len(data) // 2} bytes but index.json says "
                                         f"{len(data)}: it is truncated"):
        build_loader(_config(root, "pytorch"), CPU)
    shard.unlink()
    with pytest.raises(ValueError, match=f"shard {shard} is missing"):
        build_loader(_config(root, "pytorch"), CPU)
    shard.write_bytes(data)
    (root / "val" / "index.json").unlink()
    with pytest.raises(ValueError, match="index.json does not exist: DATA.FORMAT shards reads"):
        build_loader(_config(root, "pytorch"), CPU)


def test_shards_read_as_a_folder_say_which_format_they_are(shards: Path) -> None:
    with pytest.raises(ValueError, match="holds tar shards \\(index.json\\), not class folders; add --opts "
                                         "DATA.FORMAT shards"):
        build_loader(_config(shards, "pytorch", data_format="folder", FILE_LIST_CACHE=False), CPU)


def test_shards_need_an_imagenet_data_path() -> None:
    from config import ConfigError, validate

    cfg = _C.clone()
    cfg.DATA.DATASET, cfg.DATA.FORMAT = "toy", "shards"
    with pytest.raises(ConfigError, match="DATA.FORMAT='shards' reads DATA_PATH"):
        validate(cfg)
