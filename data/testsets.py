"""ImageNet's extra test sets: ImageNet-V2's class-index folders and ImageNet-ReaL's relabelled val set.

ImageNet-V2 (``imagenetv2-*-format-val/``) names its class folders ``0`` .. ``999`` by class
index. torchvision's ``ImageFolder`` (and :func:`data.folder.scan_split`) sort folder names as
strings, ``0, 1, 10, 100, 101, ...``, which silently gives folder ``10`` label 2:
``DATA.VAL_LAYOUT indices`` labels each val image by its folder's integer value instead, and
takes the class names from ``train/`` (for ImageNet, the sorted wnids, whose positions are
V2's indices).

ImageNet-ReaL (Beyer et al. 2020, ``real.json``) lists, for each of the 50,000 original val
images in file-name order (``ILSVRC2012_val_00000001.JPEG`` ..), the set of correct classes (an
empty list: no label fits; those images are left out of ReaL top-1). ``DATA.REAL_LABELS``
points at the file; ``--eval`` reports ReaL top-1 next to the original.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .folder import FileListCache, FolderSplit, scan_split

logger = logging.getLogger(__name__)

# The file names of ImageNet's 50,000 val images; real.json's entry i is image i + 1.
_VAL_FILE_RE = re.compile(r"^ILSVRC2012_val_(\d{8})\.[A-Za-z]+$")


def relabel_index_folders(val: FolderSplit, class_names: Sequence[str]) -> FolderSplit:
    """``val`` with each image labelled by its class folder's integer value (ImageNet-V2's layout).

    Args:
        val: The split as :func:`data.folder.scan_split` lists it (folders in string order).
        class_names: The dataset's classes in label order (the train split's); folder ``k`` holds
            class ``class_names[k]``.

    Returns:
        The same images, labels = folder values, classes = ``class_names``, ordered by label.

    Raises:
        ValueError: a folder name that is not a class index below ``len(class_names)``.
    """
    values = []
    for name in val.classes:
        if not (name.isdigit() and int(name) < len(class_names)):
            raise ValueError(f"{val.root}/{name} is not a class index in 0..{len(class_names) - 1}: DATA.VAL_LAYOUT "
                             "'indices' reads class folders named by their index (ImageNet-V2's 0..999); use "
                             "DATA.VAL_LAYOUT names for folders named like train's")
        values.append(int(name))
    if len(set(values)) != len(values):
        raise ValueError(f"{val.root} has two class folders of the same index ({sorted(val.classes)[:10]}); "
                         "keep one folder per class index")
    samples = sorted(((path, values[label]) for path, label in val.samples), key=lambda sample: sample[1])
    return FolderSplit(root=val.root, classes=list(class_names), samples=samples)


def scan_with_index_val(root: Path, num_classes: int,
                        cache: Optional[FileListCache] = None) -> Tuple[FolderSplit, FolderSplit]:
    """``root/train`` (class folders by name) and ``root/val`` (class folders by index), checked.

    Args:
        root: Dataset directory (``DATA.DATA_PATH``).
        num_classes: ``MODEL.NUM_CLASSES``, which must equal train's number of class folders.
        cache: The file-list cache, as for a folder dataset.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset directory {root} does not exist; set DATA.DATA_PATH (--data-path) to the "
                         "folder holding train/ and val/")
    train = scan_split(root / "train", cache)
    if len(train.classes) != num_classes:
        raise ValueError(f"MODEL.NUM_CLASSES={num_classes} but {train.root} has {len(train.classes)} class "
                         f"folders; set MODEL.NUM_CLASSES {len(train.classes)}")
    val = relabel_index_folders(scan_split(root / "val", cache), train.classes)
    logger.info("%s: class folders named by index (DATA.VAL_LAYOUT indices), %d of %d classes, %d images",
                val.root, len({label for _, label in val.samples}), num_classes, len(val))
    return train, val


def load_real_labels(path: str) -> List[List[int]]:
    """ImageNet-ReaL's ``real.json``: for val image ``i + 1``, the list of its correct classes.

    Args:
        path: The file (``DATA.REAL_LABELS``).
    """
    try:
        with open(path, "r", encoding="utf-8") as f:
            labels = json.load(f)
    except OSError as e:
        raise ValueError(f"DATA.REAL_LABELS={path!r} cannot be read ({e.strerror or e}); pass the path of "
                         "ImageNet-ReaL's real.json") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"DATA.REAL_LABELS={path!r} is not JSON ({e}); pass ImageNet-ReaL's real.json") from None
    if not (isinstance(labels, list) and all(isinstance(entry, list) and all(isinstance(c, int) for c in entry)
                                             for entry in labels)):
        raise ValueError(f"DATA.REAL_LABELS={path!r} is not a list of class lists, one per val image; pass "
                         "ImageNet-ReaL's real.json")
    return labels


def real_labels_of(paths: Sequence[str], real: Sequence[Sequence[int]]) -> List[List[int]]:
    """The ReaL classes of each val image, found by its file name (``ILSVRC2012_val_NNNNNNNN``).

    Args:
        paths: Image paths (only their file names are read).
        real: From :func:`load_real_labels`.

    Raises:
        ValueError: a file name that is not an ImageNet val image's, or beyond ``real``.
    """
    labels = []
    for path in paths:
        match = _VAL_FILE_RE.match(os.path.basename(path))
        number = int(match.group(1)) if match else 0
        if not 1 <= number <= len(real):
            raise ValueError(f"{path} is not one of the {len(real)} ImageNet val images that DATA.REAL_LABELS "
                             "labels (ILSVRC2012_val_00000001.JPEG ..); ReaL labels apply to the original val set "
                             "only: drop DATA.REAL_LABELS for other sets")
        labels.append(list(real[number - 1]))
    return labels


def real_top1(predictions: Sequence[int], labels: Sequence[Sequence[int]]) -> Tuple[float, int]:
    """ReaL top-1 (%): a prediction is right when it is one of the image's ReaL classes; images with
    no ReaL class are left out (as in the paper and timm's ``RealLabelsImagenet``).

    Args:
        predictions: The top-1 class of each image.
        labels: The ReaL classes of each image (:func:`real_labels_of`).

    Returns:
        ``(top-1 %, images counted)``.
    """
    counted = [(prediction, set(classes)) for prediction, classes in zip(predictions, labels) if classes]
    if not counted:
        return float("nan"), 0
    return 100.0 * sum(prediction in classes for prediction, classes in counted) / len(counted), len(counted)
