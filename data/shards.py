"""Tar shards (``DATA.FORMAT shards``): the index format, reading samples, and each epoch's order.

A sharded split is a directory ``SHARDS/<split>/`` of WebDataset-style tar files written by
``python -m data.make_shards``: each sample is a member ``KEY.<ext>`` (the original image bytes)
followed by ``KEY.cls`` (its label as decimal text). Beside them, ``index.json`` lists every
shard's size and, per sample, its key, label, extension and the byte range of the image inside
the tar, and one DALI index file (``shard-NNNNNN.idx``) per shard serves DALI's own webdataset
reader.

Readers take a sample's bytes straight from its byte range (``os.pread`` on a shard kept open),
so a network file system pays one open per shard instead of one per image, and a sample can be
read by its number, like a file of a folder: the loaders' sampling, resume and bad-file handling
are the folder's. :class:`ShardBatchSampler` orders an epoch the sharded way.
"""
from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

INDEX_NAME = "index.json"
INDEX_FORMAT = "crossformer-shards/1"


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
