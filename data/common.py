"""Pieces shared by every loader: seeding, sample order and each rank's part of an epoch."""
from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, List, Sequence, Tuple

import numpy as np
import torch

if TYPE_CHECKING:
    from timm.data.random_erasing import RandomErasing

# Salts that keep the random streams of different purposes apart.
SALT_ORDER = 1
SALT_AUGMENT = 2
SALT_SYNTHETIC = 3
SALT_BATCH_AUGMENT = 4
SALT_SHARD_ORDER = 5


def mix_seed(*values: int) -> int:
    """Hash several non-negative integers into one 63-bit seed (NumPy's SeedSequence mixing).

    Args:
        values: e.g. ``(SEED, salt, epoch, index)``; every tuple gives an independent stream.
    """
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global CPU generators (used by timm/torchvision transforms),
    restoring their previous states on exit so the caller's streams are untouched.

    Args:
        seed: 63-bit seed, e.g. from ``mix_seed``.
    """
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    # The CPU generator only (the transforms run on CPU): torch.manual_seed would also queue lazy
    # CUDA/MPS/XPU seeding with a captured stack trace, doubling the per-sample cost.
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def _default_generator(device: torch.device) -> torch.Generator:
    """The default generator of ``device`` (CPU or CUDA), which timm's ``RandomErasing`` draws from."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


def erase_per_sample(erase: "RandomErasing", images: torch.Tensor, seeds: Sequence[int]) -> None:
    """timm's ``RandomErasing`` on each normalised image in place, under that image's own seed.

    The batch form of ``RandomErasing`` (timm's ``PrefetchLoader``) runs the same per-image
    ``_erase`` from the global streams: Python's generator for the rectangles and the default
    generator of the batch's device (CPU or CUDA) for the noise. Reseeding both per image makes the
    result a function of the image's seed alone, on any device, whatever the global streams, the
    batch, worker count or resume point; both are restored afterwards (host-side state: no sync).

    Args:
        erase: timm's ``RandomErasing``, built for ``images.device``.
        images: (B, 3, H, W) normalised batch.
        seeds: One seed per image (63-bit).
    """
    generator = _default_generator(images.device)
    python_state, device_state = random.getstate(), generator.get_state()
    try:
        for image, seed in zip(images, seeds):  # image: (3, H, W) view into the batch
            random.seed(seed)
            generator.manual_seed(seed)
            erase(image)
    finally:
        random.setstate(python_state)
        generator.set_state(device_state)


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


