"""How long a checkpoint write takes per GiB: ``torch.save`` through the atomic write every save uses.

    python -m benchmarks.checkpoint_write --dir /path/on/the/run/file/system [--gib 1 --trials 3]

Writes a dict of float32 tensors (random, so nothing compresses) of ``--gib`` GiB with
:func:`utils.file_io.atomic_save` (temp file, ``torch.save``, fsync, rename, directory fsync), as
:class:`utils.checkpoint.CheckpointFiles` does, ``--trials`` times, and prints one JSON line with
each trial's seconds per GiB. Run it on the file system of the run directory: the number sets the
lead time of SLURM's ``--signal`` and the KillWait a job needs (docs/reliability.md).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from utils.file_io import atomic_save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="a directory on the file system to measure")
    parser.add_argument("--gib", type=float, default=1.0, help="checkpoint size in GiB")
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    numel = int(args.gib * 2**30 / 4)
    checkpoint = {f"tensor{i}": torch.randn(numel // 16) for i in range(16)}  # (numel / 16,) float32 each
    path = os.path.join(args.dir, "checkpoint_write.pth")
    seconds = []
    try:
        for _ in range(args.trials):
            start = time.perf_counter()
            atomic_save(checkpoint, path)
            seconds.append(time.perf_counter() - start)
            os.remove(path)
    finally:
        if os.path.exists(path):
            os.remove(path)
    print(json.dumps({"gib": args.gib, "s_per_gib": [round(s / args.gib, 2) for s in seconds],
                      "dir": os.path.abspath(args.dir)}))


if __name__ == "__main__":
    main()
