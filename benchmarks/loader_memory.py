"""Peak shared memory (/dev/shm) per rank of the ``pytorch`` loader in a 2-process run.

Two rank processes (rank 0 and 1 of 2, no process group needed: each builds its own rank part) run
``--epochs`` training passes and a validation pass after each, sleeping ``--step-s`` per batch in
place of the training step; the first step of each pass takes ``--fill-s``, long enough for the
workers to fill every prefetch slot (the worst case, as behind a slow step or a checkpoint save),
so the peak does not depend on how fast the machine decodes. Meanwhile this process samples, for each rank, the ``/dev/shm`` files its process tree (the
rank and its DataLoader workers) holds open or mapped, each file counted once, and reports the
peak per rank. As a cross-check it also samples the whole ``/dev/shm`` (``shutil.disk_usage``;
other jobs on the machine show up there too).

Designs compared:
    uint8    the loader as built by ``build_loader``: workers hand over uint8 batches, prefetch 2,
             normalised on the device; training workers persist, validation workers do not.
    float32  the previous design, rebuilt here: the workers normalise (and erase), handing over
             float32 batches, prefetch 4, training and validation workers both persistent.

Example (the figures in docs/data.md):
    python -m benchmarks.loader_memory --make-images 1280 --data-path /tmp/bench_memory
    python -m benchmarks.loader_memory --data-path /tmp/bench_memory
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import time
from pathlib import Path
from typing import Dict, Iterable, List

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybeToTensor
from torch.utils.data import DataLoader
from torchvision import transforms
from yacs.config import CfgNode

from benchmarks.data_throughput import make_images
from config import _C
from data import build_loader
from data.common import EpochBatchSampler
from data.folder import scan_image_folder
from data.toy import CLASSES
from data.torch_loader import SeededImageFolder, build_transforms, collate, init_worker

DESIGNS = ("float32", "uint8")
MIB = 2**20


def bench_config(args: argparse.Namespace) -> CfgNode:
    """The measured run: ``args``' folder, image size, batch and workers, the default augmentation.

    Args:
        args: The parsed command line.
    """
    cfg = _C.clone()
    cfg.DATA.DATASET, cfg.DATA.DATA_PATH, cfg.DATA.LOADER = "imagenet", str(args.data_path), "pytorch"
    cfg.DATA.IMG_SIZE, cfg.DATA.BATCH_SIZE, cfg.DATA.NUM_WORKERS = args.img_size, args.batch_size, args.workers
    cfg.DATA.PIN_MEMORY = False  # CPU device: no pinning thread either way
    cfg.MODEL.NUM_CLASSES = len(CLASSES)
    return cfg


def float32_loaders(cfg: CfgNode, rank: int, world_size: int) -> List[DataLoader]:
    """The previous design's train and val DataLoaders: timm's normalising transforms (erasing in the
    worker), float32 batches, prefetch 4, persistent workers for both.

    Args:
        cfg: The measured run's config.
        rank: This rank.
        world_size: Number of ranks.
    """
    train_set, val_set = scan_image_folder(Path(cfg.DATA.DATA_PATH), cfg.MODEL.NUM_CLASSES)
    loaders = []
    for split, train in ((train_set, True), (val_set, False)):
        to_uint8 = build_transforms(cfg, train).transforms[:-1]  # all but timm's final MaybePILToTensor
        tail = [MaybeToTensor(), transforms.Normalize(torch.tensor(IMAGENET_DEFAULT_MEAN),
                                                      torch.tensor(IMAGENET_DEFAULT_STD))]
        if train:
            tail.append(RandomErasing(cfg.AUG.REPROB, mode=cfg.AUG.REMODE, max_count=cfg.AUG.RECOUNT, device="cpu"))
        dataset = SeededImageFolder(split, transforms.Compose(to_uint8 + tail), cfg.SEED, train)
        sampler = EpochBatchSampler(len(split), cfg.DATA.BATCH_SIZE, cfg.SEED, rank, world_size, train=train)
        loaders.append(DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.DATA.NUM_WORKERS,
                                  collate_fn=collate, persistent_workers=True, prefetch_factor=4,
                                  worker_init_fn=init_worker))
    return loaders


def run_rank(design: str, cfg: CfgNode, rank: int, world_size: int, args: argparse.Namespace) -> None:
    """One rank: ``args.epochs`` x (training pass, validation pass), ``args.step_s`` per batch after a
    first one of ``args.fill_s``.

    Args:
        design: ``float32`` or ``uint8`` (see the module docstring).
        cfg: The measured run's config.
        rank: This rank.
        world_size: Number of ranks.
        args: The parsed command line.
    """
    torch.set_num_threads(1)
    if design == "uint8":
        loaders = build_loader(cfg, torch.device("cpu"), rank, world_size)
        train, val, sampler = loaders.train, loaders.val, loaders.train.sampler
    else:
        train, val = float32_loaders(cfg, rank, world_size)
        sampler = train.batch_sampler
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for loader in (train, val):
            for batch, _ in enumerate(loader):
                time.sleep(args.fill_s if batch == 0 else args.step_s)  # the training / evaluation step


def process_tree(pid: int) -> List[int]:
    """``pid`` and its descendants (``/proc/<pid>/task/<tid>/children``).

    Args:
        pid: The root process.
    """
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    pending.extend(int(child) for child in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return tree


def shm_bytes(pids: Iterable[int]) -> int:
    """Bytes of the distinct ``/dev/shm`` files that ``pids`` hold open (fds) or mapped, deleted ones included.

    Args:
        pids: The processes to look at.
    """
    sizes: Dict[int, int] = {}  # inode -> bytes
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = f"/proc/{pid}/fd/{fd}"
                if os.readlink(link).startswith("/dev/shm/"):
                    stat = os.stat(link)
                    sizes[stat.st_ino] = max(sizes.get(stat.st_ino, 0), stat.st_size)
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    if "/dev/shm/" in line:
                        span, _, _, _, inode = line.split(maxsplit=5)[:5]
                        start, end = (int(x, 16) for x in span.split("-"))
                        sizes[int(inode)] = max(sizes.get(int(inode), 0), end - start)
        except (FileNotFoundError, ProcessLookupError):
            continue  # the process (a worker) exited meanwhile
    return sum(sizes.values())


def measure(design: str, cfg: CfgNode, args: argparse.Namespace) -> Dict[str, float]:
    """Run both ranks of ``design`` and sample their shared memory until they exit.

    Args:
        design: ``float32`` or ``uint8``.
        cfg: The measured run's config.
        args: The parsed command line.

    Returns:
        Peak MiB of each rank (``rank0``, ``rank1``), of the whole ``/dev/shm`` halved (``system``),
        and the sampling rate (``rate``, per second).
    """
    context = multiprocessing.get_context("spawn")
    ranks = [context.Process(target=run_rank, args=(design, cfg, rank, 2, args))
             for rank in range(2)]
    baseline = shutil.disk_usage("/dev/shm").used
    for process in ranks:
        process.start()
    peaks, system_peak, samples, trees = [0, 0], 0, 0, [[p.pid] for p in ranks]
    start = last_scan = time.perf_counter()
    while any(process.is_alive() for process in ranks):
        if time.perf_counter() - last_scan > 0.05:  # workers come and go: rescan the trees at 20 Hz
            trees, last_scan = [process_tree(p.pid) for p in ranks], time.perf_counter()
        for rank, tree in enumerate(trees):
            peaks[rank] = max(peaks[rank], shm_bytes(tree))
        system_peak = max(system_peak, shutil.disk_usage("/dev/shm").used - baseline)
        samples += 1
        time.sleep(0.002)  # a few hundred samples/s, leaving the cores to the ranks
    for process in ranks:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"{design} rank exited with code {process.exitcode}; rerun to see its traceback")
    return {"rank0": peaks[0] / MIB, "rank1": peaks[1] / MIB, "system": system_peak / 2 / MIB,
            "rate": samples / (time.perf_counter() - start)}


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", type=Path, required=True, help="folder with {train,val}/<class>/ images")
    parser.add_argument("--make-images", type=int, default=0, help="first write this many 500x375 JPEGs")
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=DESIGNS)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--step-s", type=float, default=0.5, help="seconds per batch standing in for a step")
    parser.add_argument("--fill-s", type=float, default=15.0, help="seconds of the first step of each pass")
    args = parser.parse_args(argv)
    if args.make_images:
        make_images(args.data_path, args.make_images)
    cfg = bench_config(args)
    image = 3 * args.img_size ** 2 * args.batch_size
    print(f"2 ranks, {args.workers} workers each, batch {args.batch_size} at {args.img_size}; "
          f"load average at start {os.getloadavg()[0]:.1f}")
    print("| design | batch MiB | in flight per rank, at most | peak rank 0 MiB | peak rank 1 MiB "
          "| /dev/shm peak / 2 MiB | samples/s |")
    print("|---|---|---|---|---|---|---|")
    results: Dict[str, Dict[str, float]] = {}
    for design in args.designs:
        batch, prefetch = (4 * image, 4) if design == "float32" else (image, 2)
        results[design] = r = measure(design, cfg, args)
        bound = args.workers * prefetch
        print(f"| {design} | {batch / MIB:.1f} | {bound} batches, {bound * batch / MIB:.0f} MiB | {r['rank0']:.1f} "
              f"| {r['rank1']:.1f} | {r['system']:.1f} | {r['rate']:.0f} |", flush=True)
    if set(results) == set(DESIGNS):
        worst = {design: max(r["rank0"], r["rank1"]) for design, r in results.items()}
        print(f"peak per rank, uint8 / float32: {worst['uint8']:.1f} / {worst['float32']:.1f} MiB "
              f"= {worst['uint8'] / worst['float32']:.3f}")


if __name__ == "__main__":
    main()
