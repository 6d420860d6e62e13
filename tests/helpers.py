"""What several test files share: the tiny run config, its run directory, and runners of
``main.py`` in a subprocess (one process or under ``torchrun``)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
MAIN = REPO_ROOT / "main.py"

# A real CrossFormer++ shrunk to a few hundred thousand parameters, on 32x32 synthetic data.
TINY_YAML = """\
DATA:
  DATASET: synthetic
  BATCH_SIZE: 8
  IMG_SIZE: 32
  SYNTHETIC_TRAIN_SIZE: 64
  SYNTHETIC_VAL_SIZE: 21
  NUM_WORKERS: 0
MODEL:
  NAME: crossformerpp_s
  NUM_CLASSES: 10
  DROP_PATH_RATE: 0.1
  CROSSFORMER:
    EMBED_DIM: 32
    DEPTHS: [1, 1, 1, 1]
    NUM_HEADS: [1, 2, 4, 8]
TRAIN:
  EPOCHS: 2
  WARMUP_EPOCHS: 1
  AMP: none
  EMA:
    ENABLE: True
    DECAY: 0.9
AUG:
  AUTO_AUGMENT: ""
  REPROB: 0.0
THROUGHPUT:
  WARMUP_ITERS: 1
  ITERS: 2
PRINT_FREQ: 2
"""
MODEL_DIR = "crossformerpp_s"  # TINY_YAML's MODEL.NAME: a run's directory is OUTPUT/MODEL_DIR/TAG


def write_tiny_yaml(directory: Path) -> Path:
    """Write :data:`TINY_YAML` to ``directory/tiny.yaml`` and return that path.

    Args:
        directory: An existing directory.
    """
    path = directory / "tiny.yaml"
    path.write_text(TINY_YAML)
    return path


class TinyRun(NamedTuple):
    """A finished run of :data:`TINY_YAML` (the ``tiny_run`` fixture): ``yaml``, its run directory
    ``run_dir`` and what training printed (``stdout``, ``stderr``)."""

    yaml: Path
    run_dir: Path
    stdout: str
    stderr: str


def run_dir(output: Path, tag: str = "default") -> Path:
    """The run directory of a :data:`TINY_YAML` run with ``--output output``.

    Args:
        output: The run's ``--output``.
        tag: The run's ``--tag``.
    """
    return output / MODEL_DIR / tag


def subprocess_env() -> Dict[str, str]:
    """Environment for running main.py in a subprocess: one thread per process, repo on the path."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), NO_COLOR="1")
    return env


def main_command(*args: str) -> List[str]:
    """``python main.py ARGS`` (one process).

    Args:
        args: main.py's arguments.
    """
    return [sys.executable, str(MAIN), *args]


