"""Conversion rate of ``python -m data.make_shards``: images/s and MB/s of source images.

    python -m benchmarks.make_shards_rate [--images 2000 --workers N --trials 3]

Generates (once) an ImageNet-layout folder of photo-like 500x375 JPEGs (``--images`` train
images in 10 classes plus 10 val images, ~70 KB each, as ``benchmarks.data_throughput`` makes
them), then converts it ``--trials`` times into a fresh directory (scan, decode check of every
file, tar, DALI index and index writing: the whole command) and prints one JSON line with the
median. The source files were just written, so they are read from the page cache: this is the
rate of the CPU work (the decode check), not of a disk or network file system.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.data_throughput import make_images
from data.make_shards import convert, default_workers


def make_folder(root: Path, images: int, width: int, height: int) -> None:
    """Create the image folder under ``root`` unless it is complete."""
    marker = root / ".complete"
    spec = f"{images} {width}x{height}"
    if marker.exists() and marker.read_text() == spec:
        return
    shutil.rmtree(root, ignore_errors=True)
    make_images(root, images, width, height)
    marker.write_text(spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="where the images are kept (default: a temp dir)")
    parser.add_argument("--images", type=int, default=2000, help="train images (val adds 10)")
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--samples-per-shard", type=int, default=250, help="small enough to keep every worker busy")
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    name = f"crossformer_shards_bench_{args.images}_{args.width}x{args.height}"
    root = args.root or Path(tempfile.gettempdir()) / name
    created = time.perf_counter()
    make_folder(root, args.images, args.width, args.height)
    created = time.perf_counter() - created
    files = list(root.rglob("*.JPEG"))
    source_bytes = sum(path.stat().st_size for path in files)
    seconds = []
    for _ in range(args.trials):
        dst = Path(tempfile.mkdtemp(prefix="shards-"))
        start = time.perf_counter()
        convert(root, dst, args.samples_per_shard, args.workers)
        seconds.append(time.perf_counter() - start)
        shutil.rmtree(dst)
    median = statistics.median(seconds)
    print(json.dumps({"images": len(files), "size": f"{args.width}x{args.height}",
                      "mean_kb": round(source_bytes / len(files) / 1e3, 1), "workers": args.workers,
                      "samples_per_shard": args.samples_per_shard, "images_per_s": round(len(files) / median),
                      "mb_per_s": round(source_bytes / 1e6 / median, 1),
                      "trials_s": [round(s, 2) for s in seconds], "folder_created_s": round(created, 1)}))


if __name__ == "__main__":
    main()
