"""Faults across two CPU processes (gloo): preemption, a killed rank under torchrun, a hung rank,
and resuming with another world size.

One uninterrupted ``torchrun`` run is the reference; a run stopped by SIGUSR1 on one rank and
restarted, and a run whose rank 1 is killed with SIGKILL under ``--max-restarts``, must end with
weights, EMA and optimizer state bitwise equal to it.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

from tests.helpers import (assert_same_training_state, free_port, launch_sh_command, main_command, run, run_dir, run_main, start,
                           subprocess_env, torchrun_command, write_tiny_yaml)

pytestmark = pytest.mark.slow

# 128 samples / 2 ranks / batch 8 = 8 steps per epoch, 2 epochs; a checkpoint every 3 steps.
COMMON = ["--opts", "DATA.SYNTHETIC_TRAIN_SIZE", "128", "SAVE_STEPS", "3", "PRINT_FREQ", "1"]
LIMIT_S = 300


def _torchrun_cmd(cfg: Path, out: Path, *extra: str) -> List[str]:
    return torchrun_command("--cfg", str(cfg), "--output", str(out), *COMMON, torchrun_args=extra)


def _wait_for(path: Path, text: str, proc: subprocess.Popen) -> None:
    """Poll ``path`` until it contains ``text`` (fails if ``proc`` ends first)."""
    deadline = time.monotonic() + LIMIT_S
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        assert proc.poll() is None, f"ended with {proc.returncode} before {text!r} appeared in {path}"
        time.sleep(0.02)
    raise AssertionError(f"{text!r} never appeared in {path}")


def _worker_pid(parent: int, rank: int) -> int:
    """The pid of the torchrun worker of ``rank`` (a direct child of the torchrun process)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(entry)
    raise AssertionError(f"no worker of rank {rank} under pid {parent}")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reliability_dist")
    write_tiny_yaml(root)
    return root


