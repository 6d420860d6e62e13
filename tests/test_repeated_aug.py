"""Repeated augmentation (``DATA.REPEATED_AUG``): the samplers' copies, their seeds, both loaders, resume, shards."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Set, Tuple

import numpy as np
import pytest
import torch

from config import _C
from data import build_loader
from data.common import EpochBatchSampler, epoch_permutation, erase_per_sample, mix_seed
from data.shards import ShardBatchSampler, buffer_shuffle

CPU = torch.device("cpu")
LOADERS = ["pytorch", "dali"]
NUM_SAMPLES, BATCH, SEED = 103, 5, 7
SHARD_SIZES = (10, 10, 10, 10, 10, 10, 7)  # 67 samples, a short last shard
Keys = List[Tuple[int, int]]


def _folder_keys(rank: int, world_size: int, repeats: int, epoch: int) -> Keys:
    sampler = EpochBatchSampler(NUM_SAMPLES, BATCH, SEED, rank, world_size, train=True, repeats=repeats)
    sampler.set_epoch(epoch)
    return sampler.keys()


def _shard_sampler(rank: int, world_size: int, repeats: int, buffer: int = 8) -> ShardBatchSampler:
    return ShardBatchSampler(sum(SHARD_SIZES), BATCH, SEED, rank, world_size, train=True, repeats=repeats,
                             shard_sizes=SHARD_SIZES, buffer=buffer)


def _shard_keys(rank: int, world_size: int, repeats: int, epoch: int, buffer: int = 8) -> Keys:
    sampler = _shard_sampler(rank, world_size, repeats, buffer)
    sampler.set_epoch(epoch)
    return sampler.keys()


def _check_copies(per_rank: List[Keys], per_rank_count: int, repeats: int, epoch: int, distinct: int,
                  cut: int) -> None:
    """Each rank has ``per_rank_count`` samples; the epoch holds ``distinct`` indices, each ``repeats``
    times but at most ``cut`` of them (cut at the end of a stream) fewer, and the copies of an index have
    the distinct augmentation rounds ``epoch * repeats + 0..``."""
    assert [len(keys) for keys in per_rank] == [per_rank_count] * len(per_rank)
    rounds: Dict[int, List[int]] = defaultdict(list)
    for keys in per_rank:
        for index, aug_round in keys:
            rounds[index].append(aug_round)
    assert len(rounds) == distinct
    assert sum(len(copies) < repeats for copies in rounds.values()) <= cut
    for copies in rounds.values():
        assert sorted(copies) == [epoch * repeats + copy for copy in range(len(copies))]


@pytest.mark.parametrize("repeats", [1, 2, 3])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_folder_sampler_repeats_each_index_on_consecutive_ranks(world_size: int, repeats: int) -> None:
    for epoch in (0, 5):
        per_rank = [_folder_keys(rank, world_size, repeats, epoch) for rank in range(world_size)]
        per_rank_count = NUM_SAMPLES // world_size
        _check_copies(per_rank, per_rank_count, repeats, epoch, distinct=-(-world_size * per_rank_count // repeats),
                      cut=1)
        ranks_of: Dict[int, List[int]] = defaultdict(list)
        for rank, keys in enumerate(per_rank):
            for index, _ in keys:
                ranks_of[index].append(rank)
        if world_size >= repeats:  # the copies of an index are on different ranks
            assert all(len(set(ranks)) == len(ranks) for ranks in ranks_of.values())
        else:  # fewer ranks than copies: a rank holds its copies of an index next to each other
            for keys in per_rank:
                for place in range(1, len(keys)):
                    if keys[place][0] in [index for index, _ in keys[:place]]:
                        assert keys[place - 1][0] == keys[place][0]
        # The batches per rank do not change with the repeats.
        sampler = EpochBatchSampler(NUM_SAMPLES, BATCH, SEED, 0, world_size, train=True, repeats=repeats)
        assert len(sampler) == len(EpochBatchSampler(NUM_SAMPLES, BATCH, SEED, 0, world_size, train=True))


@pytest.mark.parametrize("repeats", [1, 2, 3])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_samplers_are_pure_functions_of_seed_epoch_rank_and_world_size(world_size: int, repeats: int) -> None:
    for keys_of in (_folder_keys, _shard_keys):
        for rank in range(world_size):
            first = keys_of(rank, world_size, repeats, 3)
            assert keys_of(rank, world_size, repeats, 3) == first
            assert keys_of(rank, world_size, repeats, 4) != first
    # Iteration from any batch on is the keys cut into batches.
    sampler = EpochBatchSampler(NUM_SAMPLES, BATCH, SEED, 1, world_size, train=True, repeats=repeats)
    sampler.set_epoch(3, start_batch=2)
    keys = _folder_keys(1, world_size, repeats, 3)
    assert [key for batch in sampler for key in batch] == keys[2 * BATCH:len(sampler) * BATCH]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_without_repeats_the_order_and_rounds_are_the_plain_samplers(world_size: int) -> None:
    """REPEATED_AUG 1: the folder order is the epoch's permutation dealt round-robin, the shard order its
    rank's consecutive part through the shuffle buffer, and every round is the epoch (today's seeds)."""
    usable = NUM_SAMPLES // world_size * world_size
    shard_starts = np.concatenate([[0], np.cumsum(SHARD_SIZES)[:-1]])
    for epoch in (0, 2):
        generator = torch.Generator()
        generator.manual_seed(mix_seed(SEED, 5, epoch))  # SALT_SHARD_ORDER
        stream = np.concatenate([np.arange(shard_starts[s], shard_starts[s] + SHARD_SIZES[s])
                                 for s in torch.randperm(len(SHARD_SIZES), generator=generator).tolist()])
        per_rank = sum(SHARD_SIZES) // world_size
        for rank in range(world_size):
            order = epoch_permutation(NUM_SAMPLES, SEED, epoch)[rank:usable:world_size].tolist()
            assert _folder_keys(rank, world_size, 1, epoch) == [(index, epoch) for index in order]
            mixer = np.random.default_rng(mix_seed(SEED, 5, epoch, rank))
            shard_order = buffer_shuffle(stream[rank * per_rank:(rank + 1) * per_rank], 8, mixer).tolist()
            assert _shard_keys(rank, world_size, 1, epoch) == [(index, epoch) for index in shard_order]


@pytest.mark.parametrize("repeats", [1, 2, 3])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_shard_sampler_repeats_within_each_ranks_own_stream(world_size: int, repeats: int) -> None:
    """Shards: the copies of a sample stay on one rank (no rank reads another's shards), spread by the buffer."""
    num_samples = sum(SHARD_SIZES)
    for epoch in (0, 5):
        per_rank = [_shard_keys(rank, world_size, repeats, epoch) for rank in range(world_size)]
        per_rank_count = num_samples // world_size
        _check_copies(per_rank, per_rank_count, repeats, epoch, distinct=world_size * -(-per_rank_count // repeats),
                      cut=world_size)
        owners: List[Set[int]] = [{index for index, _ in keys} for keys in per_rank]
        assert sum(len(indices) for indices in owners) == len(set().union(*owners))  # each index on one rank
        # Each rank's distinct samples are a consecutive run of the epoch's shard stream (the k = 1 parts
        # of the first ranks, cut short), so it reads the runs of shards it read without repeats.
        plain = [{index for index, _ in _shard_keys(rank, world_size, 1, epoch)} for rank in range(world_size)]
        assert set().union(*owners) <= set().union(*plain)
    # Without mixing (buffer 1) the copies are neighbours; a buffer spreads them apart.
    keys = _shard_keys(0, 1, 2, 0, buffer=1)
    assert all(keys[place][0] == keys[place + 1][0] for place in range(0, len(keys) - 1, 2))
    keys = _shard_keys(0, 1, 2, 0, buffer=16)
    places: Dict[int, List[int]] = defaultdict(list)
    for place, (index, _) in enumerate(keys):
        places[index].append(place)
    assert np.mean([b - a for a, b in (p for p in places.values() if len(p) == 2)]) > 3


def test_repeats_below_one_are_one_clear_error() -> None:
    for sampler in (EpochBatchSampler, ShardBatchSampler):
        with pytest.raises(ValueError, match=r"^DATA\.REPEATED_AUG=0 must be >= 1 .*; set it to 1 or more$"):
            sampler(NUM_SAMPLES, BATCH, SEED, 0, 1, train=True, repeats=0)


# ----------------------------------------------------------------------------- through the loaders
# (conftest's toy_folder and toy_shards)


def _config(root: Path, loader: str, repeats: int, data_format: str = "folder", **data):
    """32x32 images, batch 8, one worker, the default augmentation (RandAugment, random erasing)."""
    cfg = _C.clone()
    cfg.DATA.DATASET, cfg.DATA.DATA_PATH, cfg.DATA.FORMAT, cfg.DATA.LOADER = "imagenet", str(root), data_format, loader
    cfg.DATA.IMG_SIZE, cfg.DATA.BATCH_SIZE, cfg.DATA.NUM_WORKERS, cfg.MODEL.NUM_CLASSES = 32, 8, 1, 10
    cfg.DATA.REPEATED_AUG = repeats
    for key, value in data.items():
        cfg.DATA[key] = value
    return cfg


def _differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.equal(a, b)


@pytest.mark.parametrize("loader", LOADERS)
def test_copies_on_two_ranks_are_augmented_differently(toy_folder: Path, loader: str) -> None:
    """REPEATED_AUG 2 on 2 ranks: place p of each rank holds the two copies of one image (the same
    labels) under different augmentations; on one rank the copies are neighbours in a batch."""
    cfg = _config(toy_folder, loader, repeats=2)
    batches = []
    for rank in range(2):
        train = build_loader(cfg, CPU, rank=rank, world_size=2).train
        assert len(train) == 120 // 2 // 8  # as without repeats
        train.set_epoch(1)
        batches.append([batch for batch, _ in zip(train, range(2))])
    for (images_0, labels_0), (images_1, labels_1) in zip(*batches):
        assert torch.equal(labels_0, labels_1)
        assert all(_differ(a, b) for a, b in zip(images_0, images_1))
    train = build_loader(cfg, CPU, rank=0, world_size=1).train
    train.set_epoch(1)
    images, labels = next(iter(train))
    assert torch.equal(labels[0::2], labels[1::2])
    assert all(_differ(a, b) for a, b in zip(images[0::2], images[1::2]))


def test_pytorch_copy_zero_keeps_the_seeds_without_repeats(toy_folder: Path) -> None:
    """Copy 0 of an image (round = epoch * k) is augmented as the image is without repeats in that round's
    epoch: the seeds are (SEED, round, index), unchanged for REPEATED_AUG 1."""
    with_repeats = build_loader(_config(toy_folder, "pytorch", repeats=2), CPU, rank=0, world_size=2).train
    with_repeats.set_epoch(1)  # rank 0's copies are copy 0, round 2
    keys = with_repeats.sampler.keys()[:8]
    assert all(aug_round == 2 for _, aug_round in keys)
    images, labels = next(iter(with_repeats))
    plain = build_loader(_config(toy_folder, "pytorch", repeats=1), CPU).train
    dataset = plain.loader.dataset
    for image, label, key in zip(images, labels, keys):
        uint8, plain_label, erase_seed, _ = dataset[key]
        expected = (uint8.float().unsqueeze(0) - plain.mean) / plain.std  # (1, 3, H, W)
        erase_per_sample(plain.erase, expected, [erase_seed])
        assert torch.equal(image, expected[0]) and label == plain_label


@pytest.mark.parametrize("data_format", ["folder", "shards"])
def test_pytorch_mid_epoch_resume_with_repeats_is_bitwise(toy_folder: Path, toy_shards: Path,
                                                          data_format: str) -> None:
    root = toy_folder if data_format == "folder" else toy_shards
    full_loader = build_loader(_config(root, "pytorch", 2, data_format, NUM_WORKERS=0), CPU, rank=1,
                               world_size=2).train
    full_loader.set_epoch(3)
    full = list(full_loader)
    resumed = build_loader(_config(root, "pytorch", 2, data_format, NUM_WORKERS=2), CPU, rank=1, world_size=2).train
    resumed.set_epoch(3, start_batch=4)
    rest = list(resumed)
    assert len(full) == 7 and len(rest) == 3
    for (images_a, labels_a), (images_b, labels_b) in zip(full[4:], rest):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)


@pytest.mark.parametrize("data_format", ["folder", "shards"])
def test_dali_mid_epoch_resume_with_repeats_continues_with_the_same_samples(toy_folder: Path, toy_shards: Path,
                                                                            data_format: str) -> None:
    """DALI draws its augmentation by place from the pipeline's stream, so a resume continues with the
    very same samples (labels bitwise) but not the same crops (the module's documented limit)."""
    root = toy_folder if data_format == "folder" else toy_shards
    full_loader = build_loader(_config(root, "dali", 2, data_format), CPU, rank=1, world_size=2).train
    full_loader.set_epoch(3)
    full = [labels for _, labels in full_loader]
    resumed = build_loader(_config(root, "dali", 2, data_format), CPU, rank=1, world_size=2).train
    resumed.set_epoch(3, start_batch=4)
    rest = [labels for _, labels in resumed]
    assert len(full) == 7 and len(rest) == 3
    assert all(torch.equal(a, b) for a, b in zip(full[4:], rest))


@pytest.mark.parametrize("loader", LOADERS)
def test_shard_copies_stay_on_their_rank_and_are_augmented_differently(toy_shards: Path, loader: str) -> None:
    cfg = _config(toy_shards, loader, 2, "shards", SHUFFLE_BUFFER=16)
    seen = []
    for rank in range(2):
        train = build_loader(cfg, CPU, rank=rank, world_size=2).train
        assert len(train) == 120 // 2 // 8
        train.set_epoch(1)
        images = torch.cat([images for images, _ in train])  # (56, 3, 32, 32)
        indices = train.sampler.indices()[:len(images)]
        places: Dict[int, List[int]] = defaultdict(list)
        for place, index in enumerate(indices):
            places[index].append(place)
        pairs = [p for p in places.values() if len(p) == 2]
        assert len(pairs) >= 20
        assert all(_differ(images[a], images[b]) for a, b in pairs)
        seen.append(set(indices))
    assert not seen[0] & seen[1]
