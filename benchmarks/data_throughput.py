"""Images/s of the train loaders (dali, pytorch) with the default augmentation, with and without RandAugment.

Examples (from the repository root):
    python -m benchmarks.data_throughput --make-images 512 --data-path /tmp/bench500   # 500x375 JPEGs
    python -m benchmarks.data_throughput --data-path /tmp/bench500 --threads 2
    python -m benchmarks.data_throughput --toy --img-size 64 --threads 1 2
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import List

import numpy as np
import torch
from PIL import Image
from yacs.config import CfgNode

from config import _C
from data import build_loader
from data.toy import CLASSES, draw_toy_image

logger = logging.getLogger("data_throughput")


def make_images(root: Path, count: int, width: int = 500, height: int = 375, workers: int = 1) -> None:
    """Write ``count`` photo-like JPEGs (toy shapes plus sensor-like noise, ~ImageNet file sizes)
    to ``root/{train,val}/<class>/``.

    Args:
        root: Destination.
        count: Training images (val gets one per class).
        width: Image width.
        height: Image height.
        workers: Processes writing the classes in parallel (1: this process).
    """
    jobs = [(root, split, label, per_class, width, height)
            for split, per_class in (("train", max(1, count // len(CLASSES))), ("val", 1))
            for label in range(len(CLASSES))]
    if workers <= 1:
        for job in jobs:
            _make_class_images(*job)
        return
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_make_class_images, *zip(*jobs)))


def _make_class_images(root: Path, split: str, label: int, per_class: int, width: int, height: int) -> None:
    """One class's images of :func:`make_images` (the content is a function of split, label and index)."""
    folder = root / split / CLASSES[label]
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(per_class):
        rng = random.Random(f"bench/{split}/{label}/{n}")
        image = np.asarray(draw_toy_image(label, rng, width), dtype=np.float32)[:height]
        noise = np.random.default_rng(n).normal(0, 12, image.shape)
        Image.fromarray((image + noise).clip(0, 255).astype(np.uint8)).save(folder / f"{n}.JPEG", quality=90)


def measure(cfg, batches: int, device: torch.device = torch.device("cpu")) -> float:
    """Images/s over ``batches`` train batches after one warm-up batch (loader start-up excluded), delivered on
    ``device`` (a CUDA device: DALI's mixed pipeline; the time includes the last batch's arrival there)."""
    train = build_loader(cfg, device).train
    seen, start = 0, None
    while seen < batches * cfg.DATA.BATCH_SIZE:
        for images, _ in train:
            if start is None:
                start = time.perf_counter()  # after the first batch: workers/pipeline are warm
                continue
            seen += images.shape[0]
            if seen >= batches * cfg.DATA.BATCH_SIZE:
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - start)


def loader_config(args: argparse.Namespace, loader: str, threads: int, randaug: bool) -> CfgNode:
    """The config of one measured loader: ``args``' data, ``threads`` workers, augmentation
    with or without RandAugment / colour jitter / erasing."""
    cfg = _C.clone()
    cfg.DATA.DATASET = "toy" if args.toy else "imagenet"
    cfg.DATA.DATA_PATH = str(args.data_path or "")
    cfg.DATA.LOADER = loader
    cfg.DATA.IMG_SIZE = args.img_size
    cfg.DATA.BATCH_SIZE = args.batch_size
    cfg.DATA.NUM_WORKERS = threads
    cfg.DATA.PIN_MEMORY = False
    cfg.MODEL.NUM_CLASSES = len(CLASSES)
    if not randaug:  # decode + random resized crop + flip + normalise only
        cfg.AUG.AUTO_AUGMENT, cfg.AUG.COLOR_JITTER, cfg.AUG.REPROB = "", 0.0, 0.0
    return cfg


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", type=Path, help="folder with train/<class>/ images")
    parser.add_argument("--toy", action="store_true", help="benchmark the built-in toy dataset")
    parser.add_argument("--make-images", type=int, default=0, help="first write this many 500x375 JPEGs")
    parser.add_argument("--loaders", nargs="+", default=["dali", "pytorch"], choices=["dali", "pytorch"])
    parser.add_argument("--threads", nargs="+", type=int, default=[2], help="DALI threads / PyTorch workers")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=15, help="timed batches per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="alternating trials per loader (median reported)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.make_images:
        make_images(args.data_path, args.make_images)
    torch.set_num_threads(1)  # the main process only copies batches; workers/DALI threads do the work
    # The load average tells how much of the machine other jobs held while measuring.
    print(f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}")
    print(f"median of {args.repeats} alternating trial(s) per row; ratio = dali / pytorch of the same trial")
    print("| threads | augmentation | " + " | ".join(f"{name} images/s" for name in args.loaders)
          + (" | dali / pytorch |" if len(args.loaders) == 2 else " |") + " load avg |")
    print("|---" * (3 + len(args.loaders) + (len(args.loaders) == 2)) + "|")
    for randaug in (False, True):
        for threads in args.threads:
            cfgs = {loader: loader_config(args, loader, threads, randaug) for loader in args.loaders}
            cfg = cfgs[args.loaders[0]]
            name = "RRC+flip+norm" + (f" + {cfg.AUG.AUTO_AUGMENT} + erase {cfg.AUG.REPROB}" if randaug else "")
            rates = {loader: [] for loader in args.loaders}
            for _ in range(args.repeats):  # alternate, so that a slower spell of the machine hits both
                for loader in args.loaders:
                    rates[loader].append(measure(cfgs[loader], args.batches))
            row = [f"{statistics.median(rates[loader]):.0f}" for loader in args.loaders]
            if len(args.loaders) == 2:
                ratios = [d / p for d, p in zip(rates["dali"], rates["pytorch"])]
                row.append(f"{statistics.median(ratios):.2f}x (trials {', '.join(f'{r:.2f}' for r in ratios)})")
            print(f"| {threads} | {name} | " + " | ".join(row) + f" | {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
