"""``pytorch`` loader: torchvision ImageFolder + timm transforms, per-sample seeded augmentation.

Workers hand uint8 batches over (a quarter of the shared memory of float32 ones); the batch is
normalised and randomly erased on the device, as timm's ``PrefetchLoader`` does.
"""
from __future__ import annotations

import atexit
import gc
import signal
import weakref
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import RandAugment, posterize
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader, default_collate
from torchvision.datasets import ImageFolder
from yacs.config import CfgNode

from .common import SALT_AUGMENT, SALT_BATCH_AUGMENT, EpochBatchSampler, erase_per_sample, mix_seed, seeded_rng
from .split import ImageSplit
from .loader import BatchLoader, read_or_replace

# (image (3, H, W) uint8 or None when dropped, label or (C,) float32 multi-hot target, erasing seed,
# unreadable-file reports)
Sample = Tuple[Optional[torch.Tensor], Union[int, torch.Tensor], int, Tuple[str, ...]]


def init_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: ignore SIGINT / SIGTERM / SIGUSR1; never collect the parent's objects.

    A scheduler (``scancel``, preemption) signals every process of the job, and a terminal's
    Ctrl-C signals its whole process group; the training process turns each into a stop (and a
    checkpoint) at the next step boundary, which needs its workers alive until then. They still
    exit with their parent.

    A forked worker inherits the parent's objects, DALI pipelines included, without the threads
    behind them; the cyclic garbage collector finalising such a pipeline in the worker waits for
    those threads forever. ``TorchLoader`` forks its workers with the parent's objects frozen
    (``gc.freeze()``: out of the collector's reach, garbage included) and unfreezes them in the
    parent afterwards, so a worker's collector never sees what it inherited; ``gc.freeze()`` here
    keeps it so in the worker. (A full ``gc.collect()`` before forking would do the same at 0.2 s
    per loader start once torch and timm are imported.)

    Args:
        worker_id: Unused (the DataLoader's worker index).
    """
    gc.freeze()
    for stop_signal in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(stop_signal, signal.SIG_IGN)


class SeededImageFolder(ImageFolder):
    """torchvision ImageFolder over a pre-scanned split, indexed by ``(index, augmentation round)``.

    The transform runs under generators seeded by ``(seed, round, index)``, so a sample's
    augmentation does not depend on worker count, order or resume point; the round is the epoch,
    or with repeated augmentation the epoch and the copy (``data.common.augmentation_round``), so
    the copies of an image in one epoch are augmented differently. A file that fails to
    decode is replaced by the next readable image (training) or dropped (validation); the bad
    paths travel with the sample so the main process can count and log them.

    Each sample also carries the seed of its random erasing, ``(seed, round, index)`` hashed, which
    the loader applies on the device after normalising.

    Args:
        split: The scanned split (its class list and samples are used as-is, no rescan).
        transform: timm transform producing a (3, H, W) uint8 tensor (``use_prefetcher=True``).
        seed: The run's ``SEED``.
        train: Replace (True) or drop (False) unreadable images.
    """

    def __init__(self, split: ImageSplit, transform, seed: int, train: bool) -> None:
        self._split = split
        super().__init__(str(split.root), transform=transform)
        self.seed = seed
        self.train = train

    def find_classes(self, directory: str) -> Tuple[List[str], dict]:
        return self._split.classes, {name: i for i, name in enumerate(self._split.classes)}

    def make_dataset(self, directory: str, class_to_idx: dict, extensions=None, is_valid_file=None,
                     allow_empty: bool = False) -> List[Tuple[str, int]]:
        return list(self._split.samples)

    def __getitem__(self, key: Tuple[int, int]) -> Sample:  # type: ignore[override]
        index, aug_round = key
        found, bad = read_or_replace(self.samples, index, self.train, self._split.load_rgb)
        if found is None:
            return None, -1, 0, tuple(bad)
        image, label, position = found
        if self._split.multi_label:  # the target of the file read, which may have replaced a bad one
            label = torch.from_numpy(self._split.multi_hot(position))  # (C,) float32
        with seeded_rng(mix_seed(self.seed, SALT_AUGMENT, aug_round, index)):
            tensor = self.transform(image)  # (3, H, W) uint8
        return tensor, label, mix_seed(self.seed, SALT_BATCH_AUGMENT, aug_round, index), tuple(bad)


def collate(batch: Sequence[Sample]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[str]]:
    """Stack images, labels and erasing seeds, dropping validation samples that failed to decode.

    ``default_collate`` stacks straight into shared memory inside a worker (no extra copy).

    Returns:
        ``(images (B, 3, H, W) uint8, labels (B,) int64 or multi-hot targets (B, C) float32, erasing seeds
        (B,) int64, reports)``.
    """
    kept = [(image, label, seed) for image, label, seed, _ in batch if image is not None]
    bad = [path for *_, paths in batch for path in paths]
    if not kept:
        empty = torch.empty(0, dtype=torch.int64)
        return torch.empty(0, dtype=torch.uint8), empty, empty, bad
    images, labels, seeds = default_collate(kept)
    return images, labels, seeds, bad


class TorchLoader(BatchLoader):
    """A DataLoader over ``EpochBatchSampler`` that delivers batches on ``device`` and reports bad files.

    Workers hand over uint8 batches, two per worker ahead; on ``device`` each batch is converted
    to float32, normalised with timm's ImageNet mean and std (on the 0..255 scale, as timm's
    ``PrefetchLoader`` does) and, in training, randomly erased.

    Workers (training and validation alike) start at the first pass and serve every later one, as
    timm's ``create_loader`` keeps them (``persistent_workers``): a pass that starts after
    ``set_epoch(epoch, start_batch)`` draws its batches from the sampler as it is then (torch's
    persistent iterator asks the batch sampler for a fresh iterator at every pass), and each
    sample's augmentation is seeded by ``(seed, round, index)``, not by the worker, so positions,
    coverage and augmentation are those of a fresh loader; a pass abandoned midway leaves nothing
    behind (torch discards its outstanding batches when the next pass starts). Between passes the
    workers hold no batches.

    Args:
        dataset: The seeded dataset.
        sampler: Batch sampler giving this rank's ``(index, augmentation round)`` batches.
        num_workers: DataLoader worker processes (0 = load in the main process).
        pin_memory: Pin host batches (only used when ``device`` is CUDA).
        device: Where batches are delivered.
        erase: timm's ``RandomErasing`` for ``device``, or None for no erasing.
    """

    def __init__(self, dataset: SeededImageFolder, sampler: EpochBatchSampler, num_workers: int,
                 pin_memory: bool, device: torch.device, erase: Optional[RandomErasing] = None) -> None:
        super().__init__(sampler, device)
        self.erase = erase
        self.mean = torch.tensor([255 * x for x in IMAGENET_DEFAULT_MEAN], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor([255 * x for x in IMAGENET_DEFAULT_STD], device=self.device).view(1, 3, 1, 1)
        self.loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                                 pin_memory=pin_memory and self.device.type == "cuda",
                                 persistent_workers=num_workers > 0,
                                 prefetch_factor=2 if num_workers > 0 else None,
                                 worker_init_fn=init_worker,
                                 # Own generator: the loader's per-pass base seed must not consume
                                 # (and so shift) the training process's global torch RNG.
                                 generator=torch.Generator())
        # Workers ignore SIGINT and SIGTERM, so multiprocessing's own exit hook (terminate, then join)
        # would wait for them forever if the process exits while they still run: shut them down first
        # (atexit hooks run last-registered first; the reference is weak, so this keeps nothing alive).
        atexit.register(TorchLoader._close_at_exit, weakref.ref(self))

    @staticmethod
    def _close_at_exit(ref: "weakref.ReferenceType[TorchLoader]") -> None:
        loader = ref()
        if loader is not None:
            loader.close()

    def close(self) -> None:
        """Stop the worker processes (a later iteration starts new ones)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self.loader.num_workers > 0 and getattr(self.loader, "_iterator", None) is None:
            # The workers fork inside iter(): what they inherit stays out of their collector's reach. A
            # process that had frozen objects itself keeps them (and these) frozen: unfreeze is all or nothing.
            frozen_before = gc.get_freeze_count()
            gc.freeze()
            try:
                batches = iter(self.loader)
            finally:
                if frozen_before == 0:
                    gc.unfreeze()
        else:
            batches = iter(self.loader)
        for images, labels, seeds, bad in batches:
            self.report_bad(bad)
            if len(labels) == 0:
                continue
            images = images.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)  # (B, 3, H, W)
            if self.erase is not None:
                erase_per_sample(self.erase, images, seeds.tolist())
            yield images, labels.to(self.device, non_blocking=True)


