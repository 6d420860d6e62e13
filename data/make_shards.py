"""Convert an image folder to tar shards: ``python -m data.make_shards --src FOLDER --dst SHARDS``.

    python -m data.make_shards --src /data/imagenet --dst /data/imagenet-shards [--samples-per-shard 1000]
        [--workers N]

For each split of ``FOLDER/{train,val}/<class>/<image>`` that exists, writes ``SHARDS/<split>/``:

* ``shard-NNNNNN.tar``: WebDataset-style tar files; each sample is a member ``KEY.<ext>`` holding
  the original file's bytes, then ``KEY.cls`` holding its label as decimal text. ``KEY`` is the
  path relative to the split without its extension, ``/``, ``.`` and white space replaced by ``_``
  (``n01440764/n01440764_10026.JPEG`` -> ``n01440764_n01440764_10026``).
* ``shard-NNNNNN.idx``: the shard's index in DALI's ``v1.2`` format, for ``fn.readers.webdataset``.
* ``shard-NNNNNN.json``: the shard's entry of the index and the files it left out (written last:
  the shard is complete when it exists).
* ``plan.json``: the settings and a digest of the planned file list, which a rerun must match.
* ``index.json``: :class:`data.shards.ShardIndex`, written when every shard is complete.

Training samples are ordered by a fixed permutation (seed 0) of the scanned list, so a shard holds
a mix of classes; validation keeps the scanned order (by class, then file). The ordered list is cut
into shards of ``--samples-per-shard`` planned samples. Every file is fully decoded with PIL and
its structure checked (``data.encoded``) on a pool of ``--workers`` processes, one shard per task;
a file failing either is left out of its shard, reported and listed in the index's ``skipped``.

The output is a function of the file list and the files' bytes (tar members carry no time, owner
or permissions of the source), every file appears atomically (temp file, fsync, rename), and a
rerun of the same command after an interruption converts only the shards not yet complete.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import re
import signal
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, TextIO, Tuple

import numpy as np
from PIL import Image

from utils.file_io import atomic_publish, atomic_write_text, remove_stale_temp_files

from .encoded import encoded_problem
from .folder import FolderSplit, scan_split
from .loader import failure_reason
from .shards import INDEX_NAME, ShardIndex, ShardInfo, shard_name
from .split import SPLITS

logger = logging.getLogger(__name__)

PLAN_NAME = "plan.json"
PLAN_FORMAT = "crossformer-shards-plan/1"
SIDECAR_FORMAT = "crossformer-shard/1"
DALI_INDEX_VERSION = "v1.2"
TRAIN_ORDER_SEED = 0
DEFAULT_SAMPLES_PER_SHARD = 1000
_KEY_UNSAFE = re.compile(r"[./\s]")  # WebDataset splits at the first dot; DALI's index splits at white space
_SHARD_FILE = re.compile(r"^shard-\d{6}\.(tar|idx|json)$")

Sample = Tuple[str, int]  # (path relative to the split directory, with "/", label)
Skipped = Tuple[str, str]  # (path relative to the split directory, reason)


def sample_key(relative: str) -> str:
    """A sample's key: its relative path without the extension, ``/``, ``.`` and white space made ``_``.

    Args:
        relative: The file's path relative to its split directory, e.g. ``n01440764/n01440764_10026.JPEG``.
    """
    return _KEY_UNSAFE.sub("_", os.path.splitext(relative)[0])


def sample_ext(relative: str) -> str:
    """The file's extension, lower-cased, without the dot (``JPEG`` -> ``jpeg``)."""
    return os.path.splitext(relative)[1][1:].lower()


def sidecar_name(number: int) -> str:
    """The file name of shard ``number``'s entry: ``shard-000012.json``."""
    return shard_name(number)[:-len(".tar")] + ".json"


def dali_index_name(number: int) -> str:
    """The file name of shard ``number``'s DALI index: ``shard-000012.idx``."""
    return shard_name(number)[:-len(".tar")] + ".idx"


