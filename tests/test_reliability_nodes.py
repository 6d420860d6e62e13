"""Two launch.sh "nodes" on this machine: ``NNODES=2 NODE_RANK=0|1 MASTER_ADDR=127.0.0.1``, one CPU
process each (gloo), as under ``srun --nodes=2 --ntasks-per-node=1 ./launch.sh``.

* Preempted the way SLURM does it (SIGUSR1 to every process of the job on both nodes): both exit 75,
  the job is requeued once, from node rank 0 and only after node 0's processes have exited, and the
  next start of both nodes ends bitwise equal to an uninterrupted run of two processes.
* Node 1 killed with SIGKILL mid-epoch (every process of it, as a lost node): node 0 ends within
  ``DIST.TIMEOUT_S`` with one line naming the lost rank; restarting both nodes resumes from the
  last checkpoint and ends bitwise equal to the uninterrupted run.

Every process of a node carries a marker in its environment (tests.helpers.JOB_MARKER) that stands
in for its cgroup: signals go to, and the stand-in ``scontrol`` looks for, exactly those processes.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from tests.helpers import (JOB_MARKER, REPO_ROOT, assert_same_training_state, free_port, job_processes, launch_sh_command,
                           main_command, run,
                           run_dir, signal_job, subprocess_env, write_fake_scontrol, write_tiny_yaml)

pytestmark = pytest.mark.slow

# 128 samples / 2 ranks / batch 8 = 8 steps per epoch, 2 epochs; last.pth every 3 steps.
OPTS = ["--opts", "DATA.SYNTHETIC_TRAIN_SIZE", "128", "SAVE_STEPS", "3", "PRINT_FREQ", "1", "DIST.TIMEOUT_S", "60"]
LIMIT_S = 400
JOB_ID = "2626"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nodes")
    write_tiny_yaml(root)
    write_fake_scontrol(root / "bin", root / "requeued.jsonl")
    return root


@pytest.fixture(scope="module")
def reference(root: Path) -> Path:
    """An uninterrupted run of two processes on one node."""
    out = root / "reference"
    result = run(launch_sh_command("--cfg", str(root / "tiny.yaml"), "--output", str(out), *OPTS), root,
                 timeout=LIMIT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir(out) / "last.pth"


def _start_nodes(root: Path, out: Path, job: str) -> List[subprocess.Popen]:
    """launch.sh on "node" 0 and 1 under SLURM's variables, each in its own session; node r's
    processes carry ``JOB_MARKER=job-node<r>``."""
    port = str(free_port())
    nodes = []
    for node in range(2):
        env = subprocess_env()
        env.update(PATH=f"{root / 'bin'}:{env['PATH']}", SLURM_JOB_ID=JOB_ID, SLURM_NODEID=str(node),
                   SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="localhost", MASTER_PORT=port, NPROC_PER_NODE="1",
                   **{JOB_MARKER: f"{job}-node{node}"})
        command = launch_sh_command("--cfg", str(root / "tiny.yaml"), "--output", str(out), *OPTS, nproc=1)
        nodes.append(subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    return nodes


def _wait_for_log(log: Path, text: str, nodes: List[subprocess.Popen]) -> None:
    deadline = time.monotonic() + LIMIT_S
    while not (log.exists() and text in log.read_text()):
        assert all(node.poll() is None for node in nodes), [node.communicate()[1][-2000:] for node in nodes]
        assert time.monotonic() < deadline, f"{text!r} never appeared in {log}"
        time.sleep(0.05)


def _finish(nodes: List[subprocess.Popen], job: str) -> List[Dict[str, object]]:
    """Wait for both nodes; their exit codes and stderr (every process of the job killed afterwards)."""
    results = []
    try:
        for node in nodes:
            _, stderr = node.communicate(timeout=LIMIT_S)
            results.append({"code": node.returncode, "stderr": stderr})
    finally:
        for node in range(2):
            signal_job(f"{job}-node{node}", signal.SIGKILL)
        for node in nodes:
            if node.poll() is None:
                node.wait()
    return results


def _resume_both(root: Path, out: Path, job: str) -> None:
    results = _finish(_start_nodes(root, out, job), job)
    assert [r["code"] for r in results] == [0, 0], [str(r["stderr"])[-2000:] for r in results]


def test_two_nodes_preempted_like_slurm_requeue_once_and_resume_bitwise(root: Path, reference: Path) -> None:
    out, record = root / "preempted", root / "requeued.jsonl"
    nodes = _start_nodes(root, out, "preempt")
    _wait_for_log(run_dir(out) / "log.txt", "train epoch 0/2 [4/8]", nodes)
    for node in range(2):  # the warning reaches every process of the step on every node
        signal_job(f"preempt-node{node}", signal.SIGUSR1)
    results = _finish(nodes, "preempt")
    assert [r["code"] for r in results] == [75, 75], [str(r["stderr"])[-2000:] for r in results]
    requeues = [json.loads(line) for line in record.read_text().splitlines()]
    assert requeues == [{"job": JOB_ID, "alive": []}]  # once, by node 0, after its processes exited
    assert "requeueing SLURM job" in str(results[0]["stderr"]) and "requeue" not in str(results[1]["stderr"])
    log = (run_dir(out) / "log.txt").read_text()
    assert "preempted: last.pth holds epoch 0" in log
    _resume_both(root, out, "preempt-resumed")
    assert len(record.read_text().splitlines()) == 1
    assert_same_training_state(reference, run_dir(out) / "last.pth")


def test_a_lost_node_ends_the_other_with_one_line_naming_the_rank_and_a_restart_resumes(
        root: Path, reference: Path) -> None:
    out = root / "lost_node"
    nodes = _start_nodes(root, out, "lost")
    _wait_for_log(run_dir(out) / "log.txt", "saved last.pth (epoch 0, batch 3, step 3)", nodes)
    _wait_for_log(run_dir(out) / "log.txt", "train epoch 0/2 [5/8]", nodes)
    killed_at = time.monotonic()
    signal_job("lost-node1", signal.SIGKILL)  # node 1 is gone: launch.sh, the launcher and its worker
    stderr: Optional[str] = None
    try:
        _, stderr = nodes[0].communicate(timeout=LIMIT_S)
        ended_after = time.monotonic() - killed_at
    finally:
        _finish(nodes, "lost")
    assert nodes[0].returncode == 1, stderr[-3000:]
    assert ended_after < 60, ended_after  # DIST.TIMEOUT_S: a dead peer's closed sockets are noticed sooner
    lines = [line for line in stderr.splitlines() if line.startswith(("error", "launch:", "stopped", "Traceback"))]
    assert len(lines) == 1 and lines[0].startswith("error (rank 0): a collective failed, rank 1 did not answer"), \
        stderr[-3000:]
    assert not job_processes("lost-node0") and not job_processes("lost-node1")
    _resume_both(root, out, "lost-resumed")
    assert "resumed from" in (run_dir(out) / "log.txt").read_text()
    assert_same_training_state(reference, run_dir(out) / "last.pth")
    assert os.path.exists(run_dir(out) / "best.pth")


def test_nodes_started_with_different_configs_name_the_key(root: Path) -> None:
    """Two processes (as two nodes) whose --opts differ: both stop, and the job prints one line naming the key
    (the first rank to fail claims the cause in the job's store; under torchrun every node's failure
    summary names it too: tests/test_torchrun_errors.py)."""
    env = subprocess_env()
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", LOCAL_RANK="0")
    procs = []
    try:
        for rank, batch in ((0, "8"), (1, "4")):
            command = main_command("--cfg", str(root / "tiny.yaml"), "--output", str(root / "mismatch"), *OPTS,
                                   "DATA.BATCH_SIZE", batch)
            procs.append(subprocess.Popen(command, cwd=root, env=dict(env, RANK=str(rank)), stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True))
        errors = [proc.communicate(timeout=LIMIT_S)[1] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [1, 1]
    lines = [line for stderr in errors for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and re.fullmatch(
        r"error \(rank [01]\): the processes run different configs: DATA\.BATCH_SIZE is 8 on rank 0 and 4 on rank 1 "
        r"and 3 more key\(s\); start every node with the same command, config files and --opts \[ConfigError; "
        r"rerun with --debug for the traceback\]", lines[0]), errors
    assert not (root / "mismatch").exists()


def test_an_unreachable_master_addr_is_one_line_of_ours(root: Path) -> None:
    """Node rank 1 whose MASTER_ADDR:MASTER_PORT answers nothing: after the rendezvous timeout the
    launcher's last line says what to check, without torchrun's traceback."""
    command = [sys.executable, "-m", "utils.launch", "--nnodes=2", "--node_rank=1", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "--rdzv-conf", "timeout=3", "--nproc_per_node=1",
               str(REPO_ROOT / "main.py"), "--cfg", str(root / "tiny.yaml")]
    result = run(command, root, timeout=LIMIT_S)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("launch: cannot reach the rendezvous (") and "check that MASTER_ADDR and MASTER_PORT" in last
