"""Two processes under torchrun on CPU (gloo): train, validate, checkpoint, resume, evaluate.

One uninterrupted run is the reference; a run stopped mid-epoch and auto-resumed, and a run
resumed with ``--resume`` from an epoch checkpoint must end with bitwise identical weights,
EMA and optimizer state. Mixup, drop path and EMA are on, so every RNG stream matters.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

from tests.helpers import last_json, read_metrics, run, run_dir, torchrun_command, write_tiny_yaml

pytestmark = pytest.mark.slow

# 64 samples / 2 ranks / batch 8 = 4 steps per epoch, 2 epochs; a checkpoint every 3 steps.
COMMON = ["--opts", "SAVE_STEPS", "3", "SAVE_KEEP", "2"]


def _torchrun(args: List[str], cwd: Path) -> subprocess.CompletedProcess:
    result = run(torchrun_command(*args), cwd, timeout=300)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    cfg = write_tiny_yaml(root)
    base = ["--cfg", str(cfg)]
    _torchrun(base + ["--output", str(root / "a")] + COMMON, root)
    # Preempted after step 3 (mid-epoch 0, right after a SAVE_STEPS checkpoint), then auto-resumed.
    _torchrun(base + ["--output", str(root / "b")] + COMMON + ["TRAIN.STOP_AFTER_STEPS", "3"], root)
    _torchrun(base + ["--output", str(root / "b")] + COMMON, root)
    # An explicit --resume of the epoch-0 checkpoint into another run directory.
    run_a = run_dir(root / "a")
    _torchrun(base + ["--output", str(root / "c"), "--resume", str(run_a / "epoch_0000.pth")] + COMMON, root)
    return {"root": root, "cfg": cfg, "a": run_a, "b": run_dir(root / "b"), "c": run_dir(root / "c")}


def _assert_bitwise_equal(x: Any, y: Any, path: str) -> None:
    if isinstance(x, torch.Tensor):
        assert torch.equal(x, y), path
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), path
        for key in x:
            _assert_bitwise_equal(x[key], y[key], f"{path}.{key}")
    elif isinstance(x, (list, tuple)):
        for i, (u, v) in enumerate(zip(x, y)):
            _assert_bitwise_equal(u, v, f"{path}[{i}]")
    else:
        assert x == y, path


def test_run_directory_and_metrics(runs: Dict[str, Path]) -> None:
    run_a = runs["a"]
    names = {p.name for p in run_a.iterdir()}
    assert {"config.yaml", "log.txt", "metrics.jsonl", "tensorboard", "last.pth", "best.pth", "ema_best.pth",
            "epoch_0000.pth", "epoch_0001.pth"} <= names
    rows = read_metrics(run_a)
    assert [row["epoch"] for row in rows] == [0, 1]
    for row in rows:
        assert {"epoch", "train_loss", "val_acc1", "val_acc5", "val_loss", "lr", "train_imgs_per_sec",
                "ema_val_acc1"} <= set(row)
    last = torch.load(run_a / "last.pth", weights_only=True)
    assert (last["epoch"], last["batch"], last["epoch_complete"], last["global_step"], last["world_size"]) == (
        1, 4, True, 8, 2)
    assert len(last["ranks"]) == 2
    assert not torch.equal(last["ranks"][0]["rng"]["torch"], last["ranks"][1]["rng"]["torch"])
    log = (run_a / "log.txt").read_text()
    assert "grad_norm" in log and "img/s" in log and "eta" in log


def test_mid_epoch_auto_resume_is_bitwise_exact(runs: Dict[str, Path]) -> None:
    log = (runs["b"] / "log.txt").read_text()
    assert "stopping after global step 3" in log and "epoch 0, batch 3, global step 3" in log
    a = torch.load(runs["a"] / "last.pth", weights_only=True)
    b = torch.load(runs["b"] / "last.pth", weights_only=True)
    for key in ("model", "model_ema", "optimizer", "scheduler", "global_step", "best_acc1"):
        _assert_bitwise_equal(a[key], b[key], key)
    for row_a, row_b in zip(read_metrics(runs["a"]), read_metrics(runs["b"])):
        for key in ("train_loss", "val_acc1", "val_loss", "ema_val_acc1", "lr"):
            assert row_a[key] == row_b[key], key
    assert len(read_metrics(runs["b"])) == 2


def test_explicit_resume_continues_at_the_saved_epoch(runs: Dict[str, Path]) -> None:
    rows = read_metrics(runs["c"])
    assert [row["epoch"] for row in rows] == [1]
    a = torch.load(runs["a"] / "last.pth", weights_only=True)
    c = torch.load(runs["c"] / "last.pth", weights_only=True)
    for key in ("model", "model_ema", "optimizer"):
        _assert_bitwise_equal(a[key], c[key], key)


def test_eval_reproduces_the_logged_accuracy(runs: Dict[str, Path]) -> None:
    # Synthetic samples depend on (rank, batch), so evaluate with the same 2 processes.
    result = _torchrun(["--cfg", str(runs["cfg"]), "--eval", "--resume", str(runs["a"] / "epoch_0000.pth"),
                        "--output", str(runs["root"] / "eval")], runs["root"])
    report = last_json(result.stdout)
    logged = read_metrics(runs["a"])[0]
    assert report["val_count"] == 21  # 11 + 10 images: every one counted once, none padded
    for key in ("val_acc1", "val_acc5", "val_loss", "ema_val_acc1"):
        assert report[key] == logged[key], key


def test_compiled_ddp_model_trains_and_resumes_like_eager(runs: Dict[str, Path]) -> None:
    """TRAIN.COMPILE compiles the DDP-wrapped model (aot_eager here: graph capture, DDP's graph
    splitting at its buckets, eager kernels); stopped and resumed, it ends where eager ends."""
    root = runs["root"]
    compiled = COMMON + ["TRAIN.COMPILE", "True", "TRAIN.COMPILE_BACKEND", "aot_eager"]
    base = ["--cfg", str(runs["cfg"]), "--output", str(root / "d")]
    _torchrun(base + compiled + ["TRAIN.STOP_AFTER_STEPS", "3"], root)
    _torchrun(base + compiled, root)
    run_d = run_dir(root / "d")
    log = (run_d / "log.txt").read_text()
    assert "torch.compile (backend aot_eager) of the DDP-wrapped model" in log
    assert "resumed from" in log and "epoch 0, batch 3, global step 3" in log
    a = torch.load(runs["a"] / "last.pth", weights_only=True)
    d = torch.load(run_d / "last.pth", weights_only=True)
    assert (d["epoch"], d["batch"], d["global_step"]) == (a["epoch"], a["batch"], a["global_step"])
    for key in ("model", "model_ema"):
        for name, tensor in a[key].items():
            torch.testing.assert_close(d[key][name], tensor, rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")
    assert [row["epoch"] for row in read_metrics(run_d)] == [0, 1]
