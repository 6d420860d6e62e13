"""Start-up cost of a big image folder: the first scan against a restart that reuses the file list.

    python -m benchmarks.folder_scan --root /tmp/scan_tree [--classes 1000 --train 190 --val 10]
    python -m benchmarks.folder_scan --root /tmp/scan_tree --latency-ms 1

``--latency-ms`` models a network file system: every metadata round trip (a ``stat``, and a
directory listing per 512 entries, as NFS READDIR returns a few hundred per call) waits that long.

Generates (once) an ImageNet-layout tree of empty ``.JPEG`` files (1000 classes x 200 files =
200,000 by default), then times, alternating for ``--trials`` rounds: a scan without the cache
(what every start costs without it), a first start with an empty cache (scan and write the
list) and a restart (validate the class directories' times, read the list). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

from data import folder
from data.folder import FileListCache, scan_image_folder


class _NetworkFs:
    """``os`` for ``data.folder`` with ``latency`` seconds per metadata round trip."""

    def __init__(self, latency: float) -> None:
        self.latency = latency

    def __getattr__(self, name: str):
        return getattr(os, name)

    def stat(self, path, *args, **kwargs):
        time.sleep(self.latency)
        return os.stat(path, *args, **kwargs)

    def scandir(self, path):
        entries = list(os.scandir(path))
        time.sleep(self.latency * (1 + len(entries) // 512))
        return iter(entries)


def make_tree(root: Path, classes: int, per_split: Dict[str, int]) -> int:
    """Create the tree under ``root`` unless it is complete; returns the number of files."""
    marker = root / ".complete"
    total = classes * sum(per_split.values())
    if marker.exists() and marker.read_text() == str(total):
        return total
    shutil.rmtree(root, ignore_errors=True)
    for split, count in per_split.items():
        for label in range(classes):
            class_dir = root / split / f"n{label:08d}"
            class_dir.mkdir(parents=True)
            for index in range(count):
                (class_dir / f"n{label:08d}_{index}.JPEG").touch()
    marker.write_text(str(total))
    return total


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "crossformer_scan_tree")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--train", type=int, default=190, help="files per class in train/")
    parser.add_argument("--val", type=int, default=10, help="files per class in val/")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="per metadata round trip (models NFS)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    created = time.perf_counter()
    files = make_tree(args.root, args.classes, {"train": args.train, "val": args.val})
    created = time.perf_counter() - created
    times: Dict[str, List[float]] = {"no_cache": [], "first_start": [], "restart": []}
    cache_dir = Path(tempfile.mkdtemp(prefix="filelists-"))
    if args.latency_ms:
        folder.os = _NetworkFs(args.latency_ms / 1000)
    for _ in range(args.trials):
        times["no_cache"].append(_seconds(lambda: scan_image_folder(args.root, args.classes)))
        shutil.rmtree(cache_dir)
        cache = FileListCache(cache_dir)
        times["first_start"].append(_seconds(lambda: scan_image_folder(args.root, args.classes, cache)))
        times["restart"].append(_seconds(lambda: scan_image_folder(args.root, args.classes, cache)))
    cache_bytes = sum(p.stat().st_size for p in cache_dir.iterdir())
    shutil.rmtree(cache_dir)
    median = {key: statistics.median(values) for key, values in times.items()}
    print(json.dumps({"files": files, "classes": args.classes, "tree_created_s": round(created, 1),
                      **{f"{key}_s": round(value, 3) for key, value in median.items()},
                      "restart_speedup": round(median["no_cache"] / median["restart"], 1),
                      "cache_mib": round(cache_bytes / 2**20, 1), "latency_ms": args.latency_ms,
                      "trials": args.trials}))


if __name__ == "__main__":
    main()
