"""Train-loader images/s from tar shards vs from a folder, with and without a per-open read latency.

A network file system pays a round trip per file open. The latency model: a ``time.sleep`` of
``--latency-ms`` before every file open, that is before every image read from a folder
(``FolderSplit.read_encoded`` / ``load_rgb``) and before every shard opened by a reader
(``ShardSplit.open_shard``; each reader process keeps its shards open). Contenders: each loader
(``dali``, ``pytorch``) x each format (folder, shards) x (no latency, latency), alternated inside
every trial so that a slower spell of the machine hits all of them; the ratio latency / no
latency is taken per trial and its median reported.

Examples:
    python -m benchmarks.shards_vs_folder --make-images 2000 --data-path /tmp/bench_sv --shards /tmp/bench_sv_shards
    python -m benchmarks.shards_vs_folder --data-path /tmp/bench_sv --shards /tmp/bench_sv_shards --trials 5
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple
from unittest import mock

import torch

from benchmarks.data_throughput import loader_config, make_images, measure
from data import make_shards
from data.folder import FolderSplit
from data.shards import ShardSplit

FORMATS = ("folder", "shards")


@contextlib.contextmanager
def open_latency(seconds: float) -> Iterator[None]:
    """Make every file open of the loaders wait ``seconds`` first (0: no change).

    Args:
        seconds: Per-open latency.
    """
    if seconds <= 0:
        yield
        return

    def slowed(method):
        def wrapper(self, *args):
            time.sleep(seconds)
            return method(self, *args)
        return wrapper

    with contextlib.ExitStack() as stack:
        for cls, name in ((FolderSplit, "read_encoded"), (FolderSplit, "load_rgb"), (ShardSplit, "open_shard")):
            stack.enter_context(mock.patch.object(cls, name, slowed(getattr(cls, name))))
        yield


def measure_contender(args: argparse.Namespace, loader: str, data_format: str, latency: float) -> float:
    """Images/s of ``loader`` reading ``data_format`` with ``latency`` seconds per file open."""
    cfg = loader_config(args, loader, args.threads, args.randaug)
    cfg.DATA.FORMAT = data_format
    cfg.DATA.DATA_PATH = str(args.shards if data_format == "shards" else args.data_path)
    with open_latency(latency):
        return measure(cfg, args.batches)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", type=Path, required=True, help="folder with train/<class>/ and val/ images")
    parser.add_argument("--shards", type=Path, required=True, help="its shards (converted first when absent)")
    parser.add_argument("--make-images", type=int, default=0, help="first write this many 500x375 JPEGs to --data-path")
    parser.add_argument("--samples-per-shard", type=int, default=250)
    parser.add_argument("--latency-ms", type=float, default=2.0, help="artificial latency per file open")
    parser.add_argument("--loaders", nargs="+", default=["dali", "pytorch"], choices=["dali", "pytorch"])
    parser.add_argument("--threads", type=int, default=2, help="DATA.NUM_WORKERS")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per measurement")
    parser.add_argument("--trials", type=int, default=3, help="alternating trials (median reported)")
    parser.add_argument("--randaug", action="store_true",
                        help="the default augmentation (RandAugment, erasing); else crop + flip + normalise")
    args = parser.parse_args(argv)
    args.toy = False  # loader_config's dataset switch
    if args.make_images:
        make_images(args.data_path, args.make_images)
    if not (args.shards / "train" / "index.json").exists():
        start = time.perf_counter()
        if make_shards.main(["--src", str(args.data_path), "--dst", str(args.shards),
                             "--samples-per-shard", str(args.samples_per_shard)]) != 0:
            raise SystemExit("conversion failed")
        print(f"converted in {time.perf_counter() - start:.1f} s")
    torch.set_num_threads(1)  # the main process only copies batches
    latencies = (0.0, args.latency_ms / 1000)
    contenders = [(loader, data_format) for loader in args.loaders for data_format in FORMATS]
    speeds: Dict[Tuple[str, str, float], List[float]] = {}
    for trial in range(args.trials):
        for loader, data_format in contenders:
            for latency in latencies:
                speed = measure_contender(args, loader, data_format, latency)
                speeds.setdefault((loader, data_format, latency), []).append(speed)
                print(f"trial {trial}: {loader:7s} {data_format:6s} latency {latency * 1000:.0f} ms: {speed:7.1f} img/s",
                      flush=True)
    print(f"\nmedian of {args.trials} trials, {args.threads} workers, batch {args.batch_size}, {args.img_size} px, "
          f"{args.latency_ms:g} ms per file open:")
    print(f"{'loader':8s} {'format':7s} {'no latency':>11s} {'latency':>9s} {'kept':>6s}")
    for loader, data_format in contenders:
        base, slow = (speeds[(loader, data_format, latency)] for latency in latencies)
        kept = statistics.median(s / b for s, b in zip(slow, base))
        print(f"{loader:8s} {data_format:7s} {statistics.median(base):11.1f} {statistics.median(slow):9.1f} "
              f"{kept:6.0%}")


if __name__ == "__main__":
    main()
