"""``synthetic`` dataset: random normalised images made directly on the device (no disk, no decode)."""
from __future__ import annotations

from typing import Iterator, Tuple

import torch

from .common import SALT_SYNTHETIC, mix_seed


# Validation samples are made in fixed chunks of this many consecutive global indices.
VAL_CHUNK = 64


class SyntheticLoader:
    """Yields random ``(images, labels)`` batches generated on ``device``.

    Training: each batch comes from a generator seeded by ``(seed, epoch, batch index, rank)``, so
    any batch can be reproduced directly after ``set_epoch(epoch, start_batch)``.

    Validation: sample ``i`` (image and label) is a function of ``(seed, i)`` only, so a checkpoint
    evaluates the same under any number of processes. The set is made in chunks of ``VAL_CHUNK``
    consecutive samples, each from a generator seeded by ``(seed, chunk)`` (one ``randn`` and one
    ``randint`` per chunk, no per-sample kernels); rank ``r`` owns a contiguous block of sample
    indices (sizes differ by at most one) and keeps its part of the chunks a batch touches.

    Args:
        num_samples: Samples in the whole (virtual) dataset, over all ranks.
        batch_size: Samples per batch on this rank.
        img_size: Height and width of the images.
        num_classes: Labels are drawn uniformly from ``0..num_classes-1``.
        seed: The run's ``SEED``.
        rank: This process's rank.
        world_size: Number of processes.
        train: Train (drop the last incomplete batch) or val (keep it; ranks hold contiguous blocks).
        device: Where the tensors are created.
    """

    def __init__(self, num_samples: int, batch_size: int, img_size: int, num_classes: int, seed: int,
                 rank: int, world_size: int, train: bool, device: torch.device) -> None:
        if num_samples < 1:
            raise ValueError(f"synthetic dataset size {num_samples} must be >= 1; "
                             "set DATA.SYNTHETIC_TRAIN_SIZE / DATA.SYNTHETIC_VAL_SIZE")
        self.batch_size = batch_size
        self.img_size = img_size
        self.num_classes = num_classes
        self.seed = seed
        self.rank = rank
        self.train = train
        self.device = torch.device(device)
        if train:
            self.num_local = num_samples // world_size
            self.num_batches = self.num_local // batch_size
            if self.num_batches == 0:
                raise ValueError(
                    f"{num_samples} synthetic training samples give no full batch of {batch_size} on each "
                    f"of {world_size} process(es); raise DATA.SYNTHETIC_TRAIN_SIZE or lower DATA.BATCH_SIZE")
        else:
            self.num_local = len(range(rank, num_samples, world_size))
            # First global index of this rank's block: the first num_samples % world_size ranks hold one more.
            self.val_start = rank * (num_samples // world_size) + min(rank, num_samples % world_size)
            self.num_batches = -(-self.num_local // batch_size)
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next iteration yield batches ``start_batch..`` of ``epoch``.

        Args:
            epoch: Epoch index.
            start_batch: First batch to yield, for resuming mid-epoch.
        """
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch={start_batch} is outside 0..{self.num_batches} batches of this epoch; "
                             "pass the batch index saved with the checkpoint")
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator(device=self.device)
        for batch in range(self.start_batch, self.num_batches):
            size = min(self.batch_size, self.num_local - batch * self.batch_size)
            if not self.train:
                yield self._val_batch(self.val_start + batch * self.batch_size, size, generator)
                continue
            # Stream 1 is training (stream 0 seeds the validation chunks).
            generator.manual_seed(mix_seed(self.seed, SALT_SYNTHETIC, 1, self.epoch, batch, self.rank))
            images = torch.randn(size, 3, self.img_size, self.img_size, generator=generator,
                                 device=self.device)  # (B, 3, H, W), already "normalised"
            labels = torch.randint(0, self.num_classes, (size,), generator=generator,
                                   device=self.device)  # (B,) int64
            yield images, labels

    def _val_batch(self, start: int, size: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """Validation samples ``start .. start + size - 1`` (global indices), cut from their chunks."""
        images, labels = [], []
        first_chunk, last_chunk = start // VAL_CHUNK, (start + size - 1) // VAL_CHUNK
        for chunk in range(first_chunk, last_chunk + 1):
            generator.manual_seed(mix_seed(self.seed, SALT_SYNTHETIC, 0, chunk))
            chunk_images = torch.randn(VAL_CHUNK, 3, self.img_size, self.img_size, generator=generator,
                                       device=self.device)  # (C, 3, H, W)
            chunk_labels = torch.randint(0, self.num_classes, (VAL_CHUNK,), generator=generator,
                                         device=self.device)  # (C,)
            lo = max(start, chunk * VAL_CHUNK) - chunk * VAL_CHUNK
            hi = min(start + size, (chunk + 1) * VAL_CHUNK) - chunk * VAL_CHUNK
            images.append(chunk_images[lo:hi])
            labels.append(chunk_labels[lo:hi])
        if len(images) == 1:
            return images[0], labels[0]
        return torch.cat(images), torch.cat(labels)  # (B, 3, H, W), (B,)
