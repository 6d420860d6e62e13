"""``synthetic`` dataset: random normalised images made directly on the device (no disk, no decode)."""
from __future__ import annotations

from typing import Iterator, Tuple

import torch

from .common import SALT_SYNTHETIC, EpochBatchSampler, mix_seed
from .loader import BatchLoader


# Validation samples are made in fixed chunks of this many consecutive global indices.
VAL_CHUNK = 64


class SyntheticLoader(BatchLoader):
    """Yields random ``(images, labels)`` batches generated on ``device``.

    Training: each batch comes from a generator seeded by ``(seed, epoch, batch index, rank)``, so
    any batch can be reproduced directly after ``set_epoch(epoch, start_batch)``.

    Validation: sample ``i`` (image and label) is a function of ``(seed, i)`` only, so a checkpoint
    evaluates the same under any number of processes. The set is made in chunks of ``VAL_CHUNK``
    consecutive samples, each from a generator seeded by ``(seed, chunk)`` (one ``randn`` and one
    ``randint`` per chunk, no per-sample kernels); rank ``r`` owns a contiguous block of sample
    indices (sizes differ by at most one) and keeps its part of the chunks a batch touches.

    Args:
        sampler: Sizes, seed, rank and position; its sample indices are not used.
        img_size: Height and width of the images.
        num_classes: Labels are drawn uniformly from ``0..num_classes-1``.
        device: Where the tensors are created.
    """

    def __init__(self, sampler: EpochBatchSampler, img_size: int, num_classes: int, device: torch.device) -> None:
        super().__init__(sampler, device)
        self.img_size = img_size
        self.num_classes = num_classes
        num_samples, rank, world_size = sampler.num_samples, sampler.rank, sampler.world_size
        # First global index of this rank's validation block: the first num_samples % world_size ranks hold one more.
        self.val_start = rank * (num_samples // world_size) + min(rank, num_samples % world_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        sampler, generator = self.sampler, torch.Generator(device=self.device)
        for batch in range(sampler.start_batch, len(sampler)):
            size = min(sampler.batch_size, sampler.samples_per_rank - batch * sampler.batch_size)
            if not sampler.train:
                yield self._val_batch(self.val_start + batch * sampler.batch_size, size, generator)
                continue
            # Stream 1 is training (stream 0 seeds the validation chunks).
            generator.manual_seed(mix_seed(sampler.seed, SALT_SYNTHETIC, 1, sampler.epoch, batch, sampler.rank))
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
            generator.manual_seed(mix_seed(self.sampler.seed, SALT_SYNTHETIC, 0, chunk))
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