def train_rank_part(num_samples: int, seed: int, epoch: int, rank: int, world_size: int,
                    repeats: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices this rank trains on in ``epoch``, with the copy number of each (repeated augmentation).

    The global permutation has each index repeated ``repeats`` times in a row (DeiT's
    ``RASampler``), is cut to ``world_size * (num_samples // world_size)`` places and dealt
    round-robin. So every rank gets ``num_samples // world_size`` samples whatever ``repeats`` is,
    an epoch holds about ``num_samples / repeats`` distinct images ``repeats`` times each, and the
    copies of an index sit on ``repeats`` consecutive ranks (different ranks when
    ``world_size >= repeats``; with fewer ranks some copies share a rank, next to each other). With
    ``repeats`` 1 every sample appears at most once, and the few cut off are random and change every
    epoch.

    Args:
        num_samples: Size of the dataset.
        seed: The run's ``SEED``.
        epoch: Epoch index.
        rank: This process's rank.
        world_size: Number of processes.
        repeats: Copies of each sampled index (``DATA.REPEATED_AUG``; 1 = off).

    Returns:
        ``(indices, copies)``: two (num_samples // world_size,) int64 tensors; ``copies[i]`` in
        ``0..repeats-1`` numbers the copy ``indices[i]`` is.
    """
    order = epoch_permutation(num_samples, seed, epoch)
    usable = (num_samples // world_size) * world_size
    # Place p of the repeated stream holds copy p % repeats of order[p // repeats]; the first
    # ``usable`` places always exist because num_samples * repeats >= usable.
    places = torch.arange(rank, usable, world_size)
    return order[places // repeats], places % repeats


def augmentation_round(epoch: int, copy: int, repeats: int) -> int:
    """The augmentation round of copy ``copy`` of a sample in ``epoch``: ``epoch * repeats + copy``.

    A sample's augmentation seeds are drawn from ``(SEED, round, index)``, so the copies of one index
    in one epoch get different augmentations, every ``(epoch, copy)`` has its own round, and without
    repeats (``repeats`` 1) the round is the epoch itself.

    Args:
        epoch: Epoch index.
        copy: Copy number, ``0..repeats-1``.
        repeats: Copies of each sampled index (``DATA.REPEATED_AUG``).
    """
    return epoch * repeats + copy


def val_rank_part(num_samples: int, rank: int, world_size: int) -> List[int]:
    """Indices this rank evaluates: every ``world_size``-th sample, so the ranks' parts partition the set.

    Args:
        num_samples: Size of the validation set.
        rank: This process's rank.
        world_size: Number of processes.
    """
    return list(range(rank, num_samples, world_size))


@dataclass(eq=False)
class EpochBatchSampler:
    """Batches of ``(dataset index, augmentation round)`` pairs for one rank, positionable by ``set_epoch``.

    Train mode shuffles per ``(seed, epoch)`` and drops the last incomplete batch; val mode
    walks this rank's fixed part in order and keeps the last, smaller batch. A sample's
    augmentation round (``augmentation_round``) is the epoch unless repeated augmentation gives
    one index several copies in an epoch (``train_rank_part``); the loaders seed a sample's
    augmentation from ``(seed, round, index)``. Every batch is a pure function of the seed, the
    epoch, the rank and the world size, so ``set_epoch(epoch, start_batch)`` resumes exactly.

    Args:
        num_samples: Size of the dataset.
        batch_size: Samples per batch.
        seed: The run's ``SEED``.
        rank: This process's rank.
        world_size: Number of processes.
        train: Shuffle and drop the last batch (True) or evaluate every sample once (False).
        repeats: Training copies of each sampled index per epoch (``DATA.REPEATED_AUG``; 1 = off);
            the samples per rank do not change with it.
    """

    num_samples: int
    batch_size: int
    seed: int
    rank: int
    world_size: int
    train: bool
    repeats: int = 1
    epoch: int = field(default=0, init=False)
    start_batch: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"DATA.BATCH_SIZE={self.batch_size} must be >= 1; set a positive batch size")
        if self.repeats < 1:
            raise ValueError(f"DATA.REPEATED_AUG={self.repeats} must be >= 1 (1: off; k: each sampled image k "
                             "times per epoch); set it to 1 or more")
        if self.train and len(self) == 0:
            raise ValueError(
                f"{self.num_samples} training samples give no full batch of {self.batch_size} on each of "
                f"{self.world_size} process(es); lower DATA.BATCH_SIZE or use more data")

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

    def keys(self) -> List[Tuple[int, int]]:
        """This rank's ``(index, augmentation round)`` pairs for the current epoch, in order (incl. a dropped tail)."""
        if self.train:
            indices, copies = train_rank_part(self.num_samples, self.seed, self.epoch, self.rank, self.world_size,
                                              self.repeats)
            return [(index, augmentation_round(self.epoch, copy, self.repeats))
                    for index, copy in zip(indices.tolist(), copies.tolist())]
        return [(index, self.epoch) for index in val_rank_part(self.num_samples, self.rank, self.world_size)]

    def indices(self) -> List[int]:
        """This rank's sample indices for the current epoch, in order (incl. a dropped tail)."""
        return [index for index, _ in self.keys()]

    @property
    def samples_per_rank(self) -> int:
        """Samples this rank gets per epoch: an equal share in training, its part in validation."""
        if self.train:
            return self.num_samples // self.world_size
        return len(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        if self.train:
            return self.samples_per_rank // self.batch_size
        return -(-self.samples_per_rank // self.batch_size)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        keys = self.keys()
        for batch in range(self.start_batch, len(self)):
            yield keys[batch * self.batch_size:(batch + 1) * self.batch_size]
