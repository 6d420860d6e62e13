"""The ``multilabel`` format: flat image folders with a label file each; every image has a set of classes.

Layout (``DATA.FORMAT multilabel``, the Kaggle "Planet" style)::

    DATA_PATH/train/        images (a name may hold a subfolder: train/a/1.jpg is "a/1.jpg")
    DATA_PATH/val/
    DATA_PATH/train.csv     header "file,labels", then one row per image: file,labels
    DATA_PATH/val.csv

``file`` is the image's path relative to its split folder; ``labels`` are class names separated
by spaces (empty: the image shows none of the classes). The classes are the sorted union of
train.csv's labels; every val label must be one of them. Samples are ordered by file name; images
of the folder that the label file does not list are not used (logged).
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from .split import SPLITS, ImageSplit, load_rgb

logger = logging.getLogger(__name__)

HEADER = ["file", "labels"]
NO_LABEL = -1  # the label in ``samples``: a multi-label sample's target is its multi-hot row


@dataclass
class MultiLabelSplit(ImageSplit):
    """A multi-label split: sample ``i`` is the file ``samples[i][0]``, its classes ``targets[i]``.

    Args:
        root: The split directory (``DATA_PATH/train`` or ``DATA_PATH/val``).
        classes: Class names, sorted (the union of train.csv's labels).
        samples: ``(path, -1)`` pairs, sorted by path.
        targets: ``(N, C)`` float32 multi-hot rows, row ``i`` for ``samples[i]``.
    """

    targets: np.ndarray = field(repr=False)

    @property
    def multi_label(self) -> bool:
        return True

    def multi_hot(self, position: int) -> np.ndarray:
        return self.targets[position]

    def read_encoded(self, position: int) -> np.ndarray:
        return np.fromfile(self.samples[position][0], dtype=np.uint8)

    def load_rgb(self, position: int) -> Image.Image:  # from the path: PIL's errors name the file
        return load_rgb(self.samples[position][0])


def read_label_file(path: Path) -> Dict[str, List[str]]:
    """``{file: [class names]}`` of a label file (header ``file,labels``; labels separated by spaces).

    Args:
        path: ``DATA_PATH/train.csv`` or ``DATA_PATH/val.csv``.

    Raises:
        ValueError: a missing file, a wrong header, a row without two columns or a file listed twice,
            naming the file, the line and the fix.
    """
    if not path.is_file():
        raise ValueError(f"label file {path} is missing; DATA.FORMAT multilabel needs {path.name} beside "
                         f"{path.with_suffix('')}/ with rows file,labels (labels separated by spaces)")
    labels: Dict[str, List[str]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if [cell.strip() for cell in header or []] != HEADER:
            raise ValueError(f"{path} starts with {header!r}, not the header file,labels; add that line first")
        for line, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) != 2 or not row[0].strip():
                raise ValueError(f"{path} line {line}: {row!r} is not file,labels (two columns, a file name first); "
                                 "quote a file name holding a comma")
            name = row[0].strip()
            if name in labels:
                raise ValueError(f"{path} line {line}: {name} is listed twice; give each image one row")
            labels[name] = sorted(set(row[1].split()))
    return labels


def _split_of(split_dir: Path, labels: Dict[str, List[str]], classes: List[str]) -> MultiLabelSplit:
    """The split of ``split_dir`` with the rows of its label file; a listed file that is missing is an error."""
    names = sorted(labels)
    missing = [name for name in names if not (split_dir / name).is_file()]
    if missing:
        raise ValueError(f"{len(missing)} image(s) listed in {split_dir}.csv are not in {split_dir}: "
                         f"{missing[:3]}{' ...' if len(missing) > 3 else ''}; add them or remove their rows")
    index = {name: i for i, name in enumerate(classes)}
    targets = np.zeros((len(names), len(classes)), dtype=np.float32)  # (N, C)
    for row, name in enumerate(names):
        targets[row, [index[label] for label in labels[name]]] = 1.0
    listed = len(names)
    on_disk = sum(1 for _, _, files in os.walk(split_dir) for file in files if file.lower().endswith(IMG_EXTENSIONS))
    if on_disk > listed:
        logger.info("%s: %d image(s) not listed in %s.csv are not used", split_dir, on_disk - listed, split_dir)
    samples = [(os.path.join(str(split_dir), name), NO_LABEL) for name in names]
    return MultiLabelSplit(root=split_dir, classes=classes, samples=samples, targets=targets)


def open_multilabel_splits(root: Path, num_classes: int) -> Tuple[MultiLabelSplit, MultiLabelSplit]:
    """Read and check ``root/{train,val}`` and their label files before training starts.

    Args:
        root: Dataset directory.
        num_classes: ``MODEL.NUM_CLASSES``, which must equal the number of classes in train.csv.

    Returns:
        ``(train, val)`` splits with the same class list.

    Raises:
        ValueError: one clear message per problem (missing folder or label file, a malformed row, a
            listed image that is missing, an empty split, a val class that train does not have, a
            ``MODEL.NUM_CLASSES`` mismatch), naming the path and the fix.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset directory {root} does not exist; set DATA.DATA_PATH (--data-path) to the "
                         "folder holding train/, val/, train.csv and val.csv")
    for split in SPLITS:
        if not (root / split).is_dir():
            raise ValueError(f"split directory {root / split} is missing; DATA.FORMAT multilabel needs "
                             f"{root}/{{train,val}}/ image folders with {root}/{{train,val}}.csv beside them")
    train_labels, val_labels = (read_label_file(root / f"{split}.csv") for split in SPLITS)
    for split, labels in zip(SPLITS, (train_labels, val_labels)):
        if not labels:
            raise ValueError(f"{root / split}.csv lists no images; add a row file,labels per image")
    classes = sorted({label for labels in train_labels.values() for label in labels})
    unknown = sorted({label for labels in val_labels.values() for label in labels} - set(classes))
    if unknown:
        raise ValueError(f"{root}/val.csv has classes that no image of train.csv has: {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''}; the classes are train.csv's, so fix the val labels")
    if len(classes) != num_classes:
        raise ValueError(f"MODEL.NUM_CLASSES={num_classes} but {root}/train.csv has {len(classes)} classes; set "
                         f"MODEL.NUM_CLASSES {len(classes)}")
    train, val = (_split_of(root / split, labels, classes)
                  for split, labels in zip(SPLITS, (train_labels, val_labels)))
    logger.info("multi-label dataset %s: %d classes, %d train and %d val images, %.2f classes per train image",
                root, len(classes), len(train), len(val), float(train.targets.sum(axis=1).mean()))
    return train, val
