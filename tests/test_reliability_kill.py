"""``kill -9`` at random moments, 20 times in one run directory: every restart resumes.

A helper process imports ``main`` once, then forks one training process per trial (so a trial
costs its training time, not Python's start-up) and SIGKILLs it at a random moment. Every fourth
trial is killed during start-up; the others once training has begun (the log's "training epochs"
line, printed after the resume), within two steps' time, so the kill lands in a step or in the
write of a checkpoint (``SAVE_STEPS 1``: one after every step). Both windows are measured on an
uninterrupted reference run first, so a slow machine tests the same moments as a fast one. After
every kill, every checkpoint file in the run directory must load completely, and the next trial
must resume from the newest of them. A last trial runs to the end; its weights, EMA and optimizer
state must equal the reference run's bitwise.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import MODEL_DIR, REPO_ROOT, last_json, run, write_tiny_yaml

pytestmark = pytest.mark.slow

TRIALS = 20

_HELPER = r"""
import json, os, random, signal, sys, time
import torch
sys.path.insert(0, sys.argv[1])
import main  # imported once; every trial is a fork
import training.trainer  # what main imports after parsing: loaded once too

cfg, root, trials = sys.argv[2], sys.argv[3], int(sys.argv[4])
opts = ["--opts", "SAVE_STEPS", "1", "TRAIN.EPOCHS", "3", "PRINT_FREQ", "4"]

def start(out, log):
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os._exit(main.main(["--cfg", cfg, "--output", out] + opts))
    return pid

def wait_for_training(pid, log):  # seconds until the log says training began; None if it ended first
    began = time.perf_counter()
    while True:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return None
        if os.path.exists(log) and "training epochs" in open(log, errors="replace").read():
            return time.perf_counter() - began
        time.sleep(0.005)

def newest_complete(run_dir):
    best = -1
    if not os.path.isdir(run_dir):
        return best
    for name in os.listdir(run_dir):
        if name.endswith(".pth") and not name.startswith("."):
            ckpt = torch.load(os.path.join(run_dir, name), weights_only=True)  # raises if incomplete
            best = max(best, ckpt["global_step"])
    return best

began = time.perf_counter()
reference_log = os.path.join(root, "reference.log")
pid = start(os.path.join(root, "reference"), reference_log)
startup = wait_for_training(pid, reference_log)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0 and startup, "reference run failed"
step_time = (time.perf_counter() - began - startup) / 24  # 3 epochs of 8 steps
out = os.path.join(root, "killed")
run_dir = os.path.join(out, "crossformerpp_s", "default")
rng = random.Random(6)
trials_out = []
for trial in range(trials):
    expected = newest_complete(run_dir)
    log = os.path.join(root, f"trial{trial}.log")
    pid = start(out, log)
    if trial % 4 == 0:
        time.sleep(rng.uniform(0.0, startup))
    elif wait_for_training(pid, log) is not None:
        time.sleep(rng.uniform(0.0, 2 * step_time))
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    trials_out.append({"log": log, "expected": expected, "status": os.waitstatus_to_exitcode(status)})
expected = newest_complete(run_dir)
_, status = os.waitpid(start(out, os.path.join(root, "final.log")), 0)
print(json.dumps({"trials": trials_out, "final_expected": expected, "final": os.waitstatus_to_exitcode(status),
                  "startup_s": startup, "step_s": step_time}))
"""

_RESUMED = re.compile(r"resumed from \S+: (?:after epoch \d+|epoch \d+, batch \d+), global step (\d+)")


def test_kill_9_at_random_moments_always_resumes(tmp_path: Path) -> None:
    cfg = write_tiny_yaml(tmp_path)
    result = run([sys.executable, "-c", _HELPER, str(REPO_ROOT), str(cfg), str(tmp_path), str(TRIALS)], tmp_path,
                 timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    report = last_json(result.stdout)
    resumed_steps = []
    for trial in report["trials"] + [{"log": str(tmp_path / "final.log"), "expected": report["final_expected"],
                                      "status": report["final"]}]:
        log = Path(trial["log"])
        text = log.read_text(errors="replace") if log.exists() else ""  # killed right after the fork
        assert "Traceback" not in text and "error (rank" not in text, text[-2000:]
        match = _RESUMED.search(text)
        if match:  # it got as far as resuming: from the newest complete checkpoint
            assert int(match.group(1)) == trial["expected"], (trial, match.group(0))
            resumed_steps.append(int(match.group(1)))
        else:  # killed before, or nothing to resume yet
            assert trial["expected"] == -1 or "resumed from" not in text
    assert report["final"] == 0
    assert len(resumed_steps) >= TRIALS // 2 + 1 and resumed_steps == sorted(resumed_steps)
    run_dir = tmp_path / "killed" / MODEL_DIR / "default"
    assert not [p.name for p in run_dir.iterdir() if ".tmp-" in p.name]  # killed writers' leftovers removed
    a = torch.load(tmp_path / "reference" / MODEL_DIR / "default" / "last.pth", weights_only=True)
    b = torch.load(run_dir / "last.pth", weights_only=True)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (2, 24)  # after epoch 2
    for key in ("model", "model_ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"
    for index, state in a["optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, b["optimizer"]["state"][index][name]), name
