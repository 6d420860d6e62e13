"""What every dataset format gives the loaders: a split (``ImageSplit``) whose samples are read by position.

A format (today: an image folder, ``data/folder.py``; tar shards, ``data/shards.py``) opens its
``train`` and ``val`` splits as ``ImageSplit`` subclasses, checked before training starts (one
``ValueError`` naming the path and the fix for a missing, empty or inconsistent split). Both
loaders and every sampler work on that interface alone:

* ``samples``: ``(name, label)`` pairs; a sample is read by its position in this list, the
  samplers order positions (``len(split)`` of them), and ``name`` identifies the sample in
  reports of unreadable images (a file's path, ``shard-000012.tar:KEY``).
* ``classes``: the class names, identical in ``train`` and ``val``; a label is a position in this
  list and ``len(classes)`` must equal ``MODEL.NUM_CLASSES``.
* ``multi_label`` / ``multi_hot(position)``: a multi-label split (``data/multilabel.py``) gives each
  sample a ``(C,)`` float32 multi-hot target, which the loaders deliver as ``(B, C)`` instead of
  ``(B,)`` labels; its ``samples`` carry the label -1.
* ``read_encoded(position)``: the sample's encoded bytes (the ``dali`` loader decodes them).
* ``load_rgb(position)``: the sample decoded to an RGB PIL image (the ``pytorch`` loader; by
  default the bytes of ``read_encoded`` decoded by PIL).

A sample that cannot be read raises: any exception marks it unreadable, and the loaders replace it
(training) or drop it (validation) and report ``name (reason)``; ``UnreadableImage`` carries a
reason where there is no exception to pass on. Reads come from several threads (the ``dali``
loader reads ahead) and from forked or spawned DataLoader workers, so a split must be picklable
and must not share open files or locks across processes (``ShardSplit`` reopens its files in
each process).
"""
from __future__ import annotations

import abc
import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, List, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

SPLITS = ("train", "val")


class UnreadableImage(Exception):
    """A file that is no readable image; the message says why."""


def load_rgb(source: Union[str, BinaryIO]) -> Image.Image:
    """Open and fully decode an image as RGB (raises on unreadable or truncated files).

    Args:
        source: Image file, or an open binary file (e.g. ``io.BytesIO`` of its bytes).
    """
    if isinstance(source, str):
        with open(source, "rb") as f:
            return load_rgb(f)
    image = Image.open(source)
    image.load()
    return image.convert("RGB")


@dataclass
class ImageSplit(abc.ABC):
    """One split (``train`` or ``val``) of a dataset, in any format: its classes and samples, read by position.

    Args:
        root: The split's directory (``DATA_PATH/train`` or ``DATA_PATH/val``).
        classes: Class names; a label is a position in this list.
        samples: ``(name, label)`` pairs, in the format's fixed order.
    """

    root: Path
    classes: List[str]
    samples: List[Tuple[str, int]]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def multi_label(self) -> bool:
        """Whether samples have multi-hot targets (:meth:`multi_hot`) instead of one label each."""
        return False

    def multi_hot(self, position: int) -> np.ndarray:
        """The ``(C,)`` float32 multi-hot target of the sample at ``position`` (multi-label splits only)."""
        raise TypeError(f"{type(self).__name__} has one label per sample, no multi-hot targets")

    @abc.abstractmethod
    def read_encoded(self, position: int) -> np.ndarray:
        """The encoded bytes (1-D uint8) of the sample at ``position`` of ``samples``."""

    def load_rgb(self, position: int) -> Image.Image:
        """The sample at ``position`` of ``samples``, decoded to RGB by PIL."""
        try:
            return load_rgb(io.BytesIO(self.read_encoded(position).tobytes()))
        except UnidentifiedImageError:  # its message names the in-memory file object, a new one each time
            raise UnreadableImage("not an image PIL can identify") from None
