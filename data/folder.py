"""The ``folder`` format (``root/{train,val}/<class>/<image>``): scanning, validation and the file-list cache."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from yacs.config import CfgNode

from utils.file_io import atomic_write_text

from .split import SPLITS, ImageSplit, load_rgb

logger = logging.getLogger(__name__)


class FolderSplit(ImageSplit):
    """A scanned split of an image folder: sample ``i`` is the file ``samples[i][0]``.

    Args:
        root: The split directory (``DATA_PATH/train`` or ``DATA_PATH/val``).
        classes: Class directory names, sorted (label = position, as in torchvision's ImageFolder).
        samples: ``(path, label)`` pairs, sorted by class then file name.
    """

    def read_encoded(self, position: int) -> np.ndarray:
        return np.fromfile(self.samples[position][0], dtype=np.uint8)

    def load_rgb(self, position: int) -> Image.Image:  # from the path: PIL's errors name the file
        return load_rgb(self.samples[position][0])


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


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/crossformer/filelists`` (``~/.cache/...``): where scanned file lists are kept."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "crossformer" / "filelists"


def _directory_stamps(split_dir: Path, directories: Iterable[str]) -> Dict[str, int]:
    """The modification times (ns) of ``directories`` (relative to ``split_dir``; "" is itself).

    Adding, removing or renaming a file changes its directory's time, so equal stamps mean the
    listing is unchanged (a file's contents may change; that is read, not listed)."""
    return {name: os.stat(os.path.join(split_dir, name)).st_mtime_ns for name in directories}


def _list_images(split_dir: Path, class_name: str, stamps: Dict[str, int]) -> List[str]:
    """The images of one class, nested folders included, as paths relative to the class directory,
    in torchvision ``ImageFolder``'s order (directories by path, then files by name). Each
    directory's time goes into ``stamps`` before it is listed, so a file added meanwhile invalidates."""
    listed: List[Tuple[str, List[str]]] = []
    pending = [""]
    while pending:
        relative = pending.pop()
        directory = os.path.join(split_dir, class_name, relative)
        stamps[os.path.join(class_name, relative) if relative else class_name] = os.stat(directory).st_mtime_ns
        files = []
        for entry in os.scandir(directory):
            if entry.is_dir():
                pending.append(os.path.join(relative, entry.name))
            elif entry.name.lower().endswith(IMG_EXTENSIONS):
                files.append(os.path.join(relative, entry.name))
        listed.append((os.path.join(str(split_dir), class_name, relative), sorted(files)))
    return [file for _, files in sorted(listed) for file in files]


class FileListCache:
    """The file list of an image-folder split, kept on disk and reused while its directories are unchanged.

    A 1.28 M-file ImageNet train split costs one ``stat`` per class directory to validate instead
    of a listing of every file; on a network file system that is seconds instead of minutes,
    at every start and every requeue of a preempted job.

    Every process of a job uses the cache: :func:`scan_split` holds the split's lock file
    (:meth:`exclusive`) while it reads the list or scans and writes it, so of the processes sharing
    a cache directory the first scans and the others wait for it and read its list: one scan per
    node where each node has its own cache directory, one in all on a shared one whose file system
    has ``flock``. The list is written atomically (temp file, rename), so it is never read half-written.

    Args:
        cache_dir: Where the lists are kept (one JSON file and one lock file per split directory).
    """

    VERSION = 1

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = Path(cache_dir)

    def path(self, split_dir: Path) -> Path:
        """The cache file of ``split_dir`` (named by a hash of its absolute path)."""
        digest = hashlib.sha1(str(split_dir.resolve()).encode()).hexdigest()[:16]
        return self.cache_dir / f"{split_dir.name}-{digest}.json"

    def load(self, split_dir: Path) -> Optional[FolderSplit]:
        """The cached split, or None when there is none, it is unreadable or a directory changed."""
        path = self.path(split_dir)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("version") != self.VERSION or data["split"] != str(split_dir.resolve()):
                return None
            classes = data["classes"]
            if data["stamps"] != _directory_stamps(split_dir, data["stamps"]):
                logger.info("%s changed since its file list was cached: scanning it again", split_dir)
                return None
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:  # a class directory gone, a damaged file
            logger.info("file list cache %s not used (%s): scanning %s", path, e, split_dir)
            return None
        samples = [(prefix + name, label) for label, names in enumerate(data["files"])
                   for prefix in (os.path.join(str(split_dir), classes[label], ""),) for name in names]
        logger.info("%s: %d classes, %d images from the file list cache %s (directories unchanged)", split_dir,
                    len(classes), len(samples), path)
        return FolderSplit(root=split_dir, classes=classes, samples=samples)

    @contextlib.contextmanager
    def exclusive(self, split_dir: Path) -> Iterator[None]:
        """Hold ``split_dir``'s lock file (``flock``; released when the process ends, so never stale).

        Where no lock can be taken (an unwritable cache directory, a file system without locks) the
        block runs unlocked: every process then scans by itself, as without a cache.

        Args:
            split_dir: The split directory whose list is read or written inside the block.
        """
        lock_path = self.path(split_dir).with_suffix(".lock")
        fd = None
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("waiting for another process to scan %s (lock %s)", split_dir, lock_path)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            logger.warning("cannot lock the file list cache %s (%s); scanning %s without waiting for other processes",
                           lock_path, e.strerror or e, split_dir)
        try:
            yield
        finally:
            if fd is not None:
                os.close(fd)  # releases the lock

    def store(self, split: FolderSplit, files: List[List[str]], stamps: Dict[str, int]) -> None:
        """Keep ``split``'s listing; a failure to write is a warning (the cache is an optimisation)."""
        data = {"version": self.VERSION, "split": str(split.root.resolve()), "classes": split.classes,
                "stamps": stamps, "files": files}
        path = self.path(split.root)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(json.dumps(data), str(path))
        except OSError as e:
            logger.warning("cannot write the file list cache %s (%s); the next start scans %s again", path,
                           e.strerror or e, split.root)


def scan_split(split_dir: Path, cache: Optional[FileListCache] = None) -> FolderSplit:
    """List the classes and images of one split, rejecting a split or class with no images.

    Logs its progress every 10 s and its time; with a ``cache``, an unchanged split is not listed,
    and of the processes sharing the cache directory one lists it while the others wait and read.
    """
    if not split_dir.is_dir():
        raise ValueError(f"split directory {split_dir} is missing; the dataset must be laid out as "
                         f"{split_dir.parent}/{{train,val}}/<class>/<image>.JPEG (move the images there or "
                         "fix DATA.DATA_PATH)")
    if cache is None:
        return _list_split(split_dir)[0]
    with cache.exclusive(split_dir):
        cached = cache.load(split_dir)
        if cached is not None:
            return cached
        split, files_per_class, stamps = _list_split(split_dir)
        cache.store(split, files_per_class, stamps)
    return split


def _list_split(split_dir: Path) -> Tuple[FolderSplit, List[List[str]], Dict[str, int]]:
    """The split, its files per class (relative to the class directory) and its directories' times."""
    start = last_report = time.monotonic()
    stamps = _directory_stamps(split_dir, [""])  # before listing: a change meanwhile invalidates
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not classes and (split_dir / "index.json").is_file():
        raise ValueError(f"{split_dir} holds tar shards (index.json), not class folders; add --opts DATA.FORMAT "
                         "shards to read them")
    if not classes:
        raise ValueError(f"{split_dir} has no class directories; put each class's images in "
                         f"{split_dir}/<class>/ (a flat val folder must first be sorted into class folders)")
    samples: List[Tuple[str, int]] = []
    files_per_class: List[List[str]] = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        files = _list_images(split_dir, name, stamps)
        if not files:
            raise ValueError(f"class directory {class_dir} has no images (extensions {', '.join(IMG_EXTENSIONS)}); "
                             "add its images or remove the directory from every split")
        prefix = os.path.join(str(class_dir), "")
        samples.extend((prefix + file, label) for file in files)
        files_per_class.append(files)
        if time.monotonic() - last_report > 10:
            last_report = time.monotonic()
            logger.info("scanning %s: %d of %d classes, %d images so far", split_dir, label + 1, len(classes),
                        len(samples))
    split = FolderSplit(root=split_dir, classes=classes, samples=samples)
    logger.info("scanned %s: %d classes, %d images in %.1f s", split_dir, len(classes), len(samples),
                time.monotonic() - start)
    return split, files_per_class, stamps


def scan_image_folder(root: Path, num_classes: int,
                      cache: Optional[FileListCache] = None) -> Tuple[FolderSplit, FolderSplit]:
    """Scan and check ``root/train`` and ``root/val`` before training starts.

    Args:
        root: Dataset directory.
        num_classes: ``MODEL.NUM_CLASSES``, which must equal the number of class folders.
        cache: Reuse (and keep) the file lists of unchanged splits; None scans every time.

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
    train, val = (scan_split(root / split, cache) for split in SPLITS)
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