@pytest.fixture(scope="module")
def reference(root: Path) -> Path:
    out = root / "reference"
    result = run(_torchrun_cmd(root / "tiny.yaml", out), root, timeout=LIMIT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir(out) / "last.pth"


@pytest.fixture(scope="module")
def preempted(root: Path) -> Dict[str, Path]:
    """A run whose rank 1 gets SIGUSR1 after its first step; returns its directory and a copy of last.pth."""
    out = root / "preempted"
    log = run_dir(out) / "log.txt"
    proc = start(_torchrun_cmd(root / "tiny.yaml", out), root)
    try:
        _wait_for(log, "train epoch 0/2 [1/8]", proc)
        os.kill(_worker_pid(proc.pid, 1), signal.SIGUSR1)  # one rank only: the others must follow
        output, _ = proc.communicate(timeout=LIMIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "exitcode  : 75" in output, output[-3000:]
    copy = root / "preempted_last.pth"
    shutil.copy(run_dir(out) / "last.pth", copy)
    return {"out": out, "log": log, "last_copy": copy}


def test_signal_on_one_rank_stops_all_then_resume_is_bitwise_exact(root: Path, reference: Path,
                                                                   preempted: Dict[str, Path]) -> None:
    stopped = torch.load(preempted["last_copy"], weights_only=True)
    assert 1 <= stopped["global_step"] < 16 and stopped["world_size"] == 2
    log = preempted["log"].read_text()
    assert "preempted: last.pth holds" in log and "exit code 75" in log
    result = run(_torchrun_cmd(root / "tiny.yaml", preempted["out"]), root, timeout=LIMIT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"global step {stopped['global_step']}" in preempted["log"].read_text().split("preempted:")[-1]
    assert_same_training_state(reference, run_dir(preempted["out"]) / "last.pth")


def test_a_killed_rank_comes_back_under_max_restarts_and_resumes(root: Path, reference: Path) -> None:
    out = root / "killed"
    log = run_dir(out) / "log.txt"
    proc = start(_torchrun_cmd(root / "tiny.yaml", out, "--max-restarts=1"), root)
    try:
        _wait_for(log, "saved last.pth (epoch 0, batch 3, step 3)", proc)
        os.kill(_worker_pid(proc.pid, 1), signal.SIGKILL)
        output, _ = proc.communicate(timeout=LIMIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert "auto-resume" in log.read_text() or "resumed from" in log.read_text()
    assert_same_training_state(reference, run_dir(out) / "last.pth")


def test_a_hung_rank_makes_the_others_exit_after_the_timeout(root: Path) -> None:
    out = root / "hung"
    env = subprocess_env()
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    cmd = main_command("--cfg", str(root / "tiny.yaml"), "--output", str(out), *COMMON, "DIST.TIMEOUT_S", "5",
                       "TRAIN.EPOCHS", "50")
    procs: List[Optional[subprocess.Popen]] = []
    try:
        for rank in range(2):
            procs.append(subprocess.Popen(cmd, cwd=root, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        _wait_for(run_dir(out) / "log.txt", "train epoch 0/50 [2/8]", procs[0])
        os.kill(procs[1].pid, signal.SIGSTOP)  # alive but stuck: nothing closes its sockets
        _, err = procs[0].communicate(timeout=LIMIT_S)  # bounded by DIST.TIMEOUT_S, not by this limit
    finally:
        for proc in procs:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert procs[0].returncode == 1
    lines = [line for line in err.splitlines() if line.startswith("error (rank 0)")]
    assert len(lines) == 1 and "rank 1 did not answer afterwards: lost" in lines[0] and "DIST.TIMEOUT_S" in lines[0], \
        err[-2000:]


def test_resume_with_another_world_size_logs_the_global_batch_change(
        root: Path, preempted: Dict[str, Path]) -> None:
    out = root / "one_process"
    result = run_main("--cfg", str(root / "tiny.yaml"), "--output", str(out), "--resume", str(preempted["last_copy"]),
                      *COMMON, cwd=root, timeout=LIMIT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    stopped = torch.load(preempted["last_copy"], weights_only=True)
    log = (run_dir(out) / "log.txt").read_text()
    assert "total batch of 16 (2 processes x 8 x 1 accumulation), this run has 8 (1 x 8 x 1)" in log
    assert "optimizer steps per epoch ~8 -> 16" in log
    assert f"batch {2 * stopped['batch']} (was {stopped['batch']}), global step {2 * stopped['global_step']}" in log
    final = torch.load(run_dir(out) / "last.pth", weights_only=True)
    assert (final["epoch"], final["batch"], final["epoch_complete"], final["global_step"], final["world_size"]) == (
        1, 16, True, 32, 1)


def _interrupt_like_a_terminal(command: List[str], cwd: Path, log: Path) -> subprocess.CompletedProcess:
    """Start ``command`` in its own process group, and after its first logged step send SIGINT to
    the whole group, as a terminal's Ctrl-C does (the launcher and every worker receive it)."""
    proc = subprocess.Popen(command, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _wait_for(log, "train epoch 0/2 [1/", proc)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=LIMIT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _ours(stderr: str) -> List[str]:
    """The stderr lines our code writes (the launcher's and torch's own warnings left out)."""
    return [line for line in stderr.splitlines() if line.startswith(("interrupt:", "aborted", "error", "stopped"))]


def test_ctrl_c_stops_every_rank_at_one_step_and_resumes_bitwise(root: Path, reference: Path) -> None:
    """Ctrl-C to a 2-process launch.sh (torchrun through utils/launch.py): one line of ours, no
    traceback, exit 130; the ranks agree on the step and write last.pth; the same command then ends
    bitwise equal to an uninterrupted run."""
    out = root / "interrupted"
    command = launch_sh_command("--cfg", str(root / "tiny.yaml"), "--output", str(out), *COMMON)
    result = _interrupt_like_a_terminal(command, root, run_dir(out) / "log.txt")
    assert result.returncode == 130, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Exception" not in result.stderr, result.stderr[-3000:]
    assert _ours(result.stderr) == ["interrupt: stopping after the current step and saving last.pth; the same "
                                    "command resumes there (Ctrl-C again to abort now, without saving)"], result.stderr
    stopped = torch.load(run_dir(out) / "last.pth", weights_only=True)
    log = (run_dir(out) / "log.txt").read_text()
    assert f"interrupted: last.pth holds epoch 0, batch {stopped['batch']}, global step {stopped['global_step']}" \
        in log and "(exit code 130)" in log
    assert 1 <= stopped["global_step"] < 16
    resumed = run(command, root, timeout=LIMIT_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_training_state(reference, run_dir(out) / "last.pth")


def test_a_bad_input_under_launch_sh_is_our_line_not_a_launcher_traceback(root: Path) -> None:
    out = root / "bad_input"
    result = run(launch_sh_command("--cfg", str(root / "tiny.yaml"), "--output", str(out), "--opts",
                                   "TRAIN.EPOCHS", "0"), root, timeout=LIMIT_S)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr[-3000:]
    ours = _ours(result.stderr)  # once, from the first rank to fail: every rank fails the same way
    assert len(ours) == 1 and re.fullmatch(
        r"error \(rank [01]\): " + re.escape("TRAIN.EPOCHS=0 must be >= 1; change it in the YAML or with --opts "
                                              "TRAIN.EPOCHS VALUE [ConfigError; rerun with --debug for the traceback]"),
        ours[0]), result.stderr
    assert not out.exists()


def test_ctrl_c_of_one_process_is_one_line_and_exit_130(root: Path) -> None:
    """Without a launcher the process's own exit code and stderr are what the terminal shows."""
    out = root / "interrupted_alone"
    command = main_command("--cfg", str(root / "tiny.yaml"), "--output", str(out), *COMMON)
    result = _interrupt_like_a_terminal(command, root, run_dir(out) / "log.txt")
    assert result.returncode == 130, result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if "Traceback" in line] == []
    assert len(_ours(result.stderr)) == 1 and _ours(result.stderr)[0].startswith("interrupt: stopping")
    assert torch.load(run_dir(out) / "last.pth", weights_only=True)["global_step"] >= 1
