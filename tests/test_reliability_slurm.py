"""SLURM's preemption, reproduced on one machine: the signal reaches every process of the job step.

``#SBATCH --signal=USR1@120`` with ``srun`` and ``scancel`` (SIGTERM) signal every process of the
step: slurmstepd finds them by the step's cgroup (``ProctrackType=proctrack/cgroup``), so launch.sh,
the launcher (torchrun) and every training process get it at once, although torchrun starts each
training process in a session of its own. With ``proctrack/pgid`` only launch.sh's process group
(launch.sh and the launcher) gets it, as with ``kill -USR1 -- -PGID``.

``launch.sh`` runs here in its own session (``setsid``), as under ``srun``; every process of the
job carries a marker in its environment, which stands in for the cgroup: "every process of the
job" is every process with the marker. A stand-in ``scontrol`` on the PATH records which of them
are still alive when ``scontrol requeue`` runs. Three stops, each resumed by the next start in the
same run directory: SIGUSR1 to every process while ``last.pth`` is being written, SIGTERM to every
process at a random step, SIGUSR1 to launch.sh's process group at a random step. Each must end the
same way: the workers agree on a step and write ``last.pth`` (and say so), launch.sh exits 75 and
requeues only after every other process of the job has exited. A last start runs to the end and
must equal an uninterrupted run bitwise.

The model is the tiny one made wider (``EMBED_DIM 96``, a 204 MiB checkpoint), so a save takes
seconds here and a signal can land inside it.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from tests.helpers import (JOB_MARKER, assert_same_training_state, free_port, job_processes, launch_sh_command, run_dir,
                           signal_job, subprocess_env, write_fake_scontrol, write_tiny_yaml)
from utils.checkpoint import describe_position, resume_position

pytestmark = pytest.mark.slow

# 128 samples / 2 ranks / batch 8 = 8 steps per epoch, 2 epochs; last.pth every 3 steps.
OPTS = ["--opts", "DATA.SYNTHETIC_TRAIN_SIZE", "128", "SAVE_STEPS", "3", "PRINT_FREQ", "1",
        "MODEL.CROSSFORMER.EMBED_DIM", "96"]
LIMIT_S = 400
JOB_ID = "4242"

@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slurm")
    write_tiny_yaml(root)
    write_fake_scontrol(root / "bin", root / "requeued.jsonl")
    return root


def _slurm_env(root: Path, step: str) -> Dict[str, str]:
    env = subprocess_env()
    env.update(PATH=f"{root / 'bin'}:{env['PATH']}", SLURM_JOB_ID=JOB_ID, SLURM_NODEID="0", SLURM_JOB_NUM_NODES="1",
               SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(free_port()), **{JOB_MARKER: step})
    return env


def _command(root: Path, out: Path) -> List[str]:
    return launch_sh_command("--cfg", str(root / "tiny.yaml"), "--output", str(out), *OPTS)


def _stop(root: Path, out: Path, how: str, rng: random.Random) -> Dict[str, object]:
    """Start the job in its own session, stop it as ``how`` says, and return what it did."""
    directory = run_dir(out)
    log = directory / "log.txt"
    steps_before = log.read_text().count("train epoch ") if log.exists() else 0
    wait_steps = rng.randint(1, 2)
    step = f"{os.getpid()}-{how}"
    proc = subprocess.Popen(_command(root, out), cwd=root, env=_slurm_env(root, step), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + LIMIT_S
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            if how.endswith("during a save"):
                if directory.is_dir() and any(".last.pth.tmp-" in p.name for p in directory.iterdir()):
                    break
            elif log.exists() and log.read_text().count("train epoch ") >= steps_before + wait_steps:
                break
            time.sleep(0.01)
        if how.startswith("usr1 to every process"):
            signal_job(step, signal.SIGUSR1)
        elif how.startswith("term to every process"):
            signal_job(step, signal.SIGTERM)
        else:  # kill -USR1 -- -PGID: launch.sh and the launcher (each worker has its own session)
            os.killpg(proc.pid, signal.SIGUSR1)
        output, _ = proc.communicate(timeout=LIMIT_S)
        leftover = job_processes(step)
    finally:
        signal_job(step, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait()
    return {"code": proc.returncode, "output": output, "leftover": leftover}


def test_every_delivery_of_slurms_stop_saves_then_requeues_and_resumes_bitwise(root: Path) -> None:
    reference = subprocess.run(_command(root, root / "reference"), cwd=root, env=subprocess_env(),
                               capture_output=True, text=True, timeout=LIMIT_S)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out, rng, last_step = root / "preempted", random.Random(26), 0
    record = root / "requeued.jsonl"
    for trial, how in enumerate(["usr1 to every process during a save", "term to every process at a step",
                                 "usr1 to launch.sh's process group at a step"]):
        result = _stop(root, out, how, rng)
        output = str(result["output"])
        assert result["code"] == 75, (how, output[-3000:])
        assert "Traceback" not in output, (how, output[-3000:])
        assert result["leftover"] == [], (how, "processes of the job outlived launch.sh")
        requeues = [json.loads(line) for line in record.read_text().splitlines()]
        assert len(requeues) == trial + 1, (how, output[-3000:])
        assert requeues[-1] == {"job": JOB_ID, "alive": []}, (how, "requeued while these still ran", requeues[-1])
        log = (run_dir(out) / "log.txt").read_text()
        stops = re.findall(r"preempted: last\.pth holds (.+?), global step (\d+)", log)
        assert len(stops) == trial + 1, (how, log[-3000:])
        saved = torch.load(run_dir(out) / "last.pth", weights_only=True)
        position = describe_position(*resume_position(saved)).replace("after epoch", "the end of epoch")
        assert (position, str(saved["global_step"])) == stops[-1], how
        assert last_step < saved["global_step"] < 16, (how, last_step, saved["global_step"])
        last_step = saved["global_step"]

    final = subprocess.run(_command(root, out), cwd=root, env=_slurm_env(root, "final"), capture_output=True, text=True,
                           timeout=LIMIT_S)
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"resumed from {run_dir(out) / 'last.pth'}: " in (run_dir(out) / "log.txt").read_text()
    assert len(record.read_text().splitlines()) == 3  # a finished run is not requeued
    assert_same_training_state(run_dir(root / "reference") / "last.pth", run_dir(out) / "last.pth")
