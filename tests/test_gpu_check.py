"""``python -m benchmarks.gpu_check``: the CPU mode (``--device cpu --quick``) runs every check's code path
and passes, the report holds its format, ``--help`` names every check, and the decisions the checks make."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check.__main__ import CHECKS
from benchmarks.gpu_check.model_checks import amp_bound, expected_kernels, kernels_seen
from benchmarks.gpu_check.report import FAIL, PASS, SKIP, Report, Result, SpeedRow, check, skipped
from benchmarks.gpu_check.training import is_sync_error, max_relative_difference, sync_error_text
from tests.helpers import REPO_ROOT, subprocess_env

# The rows that only CUDA can run; on CPU they are reported as skipped, by name.
CUDA_ONLY = ("/no_host_sync", "dali/no_host_round_trip", "dali/validation_syncs")


@pytest.mark.slow
def test_quick_cpu_mode_passes_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--quick", "--out",
                           str(out)], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["passed"] and report["quick"] and report["device"] == "cpu"
    results = report["results"]
    for group in CHECKS:  # every group ran and gave rows
        assert any(r["name"].startswith(group) or group == "speed" and r["name"].startswith("e2e/") for r in results)
    for row in results:
        assert set(row) == {"name", "status", "value", "bound", "detail"}
        if row["status"] == SKIP:  # skipped only where CUDA is needed, and says so
            assert row["name"].endswith(CUDA_ONLY) and row["detail"].startswith("needs CUDA"), row
        else:
            assert row["status"] == PASS and row["bound"] and row["value"] is not None, row
    models = {r["name"].split("/")[1] for r in results if r["name"].startswith("models/")}
    assert models == {"crossformerpp_s", "crossformer_t"}
    assert {r["name"].rsplit("/", 1)[1] for r in results if r["name"].startswith("models/")} == {
        "outputs", "grads", "eval_outputs"}
    assert {"fp32", "bf16", "fp16"} == {r["name"].split("/")[3] for r in results if r["name"].startswith("models/")}
    for name in ("dali/gpu_operators", "dali/val_vs_pytorch", "dali/randaugment_ops", "dali/train_pipeline",
                 "dali/erasing_reproducible", "e2e/main_py_dali",
                 "training/fp16/grad_scaler_scale", "training/bf16/resume_continues",
                 "training/fp16/compiled/recompiles_after_warmup"):
        assert any(r["name"] == name for r in results), name
    speed = {row["name"]: row for row in report["speed"]}
    for name, row in speed.items():
        assert set(row) == {"name", "unit", "ours", "official", "ratio", "detail"}
        if name.startswith(("speed/", "loader/")):  # ours, the official formulation (or loader), the ratio
            assert row["ours"] > 0 and row["official"] > 0 and row["ratio"] > 0, row
    assert any(name.startswith("speed/") and name.endswith("/infer") and "paper" in row["detail"]
               for name, row in speed.items())
    assert "e2e/main.py dali" in speed and "data wait" in speed["e2e/main.py dali"]["detail"]
    assert {t["group"] for t in report["timings"]} == set(CHECKS) | {"data"}
    markdown = (out / "gpu_check.md").read_text()
    assert "**PASSED**" in markdown
    assert "| check | result | measured | bound | detail |" in markdown
    assert "| measurement | unit | ours | official | ratio | detail |" in markdown
    assert all(f"| {row['name']} | {row['status']} |" in markdown for row in results)


def test_without_dali_its_rows_are_skipped_and_the_others_run(tmp_path: Path, monkeypatch) -> None:
    """The lent GPU machine has no DALI: its rows are skipped by name, the model speed rows still run."""
    import benchmarks.gpu_check.__main__ as gpu_check
    from benchmarks.gpu_check.plan import DALI_MISSING

    monkeypatch.setattr(gpu_check, "dali_installed", lambda: False)
    assert gpu_check.main(["--device", "cpu", "--quick", "--groups", "dali", "speed", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["passed"] and report["environment"]["dali"] == "not installed"
    skipped_rows = {r["name"] for r in report["results"] if r["status"] == SKIP and r["detail"] == DALI_MISSING}
    assert skipped_rows == {name for name, _ in CHECKS["dali"]} | {"loader/train", "e2e/main_py_dali"}
    assert all(r["status"] == SKIP for r in report["results"])
    assert {row["name"].split("/")[0] for row in report["speed"]} == {"speed", "memory"}
    assert {t["group"] for t in report["timings"]} == {"dali", "speed"}  # no JPEGs generated for nothing
    assert not (tmp_path / "data").exists()


def test_help_lists_every_check() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--help"], cwd=REPO_ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for group, checks in CHECKS.items():
        assert f"  {group} (" in done.stdout
        for name, _ in checks:
            assert name in done.stdout
    assert "--quick" in done.stdout and "--device" in done.stdout and "--out" in done.stdout


def test_no_cuda_is_one_line_and_exit_2(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path)], cwd=REPO_ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: no CUDA device is visible; run on a GPU, or use --device cpu --quick"]


def test_report_rows_and_exit_decision(tmp_path: Path) -> None:
    assert check("a/b", True, 1.0, "<= 2").status == PASS
    assert check("a/b", True, math.nan, "<= 2").status == FAIL  # a NaN never passes
    assert check("a/b", False, 3.0, "<= 2").status == FAIL
    assert skipped("a/c", "needs CUDA: x").status == SKIP
    report = Report(device="cpu", quick=True, environment={"torch": "x"},
                    results=[check("a/b", True, 1.0, "<= 2", "one | two"), skipped("a/c", "needs CUDA: x")],
                    speed=[SpeedRow("speed/m/bf16/infer", "img/s", 200.0, 100.0, 2.0, "batch 2")])
    assert not report.failed
    report.write(tmp_path)
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| a/b | pass | 1 | <= 2 | one / two |" in markdown  # a pipe in the text keeps the table intact
    assert "| speed/m/bf16/infer | img/s | 200 | 100 | 2.00x | batch 2 |" in markdown
    report.pending = ["speed"]  # as written after a group, before the run's time limit stopped it
    assert not report.to_dict()["passed"] and "**INCOMPLETE, not run: speed**" in report.markdown()
    report.pending = []
    report.results.append(Result("a/d", FAIL, 5.0, "<= 2"))
    assert [r.name for r in report.failed] == ["a/d"] and not report.to_dict()["passed"]


def test_sdpa_kernel_decision() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert expected_kernels(cuda, True, dtype) == expected_kernels(cuda, False, dtype) == {"efficient"}
        assert expected_kernels(cpu, True, dtype) == set()
    assert expected_kernels(cpu, False, torch.float32) == {"flash"}
    assert expected_kernels(cpu, False, torch.bfloat16) == set()  # bf16 CPU inference: the explicit form
    ops = {"aten::scaled_dot_product_attention", "aten::_scaled_dot_product_efficient_attention",
           "aten::_efficient_attention_backward", "aten::linear"}
    assert kernels_seen(ops) == {"efficient"}
    assert kernels_seen({"aten::_scaled_dot_product_flash_attention_for_cpu"}) == {"flash"}
    # A silent fallback to the math kernel shows up next to (or instead of) the pinned one.
    assert kernels_seen(ops | {"aten::_scaled_dot_product_attention_math"}) == {"efficient", "math"}
    assert kernels_seen({"aten::_scaled_dot_product_cudnn_attention"}) == {"cudnn"}


def test_tolerance_and_loss_curve_decisions() -> None:
    assert amp_bound(0.01) == pytest.approx(0.021)  # twice the official formulation's own error, plus 1e-3
    assert max_relative_difference([1.0, 2.0], [1.0, 2.02]) == pytest.approx(0.01 / 1.01, rel=1e-3)
    assert max_relative_difference([1.0], [1.0, 2.0]) == math.inf  # a run that stopped early never matches
    assert max_relative_difference([], []) == math.inf


def test_sync_error_names_the_line_that_synchronised() -> None:
    def step() -> None:
        raise RuntimeError("called a synchronizing CUDA operation")

    try:
        step()
    except RuntimeError as error:
        assert is_sync_error(error)
        assert sync_error_text(error).endswith("at test_gpu_check.py:" + str(step.__code__.co_firstlineno + 1)
                                               + " (step)")
    assert not is_sync_error(RuntimeError("CUDA out of memory"))


def test_dali_gpu_graphs_have_gpu_implementations() -> None:
    """The loader's GPU graphs (mixed decode, RandAugment with warp_perspective, normalisation) use only
    operators that the installed DALI implements on their device; the decision itself flags a miss."""
    from benchmarks.gpu_check.dali_checks import check_gpu_operators, gpu_graph_operators, missing_implementations
    from config import _C

    train = gpu_graph_operators(True, _C.clone())
    assert ("decoders__ImageRandomCrop", "mixed") in train and ("experimental__WarpPerspective", "gpu") in train
    assert ("decoders__Image", "mixed") in gpu_graph_operators(False, _C.clone())
    assert check_gpu_operators().status == PASS
    assert missing_implementations([("PeekImageShape", "gpu"), ("Resize", "gpu")]) == [("PeekImageShape", "gpu")]


def test_lent_machine_wheels_decision(tmp_path: Path) -> None:
    """The device command installs a carried wheel where the image lacks the package, and timm where the
    image's version is not ours; any installed yacs / termcolor / tqdm serves."""
    from benchmarks.gpu_check.lent import requirement_pins, wheels_to_install

    pins = requirement_pins()
    assert pins["torch"] == "2.14.1" and pins["timm"] and pins["yacs"]  # requirements.txt and what it includes
    for name in ("timm-0.0.1", "tqdm-0.0.1", f"yacs-{pins['yacs']}", "no_such_dist-1.0"):
        (tmp_path / f"{name}-py3-none-any.whl").touch()
    chosen, lines = wheels_to_install(tmp_path)
    assert [w.name.split("-")[0] for w in chosen] == ["no_such_dist", "timm"], lines
    assert any(line.startswith("tqdm: the image's") for line in lines)


def test_lent_machine_command_fits_and_is_the_documented_one() -> None:
    from benchmarks.gpu_check.lent import GROUPS, MAX_COMMAND_CHARS, device_command

    command = device_command()
    assert len(command) < MAX_COMMAND_CHARS and " --device" not in command.split("benchmarks.gpu_check ")[-1]
    assert f"--groups {' '.join(GROUPS)}" in command and set(GROUPS) == set(CHECKS)
    assert "--device cpu --quick" in device_command("cpu", quick=True)
    assert command in (REPO_ROOT / "docs" / "performance.md").read_text()  # the docs print the command that runs
