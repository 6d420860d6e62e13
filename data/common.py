"""Pieces shared by every loader: rank discovery, seeding, sample order and sharding."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, List, Optional, Protocol, Tuple

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# ImageNet statistics on the 0..1 scale (timm's IMAGENET_DEFAULT_MEAN / STD).
IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)

# Salts that keep the random streams of different purposes apart.
SALT_ORDER = 1
SALT_AUGMENT = 2
SALT_SYNTHETIC = 3
SALT_BATCH_AUGMENT = 4


def dist_info(rank: Optional[int] = None, world_size: Optional[int] = None) -> Tuple[int, int]:
    """Return ``(rank, world_size)``: explicit overrides, else torch.distributed, else ``(0, 1)``.

    Args:
        rank: Override of this process's rank (tests simulate several ranks this way).
        world_size: Override of the number of processes.
    """
    if rank is None or world_size is None:
        initialised = dist.is_available() and dist.is_initialized()
        rank = (dist.get_rank() if initialised else 0) if rank is None else rank
        world_size = (dist.get_world_size() if initialised else 1) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world size {world_size} is invalid: need 0 <= rank < world_size; "
                         "check the launcher's RANK and WORLD_SIZE")
    return rank, world_size


def mix_seed(*values: int) -> int:
    """Hash several non-negative integers into one 63-bit seed (NumPy's SeedSequence mixing).

    Args:
        values: e.g. ``(SEED, salt, epoch, index)``; every tuple gives an independent stream.
    """
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """Return the sample order of one epoch, a pure function of ``(seed, epoch)``.

    Args:
        num_samples: Size of the dataset.
        seed: The run's ``SEED``.
        epoch: Epoch index.
    """
    generator = torch.Generator()
    generator.manual_seed(mix_seed(seed, SALT_ORDER, epoch))
    return torch.randperm(num_samples, generator=generator)


def train_shard(num_samples: int, seed: int, epoch: int, rank: int, world_size: int) -> torch.Tensor:
    """Indices this rank trains on in ``epoch``.

    The global permutation is cut to a multiple of ``world_size`` (the few samples cut off are
    random, and change every epoch) and dealt round-robin, so all ranks get the same count and
    no sample appears twice.

    Args:
        num_samples: Size of the dataset.
        seed: The run's ``SEED``.
        epoch: Epoch index.
        rank: This process's rank.
        world_size: Number of processes.
    """
    order = epoch_permutation(num_samples, seed, epoch)
    usable = (num_samples // world_size) * world_size
    return order[rank:usable:world_size]


def val_shard(num_samples: int, rank: int, world_size: int) -> List[int]:
    """Indices this rank evaluates: every ``world_size``-th sample, so the shards partition the set.

    Args:
        num_samples: Size of the validation set.
        rank: This process's rank.
        world_size: Number of processes.
    """
    return list(range(rank, num_samples, world_size))


class EpochBatchSampler:
    """Batches of ``(dataset index, epoch)`` pairs for one rank, positionable by ``set_epoch``.

    Train mode shuffles per ``(seed, epoch)`` and drops the last incomplete batch; val mode
    walks this rank's fixed shard in order and keeps the last, smaller batch.

    Args:
        num_samples: Size of the dataset.
        batch_size: Samples per batch.
        seed: The run's ``SEED``.
        rank: This process's rank.
        world_size: Number of processes.
        train: Shuffle and drop the last batch (True) or evaluate every sample once (False).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int, world_size: int,
                 train: bool) -> None:
        if batch_size < 1:
            raise ValueError(f"DATA.BATCH_SIZE={batch_size} must be >= 1; set a positive batch size")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.train = train
        self.epoch = 0
        self.start_batch = 0
        if train and len(self) == 0:
            raise ValueError(
                f"{num_samples} training samples give no full batch of {batch_size} on each of "
                f"{world_size} process(es); lower DATA.BATCH_SIZE or use more data")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next iteration yield batches ``start_batch..`` of ``epoch``.

        Args:
            epoch: Epoch index (selects the sample order and the augmentation seeds).
            start_batch: First batch to yield, for resuming mid-epoch.
        """
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch={start_batch} is outside 0..{len(self)} batches of this epoch; "
                             "pass the batch index saved with the checkpoint")
        self.epoch = epoch
        self.start_batch = start_batch

    def indices(self) -> List[int]:
        """This rank's sample indices for the current epoch, in order (incl. a dropped tail)."""
        if self.train:
            return train_shard(self.num_samples, self.seed, self.epoch, self.rank, self.world_size).tolist()
        return val_shard(self.num_samples, self.rank, self.world_size)

    def __len__(self) -> int:
        per_rank = len(range(self.rank, self.num_samples, self.world_size))
        if self.train:
            return (self.num_samples // self.world_size) // self.batch_size
        return -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        indices = self.indices()
        for batch in range(self.start_batch, len(self)):
            chunk = indices[batch * self.batch_size:(batch + 1) * self.batch_size]
            yield [(index, self.epoch) for index in chunk]


class BatchLoader(Protocol):
    """What the engine iterates: ``len``, ``set_epoch`` and ``(images, labels)`` batches on device."""

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass
class Loaders:
    """The train and validation loaders of one run.

    Args:
        train: Shuffled, augmented, drops the last incomplete batch.
        val: This rank's shard of the validation set, every image once across ranks.
        num_classes: Number of classes of the dataset.
    """

    train: BatchLoader
    val: BatchLoader
    num_classes: int
