"""Commands start light and read-only commands stay quiet: ``--help`` (and a mistyped flag) of
``main.py`` and ``python -m predict`` import neither torch, timm nor DALI, and ``--eval`` and
``predict`` log nothing about the LR scaling or the optimizer they do not step."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List

import pytest
from PIL import Image

from config import load_config
from tests.helpers import REPO_ROOT, TinyRun, last_json, run, run_dir, run_main

# What a command that only parses its command line must not import (nvidia: DALI).
HEAVY = ("torch", "timm", "torchvision", "nvidia", "tensorboard")

# Runs a command as `python main.py ARGS` / `python -m predict ARGS` would, then prints which of HEAVY it imported.
_PROBE = """
import json, runpy, sys
entry, args = sys.argv[1], sys.argv[2:]
sys.argv = [entry, *args]
try:
    if entry.endswith(".py"):
        runpy.run_path(entry, run_name="__main__")
    else:
        runpy.run_module(entry, run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as e:
    code = e.code
print(json.dumps({"exit": code, "imported": sorted({name.split(".")[0] for name in sys.modules} & set(HEAVY))}))
"""

# Lines that concern training only: the LR scaling and its warnings, the optimizer's parameter groups.
TRAINING_ONLY = ("TRAIN.SCALED_", "LR entered", "scaled: base", "tensors with weight decay", "accumulation steps")


def _probe(entry: str, *args: str) -> dict:
    command = [sys.executable, "-c", f"HEAVY = {list(HEAVY)!r}\n{_PROBE}", entry, *args]
    result = run(command, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return {**last_json(result.stdout), "out": result.stdout, "err": result.stderr}


@pytest.mark.parametrize("entry", [str(REPO_ROOT / "main.py"), "predict"], ids=["main.py", "predict"])
def test_help_and_a_mistyped_flag_import_no_heavy_library(entry: str) -> None:
    shown = _probe(entry, "--help")
    assert shown["exit"] == 0 and "usage:" in shown["out"] and "--cfg" in shown["out"]
    assert shown["imported"] == [], shown["imported"]
    mistyped = _probe(entry, "--cfg", "x.yaml", "--pretrained", "x.pth", "--no-such-flag", "x.jpg")
    assert mistyped["exit"] == 2 and "unrecognized arguments: --no-such-flag" in mistyped["err"]
    assert mistyped["imported"] == [], mistyped["imported"]


def test_the_probe_sees_an_import() -> None:
    """The check above can fail: importing the trainer shows up as torch and timm."""
    command = [sys.executable, "-c", f"HEAVY = {list(HEAVY)!r}\nimport training.trainer\n{_PROBE}",
               str(REPO_ROOT / "main.py"), "--help"]
    result = run(command, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {"torch", "timm"} <= set(last_json(result.stdout)["imported"])


def _training_only_lines(text: str) -> List[str]:
    return [line for line in text.splitlines() if any(needle in line for needle in TRAINING_ONLY)]


def test_eval_and_predict_log_no_lr_scaling_or_optimizer_lines(tiny_run: TinyRun, tmp_path: Path) -> None:
    """A batch size other than the run's makes the scaled LRs of its config.yaml differ from a new
    scaling: training says so, ``--eval`` and ``predict`` (which never step) do not."""
    assert _training_only_lines(tiny_run.stdout)  # training logs them: the needles are the right ones
    config_yaml, last = tiny_run.run_dir / "config.yaml", tiny_run.run_dir / "last.pth"
    out = tmp_path / "eval"
    evaluated = run_main("--cfg", str(config_yaml), "--eval", "--resume", str(last), "--batch-size", "4",
                         "--output", str(out), cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    log = (run_dir(out) / "log.txt").read_text()
    printed = evaluated.stdout + evaluated.stderr
    assert "batch 4 per process" in printed and "eval of the weights of" in printed
    assert _training_only_lines(printed + log) == []

    images = tmp_path / "images"
    images.mkdir()
    for value in (10, 200):
        Image.new("RGB", (40, 40), (value, 255 - value, value // 2)).save(images / f"{value}.jpg")
    predicted = run([sys.executable, "-m", "predict", "--cfg", str(config_yaml), "--opts", "DATA.BATCH_SIZE", "4",
                     "--pretrained", str(last), "--device", "cpu", "--workers", "0", "--", str(images)], cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert len(predicted.stdout.strip().splitlines()) == 3  # the header and two images
    assert "2 images, 0 could not be read" in predicted.stderr
    assert _training_only_lines(predicted.stderr) == []


def test_a_changed_total_batch_warns_only_a_run_that_trains(caplog: pytest.LogCaptureFixture) -> None:
    """The scaled LRs stored in a run's config.yaml differ from a new scaling at another total batch:
    training is told which value it uses; --eval, --throughput and predict's config are not."""
    stored = ["TRAIN.SCALED_BASE_LR", "1.0", "DATA.BATCH_SIZE", "64"]
    for flags, warned in (({}, True), ({"EVAL_MODE": True}, False), ({"THROUGHPUT_MODE": True}, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="config"):
            config = load_config(opts=stored, flags=flags)
        assert config.TRAIN.SCALED_BASE_LR == pytest.approx(5e-4 * 64 / 512)
        assert any("TRAIN.SCALED_BASE_LR=1 is derived" in r.getMessage() for r in caplog.records) is warned, flags
