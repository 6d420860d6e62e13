"""Tar shards (``DATA.FORMAT shards``): the index format, reading samples, and each epoch's order.

A sharded split is a directory ``SHARDS/<split>/`` of WebDataset-style tar files written by
``python -m data.make_shards``: each sample is a member ``KEY.<ext>`` (the original image bytes)
followed by ``KEY.cls`` (its label as decimal text). Beside them, ``index.json`` lists every
shard's size and, per sample, its key, label, extension and the byte range of the image inside
the tar, and one DALI index file (``shard-NNNNNN.idx``) per shard serves DALI's own webdataset
reader.

Readers take a sample's bytes straight from its byte range (``os.pread`` on a shard kept open),
so a network file system pays one open per shard instead of one per image, and a sample is read
by its position, as in every ``ImageSplit`` (``data/split.py``): the loaders' sampling, resume and
bad-file handling are the folder's. :class:`ShardBatchSampler` orders an epoch the sharded way.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from .common import SALT_SHARD_ORDER, EpochBatchSampler, augmentation_round, mix_seed
from .split import SPLITS, ImageSplit, UnreadableImage

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_FORMAT = "crossformer-shards/1"
OPEN_SHARDS = 32  # shard files kept open per process (least recently used closed first)


def shard_name(number: int) -> str:
    """The file name of shard ``number``: ``shard-000012.tar``."""
    return f"shard-{number:06d}.tar"


@dataclass
class ShardInfo:
    """One shard as the index records it.

    Args:
        file: Its file name in the split directory.
        bytes: Its size (a shorter file is truncated).
        keys: The samples' keys, in the order of the tar.
        labels: Their class indices.
        exts: The image members' extensions (``jpg``, ``png``, ... as in the source).
        offsets: Where each image member's bytes start in the tar.
        sizes: How many bytes each has.
    """

    file: str
    bytes: int
    keys: List[str]
    labels: List[int]
    exts: List[str]
    offsets: List[int]
    sizes: List[int]

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class ShardIndex:
    """A split's ``index.json``.

    Args:
        split: ``train`` or ``val``.
        classes: Class names; a label is a position in this list.
        shards: In file order.
        skipped: ``(path relative to the source split, reason)`` of the files left out as unreadable.
    """

    split: str
    classes: List[str]
    shards: List[ShardInfo]
    skipped: List[Tuple[str, str]]

    @property
    def num_samples(self) -> int:
        return sum(len(shard) for shard in self.shards)

    def to_json(self) -> Dict[str, Any]:
        """The plain data of ``index.json``."""
        return {"format": INDEX_FORMAT, "split": self.split, "classes": self.classes,
                "num_samples": self.num_samples,
                "shards": [vars(shard) for shard in self.shards],
                "skipped": [list(entry) for entry in self.skipped]}

    @classmethod
    def load(cls, split_dir: Path) -> "ShardIndex":
        """Read ``split_dir/index.json``.

        Raises:
            ValueError: no index there, or not one this code reads (naming the path and the fix).
        """
        path = Path(split_dir) / INDEX_NAME
        if not path.is_file():
            raise ValueError(f"{path} does not exist: DATA.FORMAT shards reads DATA_PATH/{{train,val}}/{INDEX_NAME} "
                             "as written by python -m data.make_shards --src FOLDER --dst DATA_PATH")
        try:
            data = json.loads(path.read_text())
            if data.get("format") != INDEX_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {INDEX_FORMAT!r}")
            shards = [ShardInfo(**shard) for shard in data["shards"]]
            return cls(split=data["split"], classes=list(data["classes"]), shards=shards,
                       skipped=[tuple(entry) for entry in data["skipped"]])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read the shard index {path} ({e}); convert the folder again with "
                             "python -m data.make_shards") from e


class ShardSplit(ImageSplit):
    """A sharded split: sample ``i`` is the ``i``-th image of the index.

    Every shard is checked when the split is opened: a missing or truncated file is one error
    naming it. A sample's bytes come from one ``os.pread`` on its shard, kept open (the
    :data:`OPEN_SHARDS` most recently used per process), so reads from several threads need no
    seeking. A sample is named ``shard-000012.tar:KEY`` in reports of unreadable images.

    Args:
        split_dir: ``DATA_PATH/train`` or ``DATA_PATH/val``.
        index: Its ``index.json``.
    """

    def __init__(self, split_dir: Path, index: ShardIndex) -> None:
        samples = [(f"{shard.file}:{key}", label) for shard in index.shards
                   for key, label in zip(shard.keys, shard.labels)]
        super().__init__(root=Path(split_dir), classes=index.classes, samples=samples)
        self.files = [str(Path(split_dir) / shard.file) for shard in index.shards]
        self.shard_sizes = [len(shard) for shard in index.shards]
        self.expected_bytes = [shard.bytes for shard in index.shards]
        self.shard_of = np.repeat(np.arange(len(index.shards), dtype=np.int64), self.shard_sizes)
        self.offsets = np.array([offset for shard in index.shards for offset in shard.offsets], dtype=np.int64)
        self.sizes = np.array([size for shard in index.shards for size in shard.sizes], dtype=np.int64)
        self._reset_handles()
        self.check_files()

    def check_files(self) -> None:
        """Raise ``ValueError`` naming the first shard that is missing or shorter than its index says."""
        for path, expected in zip(self.files, self.expected_bytes):
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                raise ValueError(f"shard {path} is missing ({INDEX_NAME} lists it); copy it again or convert "
                                 "the folder again with python -m data.make_shards") from None
            if size != expected:
                raise ValueError(f"shard {path} has {size} bytes but {INDEX_NAME} says {expected}: it is truncated "
                                 "or was rewritten; copy it again or convert the folder again") from None

    def _reset_handles(self) -> None:
        self._handles: "OrderedDict[int, int]" = OrderedDict()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _descriptor(self, shard: int) -> int:
        """An open file descriptor of ``shard``, opened on first use in this process."""
        if self._pid != os.getpid():  # a forked loader worker: the parent's lock may be held, its files are not ours
            self._reset_handles()
        with self._lock:
            fd = self._handles.pop(shard, None)
            if fd is None:
                fd = self.open_shard(shard)
                if len(self._handles) >= OPEN_SHARDS:
                    os.close(self._handles.popitem(last=False)[1])
            self._handles[shard] = fd
            return fd

    def open_shard(self, shard: int) -> int:
        """Open shard number ``shard`` for reading; returns the file descriptor."""
        return os.open(self.files[shard], os.O_RDONLY)

    def read_encoded(self, position: int) -> np.ndarray:
        size, offset = int(self.sizes[position]), int(self.offsets[position])
        data = os.pread(self._descriptor(int(self.shard_of[position])), size, offset)
        if len(data) != size:
            raise UnreadableImage(f"{len(data)} of {size} bytes at offset {offset}: the shard is truncated")
        return np.frombuffer(data, dtype=np.uint8)

    def __getstate__(self) -> Dict[str, Any]:  # open files and the lock stay in their process
        state = dict(self.__dict__)
        for name in ("_handles", "_lock", "_pid"):
            state.pop(name)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_handles()


def open_shard_splits(root: Path, num_classes: int) -> Tuple[ShardSplit, ShardSplit]:
    """The train and val splits of a sharded dataset, checked like a folder's.

    Args:
        root: ``DATA_PATH`` (holding ``train/`` and ``val/``, each with ``index.json`` and its shards).
        num_classes: ``MODEL.NUM_CLASSES``, which must equal the number of classes.

    Raises:
        ValueError: a missing index or shard, a truncated shard, class lists that differ between the
            splits or from ``num_classes``.
    """
    train, val = (ShardSplit(root / split, ShardIndex.load(root / split)) for split in SPLITS)
    if train.classes != val.classes:
        raise ValueError(f"the class lists of {train.root} and {val.root} differ; convert both splits from one "
                         "folder with python -m data.make_shards")
    if len(train.classes) != num_classes:
        raise ValueError(f"MODEL.NUM_CLASSES={num_classes} but {train.root} has {len(train.classes)} classes; "
                         f"set --opts MODEL.NUM_CLASSES {len(train.classes)}")
    for split in (train, val):
        logger.info("%s: %d classes, %d images in %d shards", split.root, len(split.classes), len(split),
                    len(split.files))
    return train, val


def buffer_shuffle(items: np.ndarray, buffer: int, generator: np.random.Generator) -> np.ndarray:
    """``items`` as a shuffle buffer of ``buffer`` places emits them: each output is drawn uniformly from
    the next ``buffer`` items not yet emitted, so reading in output order never jumps further ahead
    than ``buffer`` items (WebDataset's ``shuffle(buffer)``, computed on positions).

    Args:
        items: The stream, in reading order.
        buffer: Places in the buffer (1: no shuffling).
        generator: Draws the choices.
    """
    out = np.empty_like(items)
    held = list(items[:buffer])
    draws = generator.random(len(items))
    for step, incoming in enumerate(items[buffer:]):
        pick = int(draws[step] * len(held))
        out[step], held[pick] = held[pick], incoming
    rest = len(items) - len(held)
    for step in range(len(held)):
        pick = int(draws[rest + step] * len(held))
        out[rest + step] = held[pick]
        held[pick] = held[-1]
        held.pop()
    return out


@dataclass(eq=False)
class ShardBatchSampler(EpochBatchSampler):
    """``EpochBatchSampler`` over a sharded split, in the order shard streams are read.

    Training: each epoch the shards are put in an order drawn from ``(SEED, epoch)`` and read as one
    stream; rank ``r`` of ``W`` takes the ``r``-th of ``W`` equal consecutive parts of the first
    ``W * (N // W)`` samples (the at most ``W - 1`` left over are the end of this epoch's stream,
    a different few each epoch, as the folder sampler drops a different few), then mixes its part
    with a shuffle buffer of ``buffer`` places drawn from ``(SEED, epoch, rank)``. Each rank
    thus reads a run of whole shards (plus parts of two), and every sample is seen at most once
    per epoch; as with a folder, each rank's last incomplete batch is dropped, so every rank has
    the same number of batches. Validation: rank ``r`` takes the ``r``-th of ``W`` consecutive
    blocks (sizes differing by at most one) in index order, so every image is evaluated once.

    Repeated augmentation (``repeats`` k > 1) stays within each rank's own stream, so that no rank
    reads another rank's shards: rank ``r`` takes the ``r``-th of ``W`` consecutive parts of
    ``ceil((N // W) / k)`` samples at the start of the stream, enters each sample into its shuffle
    buffer k times in a row (cut to ``N // W`` places: the samples per rank do not change), and the
    buffer spreads the copies apart. The copies of a sample thus land on the same rank (unlike the
    folder sampler's, which land on different ranks), typically up to ``buffer`` places apart, each
    with its own augmentation round; with ``buffer`` 1 they are neighbours, mostly in one batch.

    The order is a pure function of the seed, the epoch, the rank and the world size, so a
    mid-epoch resume (``set_epoch(epoch, start_batch)``) continues with the very next batch.

    Args:
        shard_sizes: Samples per shard, in index order (sample ids are consecutive per shard).
        buffer: Shuffle-buffer places (``DATA.SHUFFLE_BUFFER``).
    """

    shard_sizes: Tuple[int, ...] = ()
    buffer: int = 1

    def _block(self, total: int) -> Tuple[int, int]:
        """This rank's consecutive block of ``total`` samples: sizes differ by at most one."""
        base, extra = divmod(total, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def keys(self) -> List[Tuple[int, int]]:
        if not self.train:
            start, stop = self._block(self.num_samples)
            return [(index, self.epoch) for index in range(start, stop)]
        starts = np.concatenate([[0], np.cumsum(self.shard_sizes)[:-1]]).astype(np.int64)
        generator = torch.Generator()
        generator.manual_seed(mix_seed(self.seed, SALT_SHARD_ORDER, self.epoch))
        order = torch.randperm(len(self.shard_sizes), generator=generator).tolist()
        stream = np.concatenate([np.arange(starts[s], starts[s] + self.shard_sizes[s]) for s in order])
        per_rank = self.num_samples // self.world_size
        distinct = -(-per_rank // self.repeats)  # this rank's distinct samples: each read `repeats` times
        mine = stream[self.rank * distinct:(self.rank + 1) * distinct]
        mixer = np.random.default_rng(mix_seed(self.seed, SALT_SHARD_ORDER, self.epoch, self.rank))
        # Place p of the repeated part is copy p % repeats of mine[p // repeats]: the copies enter the
        # buffer one after the other and leave it apart, as far as the buffer mixes.
        places = buffer_shuffle(np.arange(per_rank), self.buffer, mixer)
        return [(int(mine[place // self.repeats]), augmentation_round(self.epoch, int(place % self.repeats),
                                                                      self.repeats)) for place in places]

    @property
    def samples_per_rank(self) -> int:
        if self.train:
            return self.num_samples // self.world_size
        start, stop = self._block(self.num_samples)
        return stop - start