def image_problem(data: bytes) -> Optional[str]:
    """Why the training loaders would not read an image file, or None when both would.

    Checks the structure DALI's decoders need (:func:`data.encoded.encoded_problem`), then decodes
    the whole image with PIL to RGB, as the PyTorch loader does (``data.split.load_rgb``).

    Args:
        data: The file's bytes.
    """
    problem = encoded_problem(np.frombuffer(data, np.uint8))
    if problem is not None:
        return problem
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image.convert("RGB")
    except Exception as e:  # noqa: BLE001 - whatever PIL raises, the file is left out with the reason
        return failure_reason(e)
    return None


@dataclass
class SplitPlan:
    """What a split's conversion will write, fixed before any file is read.

    Args:
        name: ``train`` or ``val``.
        source: The split directory of the image folder.
        classes: Class names (label = position).
        shards: Per shard, its planned samples in tar order.
        samples_per_shard: ``--samples-per-shard``.
        digest: SHA-256 of the settings, classes and ordered file list (a rerun must match it).
    """

    name: str
    source: Path
    classes: List[str]
    shards: List[List[Sample]]
    samples_per_shard: int
    digest: str

    @property
    def num_samples(self) -> int:
        return sum(len(shard) for shard in self.shards)

    def to_json(self) -> Dict[str, Any]:
        """The plain data of ``plan.json``."""
        return {"format": PLAN_FORMAT, "split": self.name, "samples_per_shard": self.samples_per_shard,
                "num_classes": len(self.classes), "num_samples": self.num_samples,
                "num_shards": len(self.shards), "train_order_seed": TRAIN_ORDER_SEED, "digest": self.digest}


def plan_split(split: FolderSplit, name: str, samples_per_shard: int) -> SplitPlan:
    """Order a scanned split's files and cut them into shards.

    Args:
        split: From :func:`data.folder.scan_split`.
        name: ``train`` (ordered by a fixed permutation, seed 0) or ``val`` (scanned order).
        samples_per_shard: Planned samples per shard (the last shard may hold fewer).

    Raises:
        ValueError: two files that would get the same key (naming both).
    """
    root = os.path.abspath(split.root)
    samples = [(os.path.relpath(path, root).replace(os.sep, "/"), label) for path, label in split.samples]
    seen: Dict[str, str] = {}
    for relative, _ in samples:
        key = sample_key(relative)
        if key in seen:
            raise ValueError(f"{root}/{seen[key]} and {root}/{relative} would both be stored as sample "
                             f"{key!r} (keys are the relative path without extension, with '/', '.' and "
                             "spaces made '_'); rename one of the files")
        seen[key] = relative
    if name == "train":
        random.Random(TRAIN_ORDER_SEED).shuffle(samples)  # a shard of one class defeats shuffle buffers
    digest = hashlib.sha256(json.dumps([PLAN_FORMAT, name, samples_per_shard, split.classes]).encode())
    for relative, label in samples:
        digest.update(f"{relative}\0{label}\n".encode("utf-8", "surrogateescape"))
    shards = [samples[start:start + samples_per_shard] for start in range(0, len(samples), samples_per_shard)]
    return SplitPlan(name=name, source=Path(root), classes=list(split.classes), shards=shards,
                     samples_per_shard=samples_per_shard, digest=digest.hexdigest())


@dataclass
class ShardTask:
    """One shard to write (what a worker process receives).

    Args:
        source: The split directory of the image folder.
        destination: The split directory of the shards.
        number: The shard's number.
        samples: Its planned samples, in tar order.
        plan_digest: :attr:`SplitPlan.digest`, recorded in the shard's entry.
    """

    source: str
    destination: str
    number: int
    samples: List[Sample]
    plan_digest: str


@dataclass
class ShardResult:
    """What writing a shard produced.

    Args:
        number: The shard's number.
        info: Its index entry, None when every planned file was left out (no tar is written then).
        skipped: The files left out.
    """

    number: int
    info: Optional[ShardInfo]
    skipped: List[Skipped]


