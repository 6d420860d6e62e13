"""The folder-to-shards converter (``python -m data.make_shards``): round trip, order, determinism,
atomic resume, bad files, DALI's webdataset reader, argument errors."""
from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
from PIL import Image
from wds2idx import IndexCreator

from data import make_shards
from data.folder import scan_split
from data.make_shards import (Progress, ProgressLine, convert, dali_index_name, main, sample_key,
                              sidecar_name)
from data.shards import INDEX_NAME, ShardIndex, shard_name
from tests.helpers import subprocess_env

CLASSES = ["n001", "n002", "n003", "n004"]
TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 3
PER_SHARD = 8
# Relative paths under train/ of the files to be left out, with the start of the reason.
CORRUPT = {"n001/truncated.JPEG": "truncated JPEG", "n002/empty.jpg": "not a recognised image format, 0 bytes",
           "n003/text.jpg": "not a recognised image format"}


def make_folder(root: Path) -> Path:
    """An ImageFolder tree of 32x32 images: 4 classes, 10 train (JPEG, jpg, PNG, one in a nested
    folder) and 3 val images each, plus the :data:`CORRUPT` files in train."""
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for name in CLASSES:
            for n in range(count):
                path = root / split / name / (f"deep/{name}_{n}.JPEG" if n == 0 else
                                              f"{name}_{n}.{('JPEG', 'jpg', 'png')[n % 3]}")
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(path, "PNG" if path.suffix == ".png" else "JPEG")
    good = (root / "train" / "n001" / "n001_3.JPEG").read_bytes()
    (root / "train" / "n001" / "truncated.JPEG").write_bytes(good[:len(good) // 2])
    (root / "train" / "n002" / "empty.jpg").write_bytes(b"")
    (root / "train" / "n003" / "text.jpg").write_text("not an image\n")
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "folder")


def tree(root: Path) -> Dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def originals(split_dir: Path) -> Dict[str, Tuple[bytes, int]]:
    """Each readable image of a source split by its key: (bytes, label)."""
    split = scan_split(split_dir)
    result = {}
    for path, label in split.samples:
        relative = os.path.relpath(path, split_dir)
        if relative not in CORRUPT:
            result[sample_key(relative)] = (Path(path).read_bytes(), label)
    return result


def check_shards(split_dir: Path, expected: Dict[str, Tuple[bytes, int]], scratch: Path) -> List[str]:
    """Assert that the shards of ``split_dir`` hold ``expected`` (key -> original bytes, label):
    by ``os.pread`` at the index's byte ranges, as tar members with fixed metadata and ``.cls``
    labels, and with DALI index files equal to what DALI's own ``wds2idx`` makes of the tars.
    Returns the keys in shard order."""
    index = ShardIndex.load(split_dir)
    keys = []
    for number, shard in enumerate(index.shards):
        path = split_dir / shard.file
        assert shard.bytes == path.stat().st_size
        with open(path, "rb") as f:
            for key, label, ext, offset, size in zip(shard.keys, shard.labels, shard.exts, shard.offsets,
                                                     shard.sizes):
                data, source_label = expected[key]
                assert os.pread(f.fileno(), size, offset) == data and label == source_label
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            labels = [tar.extractfile(member).read() for member in members[1::2]]
        names = [f"{key}.{ext}" for key, ext in zip(shard.keys, shard.exts)]
        assert [member.name for member in members] == [name for image in names
                                                       for name in (image, image.rsplit(".", 1)[0] + ".cls")]
        assert [member.offset_data for member in members[::2]] == shard.offsets
        assert labels == [str(label).encode() for label in shard.labels]
        assert {(m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0o644, 0, 0, "", "")}
        reference = scratch / "reference.idx"
        with IndexCreator(str(path), str(reference), verbose=False) as creator:
            creator.create_index()
        assert (split_dir / dali_index_name(number)).read_bytes() == reference.read_bytes()
        keys += shard.keys
    assert sorted(keys) == sorted(expected)  # every readable file once
    return keys


def dali_read(split_dir: Path) -> List[Tuple[bytes, int]]:
    """(image bytes, label) of every sample of ``split_dir``'s shards, as DALI's webdataset reader
    returns them (CPU) from our tars and index files."""
    from nvidia.dali import fn, pipeline_def

    index = ShardIndex.load(split_dir)
    files = [shard.file for shard in index.shards]

    @pipeline_def(batch_size=index.num_samples, num_threads=1, device_id=None)
    def pipeline():
        images, labels = fn.readers.webdataset(
            paths=[str(split_dir / name) for name in files],
            index_paths=[str(split_dir / (name[:-len(".tar")] + ".idx")) for name in files],
            ext=["jpg;jpeg;png", "cls"], missing_component_behavior="error")
        return images, labels

    pipe = pipeline()
    pipe.build()
    images, labels = pipe.run()
    return [(images.at(i).tobytes(), int(labels.at(i).tobytes())) for i in range(len(images))]


def test_round_trip_bytes_labels_members_and_dali_index(folder: Path, tmp_path: Path) -> None:
    dst = tmp_path / "shards"
    summaries = convert(folder, dst, samples_per_shard=PER_SHARD, workers=2)
    assert [(s.split, s.samples, s.skipped) for s in summaries] == [("train", 40, 3), ("val", 12, 0)]
    for split in ("train", "val"):
        index = ShardIndex.load(dst / split)
        assert index.split == split and index.classes == CLASSES
        assert [shard.file for shard in index.shards] == [shard_name(n) for n in range({"train": 6, "val": 2}[split])]
        check_shards(dst / split, originals(folder / split), tmp_path)
    assert {ext for shard in ShardIndex.load(dst / "train").shards for ext in shard.exts} == {"jpeg", "jpg", "png"}
    skipped = ShardIndex.load(dst / "train").skipped
    assert sorted(path for path, _ in skipped) == sorted(CORRUPT)
    for path, reason in skipped:
        assert reason.startswith(CORRUPT[path]), (path, reason)


def test_long_and_non_ascii_names_round_trip(tmp_path: Path) -> None:
    """Such names get a PAX header before their member: offsets and DALI indexes still hold."""
    class_dir = tmp_path / "src" / "val" / "café"
    class_dir.mkdir(parents=True)
    for n, name in enumerate(["x" * 150 + ".png", "crème brûlée.jpg", "plain.JPEG"]):
        Image.new("RGB", (8, 8), (n, 0, 0)).save(class_dir / name, "PNG" if name.endswith("png") else "JPEG")
    convert(tmp_path / "src", tmp_path / "shards", workers=1)
    expected = originals(tmp_path / "src" / "val")
    assert "café_crème_brûlée" in expected
    keys = check_shards(tmp_path / "shards" / "val", expected, tmp_path)
    assert dali_read(tmp_path / "shards" / "val") == [expected[key] for key in keys]


def test_keys_are_the_relative_path_with_dots_and_slashes_made_underscores() -> None:
    assert sample_key("n01440764/n01440764_10026.JPEG") == "n01440764_n01440764_10026"
    assert sample_key("cls/deep/a.b c.png") == "cls_deep_a_b_c"


def test_train_order_is_a_seeded_permutation_and_val_keeps_the_scanned_order(folder: Path, tmp_path: Path) -> None:
    convert(folder, tmp_path / "shards", samples_per_shard=PER_SHARD, workers=1)
    for split in ("train", "val"):
        scanned = [os.path.relpath(path, folder / split) for path, _ in scan_split(folder / split).samples]
        if split == "train":
            random.Random(0).shuffle(scanned)
        expected = [sample_key(relative) for relative in scanned if relative not in CORRUPT]
        index = ShardIndex.load(tmp_path / "shards" / split)
        assert [key for shard in index.shards for key in shard.keys] == expected
        labels = [label for shard in index.shards for label in shard.labels]
        assert (labels == sorted(labels)) == (split == "val")
    train = ShardIndex.load(tmp_path / "shards" / "train")
    assert all(len(set(shard.labels)) > 1 for shard in train.shards)  # every training shard mixes classes


def test_output_is_deterministic_across_workers_and_source_location(folder: Path, tmp_path: Path) -> None:
    convert(folder, tmp_path / "a", samples_per_shard=PER_SHARD, workers=1)
    moved = folder.rename(tmp_path / "elsewhere")
    convert(moved, tmp_path / "b", samples_per_shard=PER_SHARD, workers=2)
    first, second = tree(tmp_path / "a"), tree(tmp_path / "b")
    assert first.keys() == second.keys() and first == second


def test_rerun_completes_what_an_interruption_left_and_keeps_complete_shards(folder: Path, tmp_path: Path) -> None:
    convert(folder, tmp_path / "clean", samples_per_shard=PER_SHARD, workers=1)
    dst = tmp_path / "resumed"
    convert(folder, dst, samples_per_shard=PER_SHARD, workers=1)
    train = dst / "train"
    kept = (train / shard_name(0)).stat()
    (train / sidecar_name(1)).unlink()  # killed before the entry: rewritten
    with open(train / shard_name(2), "r+b") as f:  # a tar of the wrong size: rewritten
        f.truncate(1024)
    (train / dali_index_name(3)).unlink()
    (train / INDEX_NAME).unlink()
    stale = train / f".{shard_name(4)}.tmp-999999"
    stale.write_bytes(b"partial")
    summaries = convert(folder, dst, samples_per_shard=PER_SHARD, workers=2)
    assert [s.resumed_shards for s in summaries] == [3, 2]  # train: shards 0, 4, 5; val: both
    assert tree(dst) == tree(tmp_path / "clean")
    assert not stale.exists()
    after = (train / shard_name(0)).stat()
    assert (after.st_ino, after.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)


def test_kill_9_midway_then_rerun_gives_the_uninterrupted_result(folder: Path, tmp_path: Path) -> None:
    convert(folder, tmp_path / "clean", samples_per_shard=PER_SHARD, workers=1)
    dst = tmp_path / "killed"
    # Each tar member takes 50 ms, so the process is killed in the middle of writing shard 2.
    code = ("import sys, time\n"
            "from data import make_shards\n"
            "add = make_shards._add_member\n"
            "make_shards._add_member = lambda *args: (time.sleep(0.05), add(*args))[1]\n"
            "sys.exit(make_shards.main(sys.argv[1:]))\n")
    process = subprocess.Popen([sys.executable, "-c", code, "--src", str(folder), "--dst", str(dst),
                                "--samples-per-shard", str(PER_SHARD), "--workers", "1"],
                               env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    partial: List[Path] = []
    while not partial and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
        partial = list((dst / "train").glob(f".{shard_name(2)}.tmp-*")) if (dst / "train").is_dir() else []
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert partial, "the converter ended before writing shard 2"
    train = dst / "train"
    assert (train / sidecar_name(1)).exists() and not (train / shard_name(2)).exists()
    assert not (train / INDEX_NAME).exists()
    assert main(["--src", str(folder), "--dst", str(dst), "--samples-per-shard", str(PER_SHARD),
                 "--workers", "1"]) == 0
    assert tree(dst) == tree(tmp_path / "clean")


def test_ctrl_c_returns_130_and_a_rerun_resumes(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture, restore_logging: None) -> None:
    convert(folder, tmp_path / "clean", samples_per_shard=PER_SHARD, workers=1)
    write, interrupt_at = make_shards.write_shard, [2]

    def interrupted(task):  # Ctrl-C when a given shard is started
        if task.number == interrupt_at[0]:
            raise KeyboardInterrupt
        return write(task)

    monkeypatch.setattr(make_shards, "write_shard", interrupted)
    argv = ["--src", str(folder), "--dst", str(tmp_path / "out"), "--samples-per-shard", str(PER_SHARD),
            "--workers", "1"]
    assert main(argv) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert not (tmp_path / "out" / "train" / INDEX_NAME).exists()
    monkeypatch.setattr(make_shards, "write_shard", write)
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("train: 40 samples written, 3 skipped, 6 shards (2 complete before this run)")
    assert out[-1].startswith("total: 52 samples written, 3 skipped, 8 shards")
    assert tree(tmp_path / "out") == tree(tmp_path / "clean")
    # Interrupted again after a shard went missing: the index of the complete output goes too.
    (tmp_path / "out" / "train" / sidecar_name(4)).unlink()
    interrupt_at[0] = 4
    monkeypatch.setattr(make_shards, "write_shard", interrupted)
    assert main(argv) == 130
    assert not (tmp_path / "out" / "train" / INDEX_NAME).exists()
    monkeypatch.setattr(make_shards, "write_shard", write)
    assert main(argv) == 0
    assert tree(tmp_path / "out") == tree(tmp_path / "clean")


def test_a_rerun_with_other_settings_or_files_is_refused(folder: Path, tmp_path: Path) -> None:
    dst = tmp_path / "shards"
    convert(folder, dst, samples_per_shard=PER_SHARD, workers=1)
    with pytest.raises(ValueError, match="--samples-per-shard 5 but .* was converted with 8"):
        convert(folder, dst, samples_per_shard=5, workers=1)
    (folder / "train" / "n004" / "new.jpg").write_bytes((folder / "train" / "n004" / "n004_1.jpg").read_bytes())
    with pytest.raises(ValueError, match=r"not the file list .* \(43 files in 4 classes then, 44 in 4 now\)"):
        convert(folder, dst, samples_per_shard=PER_SHARD, workers=1)
    foreign = tmp_path / "foreign"
    (foreign / "val").mkdir(parents=True)
    (foreign / "val" / shard_name(0)).write_bytes(b"")
    with pytest.raises(ValueError, match="holds shard-000000.tar but no plan.json"):
        convert(folder, foreign, samples_per_shard=PER_SHARD, workers=1)


def test_a_shard_of_only_bad_files_is_left_out_of_the_index(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / "src" / "val" / name).mkdir(parents=True)
    for n in range(2):
        Image.new("RGB", (8, 8), (n, 0, 0)).save(tmp_path / "src" / "val" / "a" / f"{n}.png")
        (tmp_path / "src" / "val" / "b" / f"{n}.jpg").write_bytes(b"\xff\xd8\xff")
    dst = tmp_path / "shards"
    for _ in range(2):  # the rerun finds both shards complete
        (summary,) = convert(tmp_path / "src", dst, samples_per_shard=2, workers=1)
    assert (summary.samples, summary.skipped, summary.shards, summary.resumed_shards) == (2, 2, 1, 2)
    index = ShardIndex.load(dst / "val")
    assert [shard.file for shard in index.shards] == [shard_name(0)] and index.classes == ["a", "b"]
    assert [path for path, _ in index.skipped] == ["b/0.jpg", "b/1.jpg"]
    assert (dst / "val" / sidecar_name(1)).exists() and not (dst / "val" / shard_name(1)).exists()


def test_key_collisions_are_refused(tmp_path: Path) -> None:
    class_dir = tmp_path / "src" / "train" / "a"
    class_dir.mkdir(parents=True)
    for name in ("x.y.jpg", "x_y.png"):
        Image.new("RGB", (8, 8)).save(class_dir / name, "PNG")
    with pytest.raises(ValueError, match=r"a/x.y.jpg and .*a/x_y.png would both be stored as sample 'a_x_y'"):
        convert(tmp_path / "src", tmp_path / "shards", workers=1)
    assert not (tmp_path / "shards").exists()  # checked before anything is written


def test_dali_webdataset_reader_reads_the_shards_with_our_index_files(folder: Path, tmp_path: Path) -> None:
    dst = tmp_path / "shards"
    convert(folder, dst, samples_per_shard=PER_SHARD, workers=1)
    expected = originals(folder / "train")
    keys = [key for shard in ShardIndex.load(dst / "train").shards for key in shard.keys]
    assert len(keys) == len(expected) == 40
    assert dali_read(dst / "train") == [expected[key] for key in keys]


@pytest.mark.parametrize("case", ["no src", "src missing", "no splits", "samples per shard", "workers",
                                  "dst inside src", "dst a file", "classes differ"])
def test_bad_arguments_are_one_line_errors(case: str, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                           restore_logging: None) -> None:
    src, dst, extra = folder, tmp_path / "shards", []
    expected = {"src missing": "is not a directory", "no splits": "has neither train/ nor val/",
                "samples per shard": "--samples-per-shard 0 is not a positive number",
                "workers": "--workers 0 is not a positive number", "dst inside src": "is inside --src",
                "dst a file": "is a file", "classes differ": "only in train: ['n004']; only in val: []"}
    if case == "no src":
        with pytest.raises(SystemExit) as exit_info:
            main(["--dst", str(dst)])
        assert exit_info.value.code == 2 and "--src" in capsys.readouterr().err
        return
    if case == "src missing":
        src = tmp_path / "missing"
    elif case == "no splits":
        src = folder / "train"
    elif case == "samples per shard":
        extra = ["--samples-per-shard", "0"]
    elif case == "workers":
        extra = ["--workers", "0"]
    elif case == "dst inside src":
        dst = folder / "train" / "shards"
    elif case == "dst a file":
        dst = tmp_path / "file"
        dst.write_text("")
    elif case == "classes differ":
        (folder / "val" / "n004").rename(tmp_path / "moved")
    assert main(["--src", str(src), "--dst", str(dst), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()  # the scan's log lines, then the error
    errors = [line for line in err if line.startswith("error: ")]
    assert errors == err[-1:] and expected[case] in errors[0], err


def test_progress_is_one_rewritten_line_on_a_terminal_else_a_line_per_interval() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    state = Progress(split="train", samples_done=500, samples_total=2000, shards_done=1, shards_total=4,
                     samples_written=500, bytes_written=50_000_000, seconds=5.0)
    terminal = Terminal()
    line = ProgressLine(terminal)
    line(state)
    line(state)
    expected = "train: 500/2,000 samples, shards 1/4, 100 images/s, 10.0 MB/s, ETA 0:00:15"
    assert terminal.getvalue() == f"\r\x1b[K{expected}" * 2
    line.clear()  # before a log line or the summary
    assert terminal.getvalue().endswith("\r\x1b[K") and not line.showing
    log = io.StringIO()
    line = ProgressLine(log, interval=3600)
    line(state)
    line(state)  # within the interval: nothing
    assert log.getvalue() == expected + "\n"
