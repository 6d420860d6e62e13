"""The skeleton every loader shares: length and epoch positioning, reading with replacement, bad files.

A backend (``SyntheticLoader``, ``TorchLoader``, ``DaliLoader``) subclasses ``BatchLoader`` and
implements ``__iter__``; file-reading backends read each sample through ``read_or_replace`` and
hand the reports of unreadable files to ``BatchLoader.report_bad``.
"""
from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, TypeVar

import torch

from .common import EpochBatchSampler
from .split import UnreadableImage

if TYPE_CHECKING:
    from .split import ImageSplit

logger = logging.getLogger(__name__)

# How many following images a training sample may try before giving up on a run of bad files.
MAX_REPLACEMENTS = 32

Content = TypeVar("Content")


def failure_reason(error: Exception) -> str:
    """Why a file could not be read: an ``UnreadableImage``'s message, else the error's type and message.

    Args:
        error: What reading or decoding the file raised.
    """
    return str(error) if isinstance(error, UnreadableImage) else f"{type(error).__name__}: {error}"


def read_or_replace(samples: Sequence[Tuple[str, int]], index: int, train: bool,
                    read: Callable[[int], Content]) -> Tuple[Optional[Tuple[Content, int, int]], List[str]]:
    """Read sample ``index``; in training, an unreadable file is replaced by the next readable one.

    Training keeps batch shapes static by walking on through the dataset (wrapping around);
    validation drops the sample instead, so every image is evaluated at most once.

    Args:
        samples: ``(name, label)`` pairs of the split (a file's path, or a shard member's name).
        index: The sample to read.
        train: Replace (True) or drop (False) an unreadable file.
        read: Reads the sample at a position of ``samples`` (e.g. ``ImageSplit.load_rgb``); any
            exception marks the file unreadable.

    Returns:
        ``((content, label, position read) or None when dropped, reports)``: one ``"name (reason)"``
        report per unreadable file met.

    Raises:
        RuntimeError: ``MAX_REPLACEMENTS`` files in a row are unreadable (training).
    """
    bad: List[str] = []
    attempts = MAX_REPLACEMENTS if train else 1
    for attempt in range(attempts):
        position = (index + attempt) % len(samples)
        name, label = samples[position]
        try:
            return (read(position), label, position), bad
        except Exception as error:  # any decoder failure: PIL raises several types
            bad.append(f"{name} ({failure_reason(error)})")
    if train:
        raise RuntimeError(f"{attempts} consecutive images from {samples[index][0]} on are unreadable: {bad[:3]}; "
                           "check the dataset for corruption")
    return None, bad


class BatchLoader(abc.ABC):
    """What the engine iterates: ``len``, ``set_epoch`` and ``(images, labels)`` batches on ``device``.

    Length and position come from the sampler; a backend implements ``__iter__`` (batches
    ``sampler.start_batch..`` of ``sampler.epoch``) and passes the unreadable files it meets to
    ``report_bad``.

    Args:
        sampler: This rank's batches of the split; ``sampler.train`` selects training behaviour.
        device: Where batches are delivered.
    """

    def __init__(self, sampler: EpochBatchSampler, device: torch.device) -> None:
        self.sampler = sampler
        self.device = torch.device(device)
        self.bad_files: Set[str] = set()

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next iteration yield batches ``start_batch..`` of ``epoch``.

        Args:
            epoch: Epoch index (selects the sample order and the augmentation seeds).
            start_batch: First batch to yield, for resuming mid-epoch.
        """
        self.sampler.set_epoch(epoch, start_batch)

    @property
    def num_bad(self) -> int:
        """Number of distinct unreadable files met so far."""
        return len(self.bad_files)

    def report_bad(self, reports: Iterable[str]) -> None:
        """Count and log each unreadable file once (the same file is met again every epoch).

        Args:
            reports: ``"path (reason)"`` strings from ``read_or_replace``.
        """
        for report in reports:
            if report not in self.bad_files:
                self.bad_files.add(report)
                logger.warning("unreadable image %s (%d so far); %s", report, self.num_bad,
                               "replaced by the next image" if self.sampler.train else "skipped")

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """``(images (B, 3, H, W) float32, labels (B,) int64 or multi-hot targets (B, C) float32)`` on
        ``device``, from ``sampler.start_batch`` on."""


@dataclass
class Loaders:
    """The train and validation loaders of one run.

    Args:
        train: Shuffled, augmented, drops the last incomplete batch.
        val: This rank's part of the validation set, every image once across ranks.
        num_classes: Number of classes of the dataset.
        val_split: The validation split read from files (its ``samples`` in the sampler's index
            order, its ``classes`` the class names in label order); None for generated data.
    """

    train: BatchLoader
    val: BatchLoader
    num_classes: int
    val_split: Optional["ImageSplit"] = None

    @property
    def multi_label(self) -> bool:
        """Whether batches carry ``(B, C)`` multi-hot targets (``DATA.FORMAT multilabel``)."""
        return self.val_split is not None and self.val_split.multi_label

    @property
    def class_names(self) -> Optional[List[str]]:
        """The class names in label order (a folder's class folders, e.g. ImageNet's wnids), or None."""
        return list(self.val_split.classes) if self.val_split is not None else None