class _EmptyShard(Exception):
    """Every planned file of a shard was left out: its temp tar is discarded."""


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append a member with fixed metadata; returns where its data starts in the tar."""
    member = tarfile.TarInfo(name)
    member.size, member.mtime, member.mode = len(data), 0, 0o644
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    tar.addfile(member, io.BytesIO(data))
    padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return tar.offset - padded  # the data, padded to whole blocks, ends where the tar now ends


def write_shard(task: ShardTask) -> ShardResult:
    """Check and write one shard: tar, then DALI index, then its entry (each atomically).

    Runs in a worker process; the result depends only on the task and the files' bytes.

    Args:
        task: What to write.
    """
    destination = Path(task.destination)
    keys: List[str] = []
    labels: List[int] = []
    exts: List[str] = []
    offsets: List[int] = []
    sizes: List[int] = []
    skipped: List[Skipped] = []
    lines: List[str] = []
    size = 0

    def write(tmp: str) -> None:
        nonlocal size
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for relative, label in task.samples:
                    try:
                        with open(os.path.join(task.source, relative), "rb") as image_file:
                            data = image_file.read()
                    except OSError as e:
                        skipped.append((relative, f"cannot read the file: {e.strerror or e}"))
                        continue
                    problem = image_problem(data)
                    if problem is not None:
                        skipped.append((relative, problem))
                        continue
                    key, ext, text = sample_key(relative), sample_ext(relative), str(label).encode()
                    offset = _add_member(tar, f"{key}.{ext}", data)
                    text_offset = _add_member(tar, f"{key}.cls", text)
                    keys.append(key)
                    labels.append(label)
                    exts.append(ext)
                    offsets.append(offset)
                    sizes.append(len(data))
                    lines.append(f"{ext} {offset} {len(data)} {key}.{ext} cls {text_offset} {len(text)} {key}.cls\n")
            if not keys:
                raise _EmptyShard
            size = f.tell()
            f.flush()
            os.fsync(f.fileno())

    info: Optional[ShardInfo] = None
    try:
        atomic_publish(str(destination / shard_name(task.number)), write)
        info = ShardInfo(file=shard_name(task.number), bytes=size, keys=keys, labels=labels, exts=exts,
                         offsets=offsets, sizes=sizes)
        dali_index = f"{DALI_INDEX_VERSION} {len(keys)}\n" + "".join(lines)
        atomic_write_text(dali_index, str(destination / dali_index_name(task.number)))
    except _EmptyShard:
        dali_index = ""
    sidecar = {"format": SIDECAR_FORMAT, "plan": task.plan_digest, "number": task.number,
               "shard": vars(info) if info else None, "idx_bytes": len(dali_index.encode()),
               "skipped": [list(entry) for entry in skipped]}
    atomic_write_text(json.dumps(sidecar), str(destination / sidecar_name(task.number)))
    return ShardResult(number=task.number, info=info, skipped=skipped)


def read_complete_shard(destination: Path, number: int, plan_digest: str) -> Optional[ShardResult]:
    """Shard ``number`` as a previous run left it, when complete for this plan; else None.

    Complete: its entry exists and names this plan, and (unless every file was left out) its tar has
    the recorded size and its DALI index the recorded size.

    Args:
        destination: The split directory of the shards.
        number: The shard's number.
        plan_digest: :attr:`SplitPlan.digest`.
    """
    try:
        sidecar = json.loads((destination / sidecar_name(number)).read_text(encoding="utf-8"))
        if sidecar.get("format") != SIDECAR_FORMAT or sidecar["plan"] != plan_digest or sidecar["number"] != number:
            return None
        info = ShardInfo(**sidecar["shard"]) if sidecar["shard"] is not None else None
        if info is not None and (os.path.getsize(destination / info.file) != info.bytes
                                 or os.path.getsize(destination / dali_index_name(number)) != sidecar["idx_bytes"]):
            return None
        return ShardResult(number=number, info=info, skipped=[tuple(entry) for entry in sidecar["skipped"]])
    except (OSError, ValueError, KeyError, TypeError):  # missing, partial or foreign: write the shard again
        return None


def _claim(destination: Path, plan: SplitPlan) -> None:
    """Record ``plan`` in ``destination/plan.json``, or check that it is the one already recorded.

    Raises:
        ValueError: the directory holds a conversion with other settings or another file list, or
            shard files without a plan.
    """
    path = destination / PLAN_NAME
    if not path.exists():
        foreign = sorted(name for name in os.listdir(destination) if _SHARD_FILE.match(name) or name == INDEX_NAME)
        if foreign:
            raise ValueError(f"{destination} holds {foreign[0]} but no {PLAN_NAME}: not a conversion this command "
                             "can resume; empty the directory or pass another --dst")
        atomic_write_text(json.dumps(plan.to_json()), str(path))
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} ({e}); delete {destination} and convert again") from e
    if recorded.get("format") != PLAN_FORMAT:
        raise ValueError(f"{path} has format {recorded.get('format')!r}, not {PLAN_FORMAT!r}; delete "
                         f"{destination} and convert again")
    if recorded.get("samples_per_shard") != plan.samples_per_shard:
        raise ValueError(f"--samples-per-shard {plan.samples_per_shard} but {destination} was converted with "
                         f"{recorded.get('samples_per_shard')}; pass --samples-per-shard "
                         f"{recorded.get('samples_per_shard')} to resume, or delete {destination} to start over")
    if recorded.get("digest") != plan.digest:
        raise ValueError(f"{plan.source} is not the file list {destination} was converted from "
                         f"({recorded.get('num_samples')} files in {recorded.get('num_classes')} classes then, "
                         f"{plan.num_samples} in {len(plan.classes)} now); delete {destination} to convert the "
                         "folder as it is now, or pass another --dst")


@dataclass
class Progress:
    """Where a split's conversion stands (handed to the progress callback after each shard).

    Args:
        split: ``train`` or ``val``.
        samples_done: Planned samples of the complete shards (including those a previous run wrote).
        samples_total: Planned samples of the split.
        shards_done: Complete shards.
        shards_total: Planned shards.
        samples_written: Planned samples of the shards written by this run.
        bytes_written: Bytes of the tars written by this run.
        seconds: Since this run started converting the split.
    """

    split: str
    samples_done: int
    samples_total: int
    shards_done: int
    shards_total: int
    samples_written: int
    bytes_written: int
    seconds: float


ProgressCallback = Callable[[Progress], None]


@dataclass
class SplitSummary:
    """A converted split.

    Args:
        split: ``train`` or ``val``.
        samples: Samples in the shards.
        skipped: Files left out.
        shards: Shards in the index.
        bytes: Their total size.
        seconds: Time this run spent on the split (scan excluded).
        resumed_shards: Shards a previous run had completed.
    """

    split: str
    samples: int
    skipped: int
    shards: int
    bytes: int
    seconds: float
    resumed_shards: int


def _init_worker() -> None:
    """Pool workers leave Ctrl-C to the parent, which terminates them (no traceback per worker), and
    never collect the objects they inherit: finalising a forked copy of a DALI pipeline waits forever
    for threads the child does not have (as in ``data/torch_loader.py``)."""
    gc.freeze()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def convert_split(plan: SplitPlan, destination: Path, pool: Optional[Any] = None,
                  on_progress: Optional[ProgressCallback] = None) -> SplitSummary:
    """Write ``plan``'s shards not yet complete in ``destination``, then its ``index.json``.

    Args:
        plan: From :func:`plan_split`.
        destination: The split directory of the shards (``SHARDS/<split>``).
        pool: A ``multiprocessing`` pool that writes the shards; None writes them in this process.
        on_progress: Called after each shard.

    Raises:
        ValueError: ``destination`` holds another conversion (see :func:`_claim`).
    """
    start = time.monotonic()
    destination.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(str(destination))
    _claim(destination, plan)
    results: Dict[int, ShardResult] = {}
    for number in range(len(plan.shards)):
        done = read_complete_shard(destination, number, plan.digest)
        if done is not None:
            results[number] = done
    resumed = len(results)
    tasks = [ShardTask(source=str(plan.source), destination=str(destination), number=number, samples=samples,
                       plan_digest=plan.digest)
             for number, samples in enumerate(plan.shards) if number not in results]
    if resumed:
        logger.info("%s: %d of %d shards already complete in %s; converting the other %d", plan.name, resumed,
                    len(plan.shards), destination, len(tasks))
    if tasks and (destination / INDEX_NAME).exists():
        os.remove(destination / INDEX_NAME)  # present means complete
    samples_done = sum(len(plan.shards[number]) for number in results)
    samples_written = bytes_written = 0
    written: Iterable[ShardResult] = (pool.imap_unordered(write_shard, tasks) if pool is not None
                                      else map(write_shard, tasks))
    for result in written:
        results[result.number] = result
        for relative, reason in result.skipped:
            logger.warning("%s: left out %s (%s)", plan.name, plan.source / relative, reason)
        samples_done += len(plan.shards[result.number])
        samples_written += len(plan.shards[result.number])
        bytes_written += result.info.bytes if result.info else 0
        if on_progress is not None:
            on_progress(Progress(split=plan.name, samples_done=samples_done, samples_total=plan.num_samples,
                                 shards_done=len(results), shards_total=len(plan.shards),
                                 samples_written=samples_written, bytes_written=bytes_written,
                                 seconds=time.monotonic() - start))
    ordered = [results[number] for number in range(len(plan.shards))]
    index = ShardIndex(split=plan.name, classes=plan.classes,
                       shards=[result.info for result in ordered if result.info is not None],
                       skipped=[entry for result in ordered for entry in result.skipped])
    text = json.dumps(index.to_json())
    index_path = destination / INDEX_NAME
    if not index_path.exists() or index_path.read_text(encoding="utf-8") != text:
        atomic_write_text(text, str(index_path))
    return SplitSummary(split=plan.name, samples=index.num_samples, skipped=len(index.skipped),
                        shards=len(index.shards), bytes=sum(shard.bytes for shard in index.shards),
                        seconds=time.monotonic() - start, resumed_shards=resumed)


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def plan_conversion(src: Path, dst: Path, samples_per_shard: int) -> List[SplitPlan]:
    """Check the arguments, scan ``src``'s splits and plan them (nothing is written).

    Args:
        src: The image folder (holding ``train/`` and/or ``val/``).
        dst: Where the shards go.
        samples_per_shard: Planned samples per shard.

    Raises:
        ValueError: one line naming the value, the rule and the fix.
    """
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard {samples_per_shard} is not a positive number of samples; "
                         f"pass e.g. {DEFAULT_SAMPLES_PER_SHARD}")
    src, dst = Path(os.path.abspath(src)), Path(os.path.abspath(dst))
    if not src.is_dir():
        raise ValueError(f"--src {src} is not a directory; pass the image folder holding train/ and val/")
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"--dst {dst} is a file; pass a directory (it is created if missing)")
    real_src, real_dst = src.resolve(), dst.resolve()
    if _inside(real_dst, real_src):
        raise ValueError(f"--dst {dst} is inside --src {src}; put the shards outside the image folder")
    names = [name for name in SPLITS if (src / name).is_dir()]
    if not names:
        raise ValueError(f"--src {src} has neither train/ nor val/; pass the image folder laid out as "
                         f"{src}/{{train,val}}/<class>/<image>")
    for name in names:
        if _inside(real_src, real_dst / name):
            raise ValueError(f"--src {src} is inside {dst / name}, where the {name} shards go; pass another --dst")
    splits = {name: scan_split(src / name) for name in names}
    if len(splits) == 2 and splits["train"].classes != splits["val"].classes:
        train, val = splits["train"].classes, splits["val"].classes
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise ValueError(f"class folders of {src / 'train'} and {src / 'val'} differ (only in train: {only_train[:5]}; "
                         f"only in val: {only_val[:5]}); both splits must have the same class folders")
    return [plan_split(split, name, samples_per_shard) for name, split in splits.items()]


def default_workers() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def convert(src: Path, dst: Path, samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, workers: Optional[int] = None,
            on_progress: Optional[ProgressCallback] = None) -> List[SplitSummary]:
    """Convert the image folder ``src`` to shards in ``dst`` (see the module docstring), resuming where
    a previous run of the same conversion stopped.

    Args:
        src: The image folder (holding ``train/`` and/or ``val/``).
        dst: Where the shards go (``dst/<split>/``).
        samples_per_shard: Planned samples per shard.
        workers: Processes that check and write shards; 1 works in this process; None: the CPU cores.
        on_progress: Called after each shard.

    Raises:
        ValueError: a bad argument or folder, or ``dst`` holding another conversion (one line each).
    """
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"--workers {workers} is not a positive number of processes; pass e.g. {default_workers()} "
                         "(the CPU cores) or leave it out")
    plans = plan_conversion(src, dst, samples_per_shard)
    dst = Path(os.path.abspath(dst))
    summaries = []
    if workers == 1:
        for plan in plans:
            summaries.append(convert_split(plan, dst / plan.name, None, on_progress))
        return summaries
    gc.collect()  # what is garbage now is not inherited by the workers
    with multiprocessing.Pool(workers, initializer=_init_worker) as pool:
        for plan in plans:
            summaries.append(convert_split(plan, dst / plan.name, pool, on_progress))
    return summaries


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:,.2f} GB" if num_bytes >= 1e9 else f"{num_bytes / 1e6:,.1f} MB"


class ProgressLine:
    """The conversion's progress on a stream: one line rewritten in place on a terminal, else a
    line every ``interval`` seconds.

    Args:
        stream: Where to write (stderr).
        interval: Seconds between lines when ``stream`` is no terminal.
    """

    def __init__(self, stream: TextIO, interval: float = 10.0) -> None:
        self.stream = stream
        self.interval = interval
        self.tty = stream.isatty()
        self.showing = False
        self.last = -float("inf")

    def __call__(self, progress: Progress) -> None:
        if not self.tty and time.monotonic() - self.last < self.interval:
            return
        self.last = time.monotonic()
        rate = progress.samples_written / max(progress.seconds, 1e-9)
        left = progress.samples_total - progress.samples_done
        eta = _duration(left / rate) if rate > 0 else "?"
        line = (f"{progress.split}: {progress.samples_done:,}/{progress.samples_total:,} samples, "
                f"shards {progress.shards_done}/{progress.shards_total}, {rate:,.0f} images/s, "
                f"{progress.bytes_written / 1e6 / max(progress.seconds, 1e-9):,.1f} MB/s, ETA {eta}")
        if self.tty:
            self.stream.write(f"\r\x1b[K{line}")
            self.showing = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """End the line being rewritten, so that other output starts on a line of its own."""
        if self.showing:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.showing = False


class _ConsoleHandler(logging.StreamHandler):
    """Log records on the progress line's stream, clearing the line first."""

    def __init__(self, progress: ProgressLine) -> None:
        super().__init__(progress.stream)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        self.progress.clear()
        super().emit(record)