def torchrun_command(*args: str, nproc: int = 2, torchrun_args: Sequence[str] = ()) -> List[str]:
    """``torchrun --standalone --nproc_per_node=NPROC TORCHRUN_ARGS main.py ARGS``.

    Args:
        args: main.py's arguments.
        nproc: Processes on this node.
        torchrun_args: torchrun's own extra options, e.g. ``--max-restarts=1``.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *torchrun_args, str(MAIN), *args]


def launch_sh_command(*args: str, nproc: int = 2) -> List[str]:
    """``NPROC_PER_NODE=NPROC launch.sh ARGS``, with this interpreter running its torchrun.

    Args:
        args: main.py's arguments.
        nproc: Processes on this node.
    """
    return ["env", f"NPROC_PER_NODE={nproc}", f"PYTHON={sys.executable}", "bash", str(REPO_ROOT / "launch.sh"), *args]


def run(command: Sequence[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``command`` to its end in :func:`subprocess_env`, capturing stdout and stderr as text.

    Args:
        command: E.g. :func:`main_command` or :func:`torchrun_command`.
        cwd: Working directory.
        timeout: Seconds before ``subprocess.TimeoutExpired``.
    """
    return subprocess.run(list(command), cwd=cwd, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


def start(command: Sequence[str], cwd: Path) -> subprocess.Popen:
    """Start ``command`` in :func:`subprocess_env` with stdout and stderr merged into one text pipe.

    Args:
        command: E.g. :func:`torchrun_command`.
        cwd: Working directory.
    """
    return subprocess.Popen(list(command), cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run_main(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python main.py ARGS`` run to its end (see :func:`run`).

    Args:
        args: main.py's arguments.
        cwd: Working directory.
        timeout: Seconds before ``subprocess.TimeoutExpired``.
    """
    return run(main_command(*args), cwd, timeout)


def last_json(stdout: str) -> Dict[str, Any]:
    """The JSON object on the last line of ``stdout`` (what ``--eval`` and ``--throughput`` print last).

    Args:
        stdout: A run's standard output.
    """
    return json.loads(stdout.strip().splitlines()[-1])


def read_metrics(directory: Path) -> List[Dict[str, Any]]:
    """The rows of ``directory/metrics.jsonl``, one per epoch.

    Args:
        directory: A run directory.
    """
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_training_state(a: Path, b: Path) -> None:
    """Two checkpoint files hold the same position and bitwise equal weights, EMA and optimizer state.

    Args:
        a: One checkpoint file.
        b: The other.
    """
    import torch

    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert (x["epoch"], x["batch"], x["global_step"]) == (y["epoch"], y["batch"], y["global_step"])
    for key in ("model", "model_ema"):
        assert (x[key] is None) == (y[key] is None), key
        for name, tensor in (x[key] or {}).items():
            assert torch.equal(tensor, y[key][name]), f"{key}.{name}"
    for index, state in x["optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, y["optimizer"]["state"][index][name]), f"optimizer.{index}.{name}"


JOB_MARKER = "CROSSFORMER_TEST_SLURM_STEP"  # in the environment of every process of a test's job: its "cgroup"

# scontrol as launch.sh uses it: `show hostnames`, `show job`, and `requeue JOBID`, which records
# the processes of the job still alive other than itself and its caller (launch.sh).
# write_fake_scontrol puts job_processes' source, the marker and the record's path before it.
_SCONTROL = r'''
if sys.argv[1:3] == ["show", "hostnames"]:
    print("127.0.0.1")
elif sys.argv[1:3] == ["show", "job"]:
    print("JobId=" + sys.argv[3] + " Requeue=1")
elif sys.argv[1] == "requeue":
    alive = [pid for pid in job_processes(os.environ[JOB_MARKER]) if pid not in (os.getpid(), os.getppid())]
    with open(RECORD, "a") as f:
        f.write(json.dumps({"job": sys.argv[2], "alive": alive}) + "\n")
'''


def job_processes(step: str) -> List[int]:
    """The live processes whose environment has ``JOB_MARKER=step`` (zombies have none)."""
    needle = f"{JOB_MARKER}={step}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:  # gone, or not ours
            continue
    return found


def write_fake_scontrol(bin_dir: Path, record: Path) -> Path:
    """A stand-in ``scontrol`` in ``bin_dir`` (put it first on the PATH): ``show hostnames`` is
    127.0.0.1, ``show job`` says ``Requeue=1``, and each ``requeue JOBID`` appends one JSON line to
    ``record``: the job id and the pids of this job's processes (same ``JOB_MARKER`` value) still alive.

    Args:
        bin_dir: Created if missing.
        record: The JSON-lines file ``requeue`` appends to.
    """
    import inspect

    bin_dir.mkdir(parents=True, exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!{sys.executable}\nimport json, os, sys\nfrom typing import List\n"
                        f"JOB_MARKER = {JOB_MARKER!r}\nRECORD = {str(record)!r}\n\n"
                        f"{inspect.getsource(job_processes)}{_SCONTROL}")
    scontrol.chmod(0o755)
    return scontrol


def signal_job(step: str, signum: int) -> None:
    """Send ``signum`` to every live process of a test's job (``JOB_MARKER=step``), as slurmstepd does.

    Args:
        step: The job's marker value.
        signum: The signal.
    """
    for pid in job_processes(step):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
