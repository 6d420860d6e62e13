"""A command that is rejected under ``torchrun``: the quick start's launcher with a wrong
``MODEL.NUM_CLASSES`` for the dataset. Our one line is printed once, torchrun's failure summary
names it as the root cause, no run folder is left behind; through ``launch.sh`` the line is all
the launcher shows.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List

import pytest

from tests.helpers import launch_sh_command, run, torchrun_command, write_tiny_yaml

pytestmark = pytest.mark.slow

LIMIT_S = 300
# What every rank finds, in the line of the rank that prints it.
CAUSE = ("MODEL.NUM_CLASSES=7 but {root}/train has 10 class folders; set MODEL.NUM_CLASSES 10 "
         "[ValueError; rerun with --debug for the traceback]")


def _arguments(tmp_path: Path, toy_folder: Path, out: Path) -> List[str]:
    return ["--cfg", str(write_tiny_yaml(tmp_path)), "--data-path", str(toy_folder), "--output", str(out),
            "--opts", "DATA.DATASET", "imagenet", "MODEL.NUM_CLASSES", "7"]


def _our_lines(output: str) -> List[str]:
    return [line for line in output.splitlines() if line.startswith(("error (rank", "stopped (rank", "aborted (rank"))]


def test_a_wrong_num_classes_under_torchrun_is_one_line_and_the_summary_root_cause(
        tmp_path: Path, toy_folder: Path) -> None:
    out = tmp_path / "output"
    result = run(torchrun_command(*_arguments(tmp_path, toy_folder, out)), tmp_path, timeout=LIMIT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    ours = _our_lines(output)
    assert len(ours) == 1, output[-3000:]
    match = re.fullmatch(r"error \(rank (\d)\): (.*)", ours[0])
    assert match and match.group(2) == CAUSE.format(root=toy_folder), ours
    # torchrun's own summary (its traceback is torchrun's): the root cause is the line above, from its rank.
    root_cause = output.split("Root Cause (first observed failure):", 1)[1]
    assert f"rank      : {match.group(1)} (local_rank: {match.group(1)})" in root_cause
    assert f"traceback : {ours[0]}" in root_cause and "To enable traceback" not in output
    assert not out.exists()  # the rejected command leaves no run folder


def test_the_same_through_launch_sh_is_the_one_line_and_nothing_of_the_launcher(tmp_path: Path,
                                                                                toy_folder: Path) -> None:
    out = tmp_path / "output"
    result = run(launch_sh_command(*_arguments(tmp_path, toy_folder, out)), tmp_path, timeout=LIMIT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    not_logged = [line for line in output.splitlines() if not line.startswith("[")]  # log lines start "[time"
    assert not_logged[0] == "launch.sh: 1 node(s) x 2 process(es), node rank 0", output[-3000:]
    assert len(not_logged) == 2 and re.fullmatch(r"error \(rank \d\): " + re.escape(CAUSE.format(root=toy_folder)),
                                                 not_logged[1]), output[-3000:]
    assert not out.exists()


def test_a_reported_failure_is_torchruns_root_cause_even_when_torchrun_killed_the_worker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The error file a worker writes, read by torch's own summary: torchrun may SIGTERM a worker
    that reported its failure and was still exiting; the launcher still exits with its code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from utils.reliability import reported_exit_code, report_failure

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)  # no store: this process prints
    report_failure("error (rank 1): bad thing; fix it [ValueError]", "bad thing; fix it [ValueError]", 1)
    assert capsys.readouterr().err == "error (rank 1): bad thing; fix it [ValueError]\n"
    killed = ProcessFailure(local_rank=1, pid=123, exitcode=-15, error_file=str(error_file))
    summary = ChildFailedError("main.py", {1: killed}).format_msg()
    assert "traceback : error (rank 1): bad thing; fix it [ValueError]" in summary
    assert reported_exit_code(killed.error_file_data) == 1
