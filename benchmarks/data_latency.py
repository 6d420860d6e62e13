"""DALI CPU train-loader images/s with and without an artificial per-file read latency (a network filesystem).

The latency is a ``time.sleep`` before each file read of the DALI loader (``SampleSource._read``),
enabled only here. Contenders, alternated inside every trial so that a slower spell of the machine
hits all of them: files read ahead on the loader's reader threads (the loader as configured) and,
for comparison, read on the thread that runs the pipeline (``READ_THREADS_PER_WORKER`` 0), each
without and with the latency. The ratio latency / no latency is taken per trial.

Examples:
    python -m benchmarks.data_latency --make-images 640 --data-path /tmp/bench_latency   # 256x256 JPEGs
    python -m benchmarks.data_latency --data-path /tmp/bench_latency --trials 5
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple
from unittest import mock

import torch

from benchmarks.data_throughput import loader_config, make_images, measure
from data import dali_loader

READ_MODES = ("read ahead", "serial")


@contextlib.contextmanager
def read_latency(seconds: float) -> Iterator[None]:
    """Make every file read of the DALI loader wait ``seconds`` first.

    Args:
        seconds: Per-file latency; 0 leaves the reads alone.
    """
    if seconds <= 0:
        yield
        return
    read = dali_loader.SampleSource._read

    def slow_read(source: dali_loader.SampleSource, position: int):
        time.sleep(seconds)
        return read(source, position)

    with mock.patch.object(dali_loader.SampleSource, "_read", slow_read):
        yield


def measure_contender(args: argparse.Namespace, mode: str, latency: float) -> float:
    """Images/s of one contender: ``mode`` (one of ``READ_MODES``) with ``latency`` seconds per file."""
    read_threads = dali_loader.READ_THREADS_PER_WORKER if mode == "read ahead" else 0
    cfg = loader_config(args, "dali", args.threads, args.randaug)
    with read_latency(latency), mock.patch.object(dali_loader, "READ_THREADS_PER_WORKER", read_threads):
        return measure(cfg, args.batches)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", type=Path, required=True, help="folder with train/<class>/ images")
    parser.add_argument("--make-images", type=int, default=0, help="first write this many 256x256 JPEGs there")
    parser.add_argument("--latency-ms", type=float, default=2.0, help="artificial latency per file read")
    parser.add_argument("--threads", type=int, default=2, help="DATA.NUM_WORKERS (DALI threads)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per measurement")
    parser.add_argument("--trials", type=int, default=5, help="alternating trials (median reported)")
    parser.add_argument("--randaug", action="store_true",
                        help="the default augmentation (RandAugment, erasing); else crop + flip + normalise")
    parser.add_argument("--serial", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure reads on the pipeline's thread")
    args = parser.parse_args(argv)
    args.toy = False  # loader_config's dataset switch
    if args.make_images:
        make_images(args.data_path, args.make_images, width=256, height=256)
    torch.set_num_threads(1)  # the main process only copies batches; DALI's threads do the work
    modes = READ_MODES if args.serial else READ_MODES[:1]
    latencies = (0.0, args.latency_ms / 1000)
    rates: Dict[Tuple[str, float], List[float]] = {(m, s): [] for m in modes for s in latencies}
    print(f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}; DALI threads {args.threads}, "
          f"reader threads {dali_loader.READ_THREADS_PER_WORKER * args.threads}, batch {args.batch_size}, "
          f"{'RandAugment + erasing' if args.randaug else 'crop + flip + normalise'}")
    for trial in range(args.trials):
        for key in rates:
            rates[key].append(measure_contender(args, *key))
        print(f"trial {trial + 1}: " + ", ".join(f"{m} {s * 1000:g} ms {rates[m, s][-1]:.0f}" for m, s in rates),
              flush=True)
    print(f"\n| reads | images/s, no latency | images/s, {args.latency_ms:g} ms per file | ratio (trials) |")
    print("|---|---|---|---|")
    for mode in modes:
        base, slow = rates[mode, latencies[0]], rates[mode, latencies[1]]
        ratios = [s / b for b, s in zip(base, slow)]
        print(f"| {mode} | {statistics.median(base):.0f} | {statistics.median(slow):.0f} | "
              f"**{statistics.median(ratios):.2f}** ({', '.join(f'{r:.2f}' for r in ratios)}) |")
    if args.serial:
        ratios = [a / s for a, s in zip(rates[READ_MODES[0], 0.0], rates[READ_MODES[1], 0.0])]
        print(f"\nread ahead / serial, no latency: **{statistics.median(ratios):.2f}** "
              f"({', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
