"""The ``imagenet`` folder layout (``root/{train,val}/<class>/<image>``): scanning and validation."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

from torchvision.datasets.folder import IMG_EXTENSIONS
from yacs.config import CfgNode

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")


@dataclass
class ImageSplit:
    """One scanned split of an image folder.

    Args:
        root: The split directory (``DATA_PATH/train`` or ``DATA_PATH/val``).
        classes: Class directory names, sorted (label = position, as in torchvision's ImageFolder).
        samples: ``(path, label)`` pairs, sorted by class then file name.
    """

    root: Path
    classes: List[str]
    samples: List[Tuple[str, int]]

    def __len__(self) -> int:
        return len(self.samples)


def resolve_dataset_root(config: CfgNode) -> Path:
    """The folder holding ``train/`` and ``val/`` for ``DATA.DATASET`` ``imagenet`` or ``toy``.

    ``toy`` is generated under ``DATA.TOY_ROOT`` on first use.

    Args:
        config: The run's config.
    """
    if config.DATA.DATASET == "toy":
        from .toy import DEFAULT_TOY_SPEC, default_toy_root, ensure_toy_dataset
        return ensure_toy_dataset(Path(config.DATA.TOY_ROOT or default_toy_root()), DEFAULT_TOY_SPEC)
    if not config.DATA.DATA_PATH:
        raise ValueError("DATA.DATA_PATH is empty but DATA.DATASET is 'imagenet'; pass --data-path "
                         "/path/to/imagenet (holding train/ and val/), or use DATA.DATASET toy or synthetic")
    return Path(config.DATA.DATA_PATH).expanduser()


def _scan_split(split_dir: Path) -> ImageSplit:
    """List the classes and images of one split, rejecting a split or class with no images."""
    if not split_dir.is_dir():
        raise ValueError(f"split directory {split_dir} is missing; the dataset must be laid out as "
                         f"{split_dir.parent}/{{train,val}}/<class>/<image>.JPEG (move the images there or "
                         "fix DATA.DATA_PATH)")
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not classes:
        raise ValueError(f"{split_dir} has no class directories; put each class's images in "
                         f"{split_dir}/<class>/ (a flat val folder must first be sorted into class folders)")
    samples: List[Tuple[str, int]] = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        files = sorted(entry.name for entry in os.scandir(class_dir)
                       if entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS))
        if not files:
            raise ValueError(f"class directory {class_dir} has no images (extensions {', '.join(IMG_EXTENSIONS)}); "
                             "add its images or remove the directory from every split")
        samples.extend((str(class_dir / file), label) for file in files)
    return ImageSplit(root=split_dir, classes=classes, samples=samples)


def scan_image_folder(root: Path, num_classes: int) -> Tuple[ImageSplit, ImageSplit]:
    """Scan and check ``root/train`` and ``root/val`` before training starts.

    Args:
        root: Dataset directory.
        num_classes: ``MODEL.NUM_CLASSES``, which must equal the number of class folders.

    Returns:
        ``(train, val)`` splits with identical class lists.

    Raises:
        ValueError: one clear message per problem (missing root or split, empty class, class sets
            that differ between splits, ``MODEL.NUM_CLASSES`` mismatch), naming the path and the fix.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset directory {root} does not exist; set DATA.DATA_PATH (--data-path) to the "
                         "folder holding train/ and val/")
    train, val = (_scan_split(root / split) for split in SPLITS)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise ValueError(
            f"class folders of {train.root} and {val.root} differ (only in train: {only_train[:5]}"
            f"{' ...' if len(only_train) > 5 else ''}; only in val: {only_val[:5]}"
            f"{' ...' if len(only_val) > 5 else ''}); both splits must have the same class folders")
    if len(train.classes) != num_classes:
        raise ValueError(f"MODEL.NUM_CLASSES={num_classes} but {train.root} has {len(train.classes)} class "
                         f"folders; set MODEL.NUM_CLASSES {len(train.classes)}")
    logger.info("dataset %s: %d classes, %d train and %d val images", root, len(train.classes),
                len(train), len(val))
    return train, val