def posterize_allow_zero_bits(image: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, keeping its pre-Pillow-13 meaning for 0 bits (a black image).

    timm 1.0.31's ``PosterizeIncreasing`` maps level 10 (reached by ``mstd`` noise, clipped at 10)
    to 0 bits, which Pillow >= 13 rejects with "bits must be between or equal to 1 and 8".
    """
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return posterize(image, bits_to_keep, **kwargs)


def _patch_posterize(transform) -> None:
    """Point the posterize ops of any RandAugment inside ``transform`` at ``posterize_allow_zero_bits``."""
    for step in getattr(transform, "transforms", []):
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.aug_fn is posterize:
                    op.aug_fn = posterize_allow_zero_bits


def build_transforms(config: CfgNode, train: bool):
    """timm's reference ImageNet transforms for ``config``, up to a uint8 (3, H, W) tensor (train: RRC over
    ``AUG.SCALE`` / ``AUG.RATIO``, flip, RandAugment or colour jitter; eval: resize to ``IMG_SIZE / CROP_PCT``,
    center crop). Normalising and random erasing follow on the device (``TorchLoader``).

    Args:
        config: Reads ``DATA.IMG_SIZE``, ``DATA.INTERPOLATION``, ``AUG.*`` and ``TEST.CROP_PCT``.
        train: Training or evaluation transform.
    """
    if train:
        aug = config.AUG
        transform = create_transform(config.DATA.IMG_SIZE, is_training=True, scale=tuple(aug.SCALE),
                                     ratio=tuple(aug.RATIO),
                                     color_jitter=aug.COLOR_JITTER if aug.COLOR_JITTER > 0 else None,
                                     auto_augment=aug.AUTO_AUGMENT or None,
                                     interpolation=config.DATA.INTERPOLATION, use_prefetcher=True)
        _patch_posterize(transform)
        return transform
    return create_transform(config.DATA.IMG_SIZE, is_training=False, interpolation=config.DATA.INTERPOLATION,
                            crop_pct=config.TEST.CROP_PCT, use_prefetcher=True)


def make_torch_loader(config: CfgNode, split: ImageSplit, sampler: EpochBatchSampler, device: torch.device,
                      num_workers: int) -> TorchLoader:
    """A ``TorchLoader`` over ``split`` with timm's transforms for ``sampler.train`` (and random erasing,
    ``AUG.REPROB`` / ``REMODE`` / ``RECOUNT``, in training).

    Args:
        config: The run's config.
        split: The scanned split.
        sampler: This rank's batch sampler.
        device: Where batches are delivered.
        num_workers: DataLoader worker processes (``data.build.num_workers``).
    """
    aug = config.AUG
    erase = (RandomErasing(aug.REPROB, mode=aug.REMODE, max_count=aug.RECOUNT, device=str(torch.device(device)))
             if sampler.train and aug.REPROB > 0 else None)
    dataset = SeededImageFolder(split, build_transforms(config, sampler.train), config.SEED, sampler.train)
    return TorchLoader(dataset, sampler, num_workers, config.DATA.PIN_MEMORY, device, erase)
