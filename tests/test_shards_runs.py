"""Training from shards end to end: a kill -9 mid-epoch and the same command again, and two
processes under torchrun with each loader."""
from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from typing import List

import pytest
import torch

from data.make_shards import convert
from data.toy import ToySpec, ensure_toy_dataset
from tests.helpers import assert_same_training_state, last_json, main_command, run, run_dir, start, torchrun_command, write_tiny_yaml

pytestmark = pytest.mark.slow

LIMIT_S = 300


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run config and 120 train / 30 val toy JPEGs converted to shards of 25."""
    root = tmp_path_factory.mktemp("shard_runs")
    write_tiny_yaml(root)
    convert(ensure_toy_dataset(root / "toy", ToySpec(12, 3, 48)), root / "shards", samples_per_shard=25, workers=1)
    return root


def _args(root: Path, out: Path, loader: str = "pytorch", *extra: str) -> List[str]:
    return ["--cfg", str(root / "tiny.yaml"), "--data-path", str(root / "shards"), "--output", str(out), "--opts",
            "DATA.DATASET", "imagenet", "DATA.FORMAT", "shards", "DATA.LOADER", loader, "DATA.NUM_WORKERS", "1",
            "DATA.SHUFFLE_BUFFER", "16", "SAVE_STEPS", "4", "PRINT_FREQ", "1", *extra]


def test_kill_9_mid_epoch_then_the_same_command_ends_bitwise_equal(root: Path) -> None:
    """PyTorch loader on CPU: 15 steps per epoch, a checkpoint every 4; killed after step 6 of epoch 1."""
    reference = run(main_command(*_args(root, root / "reference")), root, timeout=LIMIT_S)
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = root / "killed"
    log = run_dir(out) / "log.txt"
    proc = start(main_command(*_args(root, out)), root)
    try:
        deadline = time.monotonic() + LIMIT_S
        while not (log.exists() and "train epoch 1/2 [6/15]" in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before step 6 of epoch 1"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    resumed = run(main_command(*_args(root, out)), root, timeout=LIMIT_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_at = re.search(r"resumed from \S+: epoch 1, batch (\d+)", log.read_text())
    assert resumed_at and 1 <= int(resumed_at.group(1)) < 15, log.read_text()[-3000:]  # mid-epoch
    assert_same_training_state(run_dir(root / "reference") / "last.pth", run_dir(out) / "last.pth")
    assert torch.load(run_dir(out) / "last.pth", weights_only=True)["global_step"] == 30


@pytest.mark.parametrize("loader", ["pytorch", "dali"])
def test_two_processes_train_from_shards_and_validate_every_image_once(root: Path, loader: str) -> None:
    out = root / f"torchrun_{loader}"
    result = run(torchrun_command(*_args(root, out, loader)), root, timeout=LIMIT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "120 images in 5 shards" in (run_dir(out) / "log.txt").read_text()
    evaluated = run(torchrun_command(*_args(root, out, loader), "--eval", "--resume",
                                     str(run_dir(out) / "last.pth")), root, timeout=LIMIT_S)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert last_json(evaluated.stdout)["val_count"] == 30  # every val image once across the two ranks