def summary_line(summary: SplitSummary) -> str:
    """One line: what a split's conversion wrote.

    Args:
        summary: From :func:`convert_split`.
    """
    resumed = f" ({summary.resumed_shards} complete before this run)" if summary.resumed_shards else ""
    return (f"{summary.split}: {summary.samples:,} samples written, {summary.skipped:,} skipped, {summary.shards:,} "
            f"shards{resumed}, {_size(summary.bytes)}, {_duration(summary.seconds)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m data.make_shards``: returns the exit code (0 done, 1 bad input, 130 interrupted)."""
    parser = argparse.ArgumentParser(prog="python -m data.make_shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help="image folder holding train/ and/or val/")
    parser.add_argument("--dst", type=Path, required=True, help="output directory (gets train/ and val/)")
    parser.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD,
                        help=f"planned samples per shard (default {DEFAULT_SAMPLES_PER_SHARD})")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"processes decoding and writing shards (default: the CPU cores, {default_workers()})")
    args = parser.parse_args(argv)
    progress = ProgressLine(sys.stderr)
    handler = _ConsoleHandler(progress)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    start = time.monotonic()
    try:
        summaries = convert(args.src, args.dst, args.samples_per_shard, args.workers, progress)
    except ValueError as e:
        progress.clear()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        progress.clear()
        print(f"error: {e}; fix the cause and rerun the same command to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        progress.clear()
        print("interrupted: the shards written so far are complete; rerun the same command to resume",
              file=sys.stderr)
        return 130
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    progress.clear()
    for summary in summaries:
        print(summary_line(summary))
    total = SplitSummary(split="total", samples=sum(s.samples for s in summaries),
                         skipped=sum(s.skipped for s in summaries), shards=sum(s.shards for s in summaries),
                         bytes=sum(s.bytes for s in summaries), seconds=time.monotonic() - start,
                         resumed_shards=sum(s.resumed_shards for s in summaries))
    print(summary_line(total) + f" -> {os.path.abspath(args.dst)}")
    return 0


if __name__ == "__main__":
    from utils.process import exit_with

    exit_with(main())
