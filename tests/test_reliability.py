"""Faults in one process: non-finite steps, unreadable checkpoints, failed saves, bad output, bad input.

``main.main`` runs in-process (one process, tiny model, synthetic data), so each case costs a
few seconds and asserts the exit code, the single error line and what is left on disk.
"""
from __future__ import annotations

import errno
import shutil
import signal
from pathlib import Path
from typing import List, Tuple

import pytest
import torch
from torch import nn

from tests.helpers import MODEL_DIR, REPO_ROOT


def _run(cfg: Path, out: Path, *opts: str, extra: Tuple[str, ...] = ()) -> int:
    import main

    argv = ["--cfg", str(cfg), "--output", str(out), *extra]
    if opts:
        argv += ["--opts", *opts]
    return main.main(argv)


def _one_line_error(capsys: pytest.CaptureFixture, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def cfg(tiny_yaml: Path) -> Path:
    return tiny_yaml


# -----------------------------------------------------------------------------
# Non-finite steps
# -----------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True])
def test_a_non_finite_step_changes_no_weight_and_no_optimizer_state(fused: bool) -> None:
    from training.engine import step_if_finite

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.05, fused=fused or None,
                                  foreach=None if fused else True)
    model(torch.randn(2, 4)).sum().backward()
    step_if_finite(optimizer, torch.tensor(True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = {k: {n: t.clone() for n, t in s.items()} for k, s in optimizer.state.items()}
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    step_if_finite(optimizer, torch.isfinite(torch.tensor(float("nan"))))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for param, saved in state_before.items():
        for name, tensor in saved.items():
            assert torch.equal(optimizer.state[param][name], tensor), name
    assert not hasattr(optimizer, "found_inf")


def test_injected_nan_is_skipped_then_a_streak_stops_with_a_diagnostic_checkpoint(
        cfg: Path, tmp_path: Path, capsys: pytest.CaptureFixture, restore_logging: None) -> None:
    out = tmp_path / "out"
    # Steps 3, 4, 5... are NaN: the streak reaches 3 at step 5 (read on every log step: PRINT_FREQ 1).
    code = _run(cfg, out, "TRAIN.DEBUG_NONFINITE_STEPS", str(list(range(3, 17))), "TRAIN.MAX_NONFINITE_STEPS", "3",
                "PRINT_FREQ", "1", "SAVE_STEPS", "2")
    assert code == 3
    _one_line_error(capsys, "non-finite", "nonfinite_step5.pth", "TRAIN.MAX_NONFINITE_STEPS=3")
    run_dir = out / MODEL_DIR / "default"
    diag = torch.load(run_dir / "nonfinite_step5.pth", weights_only=True)
    last = torch.load(run_dir / "last.pth", weights_only=True)
    assert (diag["global_step"], diag["nonfinite_total"], diag["nonfinite_streak"]) == (5, 3, 3)
    assert last["global_step"] == 4  # saved by SAVE_STEPS, never overwritten by the stop
    # Skipped steps do not move the weights: both hold the weights after step 2.
    for key, value in last["model"].items():
        assert torch.equal(value, diag["model"][key]) and torch.isfinite(value.float()).all(), key
    assert "skipped 3 optimizer step(s)" in (run_dir / "log.txt").read_text()
    # Auto-resume never picks the diagnostic file, though its step is the highest.
    from utils.checkpoint import find_resume_candidates
    assert find_resume_candidates(str(run_dir))[0] == str(run_dir / "last.pth")


# -----------------------------------------------------------------------------
# Checkpoints: unreadable files, failed saves, another model
# -----------------------------------------------------------------------------
def test_unreadable_checkpoints_are_reported_and_skipped_for_older_ones(
        cfg: Path, tmp_path: Path, restore_logging: None) -> None:
    out = tmp_path / "out"
    assert _run(cfg, out, "TRAIN.STOP_AFTER_STEPS", "10") == 0
    run_dir = out / MODEL_DIR / "default"
    last = run_dir / "last.pth"
    good = torch.load(last, weights_only=True)
    assert good["global_step"] == 10
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # truncated: its header cannot be read
    # Readable header, newest step, but not loadable: the full load fails and the next is tried.
    broken = dict(good, global_step=99)
    del broken["optimizer"]
    torch.save(broken, run_dir / "epoch_0009.pth")

    assert _run(cfg, out, "TRAIN.STOP_AFTER_STEPS", "12") == 0
    log = (run_dir / "log.txt").read_text()
    assert f"skipping {last} for auto-resume" in log
    assert f"cannot resume {run_dir / 'epoch_0009.pth'} (KeyError" in log
    assert f"resumed from {run_dir / 'epoch_0000.pth'}: after epoch 0, global step 8" in log
    assert (run_dir / "epoch_0009.pth").exists()  # reported, never deleted
    assert torch.load(last, weights_only=True)["global_step"] == 12


def test_a_failed_save_keeps_the_previous_checkpoint(cfg: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> None:
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):  # the second checkpoint hits a full disk half-way
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "out"
    run_dir = out / MODEL_DIR / "default"
    assert _run(cfg, out, "SAVE_STEPS", "2") == 1
    _one_line_error(capsys, f"no space left for {run_dir / 'last.pth'}", "MiB are free",
                    f"the previous checkpoints in {run_dir} are intact", "run the same command to resume")
    assert torch.load(run_dir / "last.pth", weights_only=True)["global_step"] == 2
    assert sorted(p.name for p in run_dir.glob("*.pth*")) == ["last.pth"]
    assert not list(run_dir.glob(".*tmp*"))


def test_a_disk_that_fills_during_an_epoch_save_is_named_and_prunes_nothing(
        cfg: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
        restore_logging: None) -> None:
    """torch.save's zip writer reports a full disk as a RuntimeError: the message still says what happened."""
    real_save, real_usage, calls = torch.save, shutil.disk_usage, []

    def usage(path):  # the file system is full once the second save started writing
        found = real_usage(path)
        return found._replace(free=3 << 20) if len(calls) >= 2 else found

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 44652800 vs 44652688")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", usage)
    out = tmp_path / "out"
    run_dir = out / MODEL_DIR / "default"
    assert _run(cfg, out, "SAVE_KEEP", "1") == 1  # epoch 0 saved; epoch 1's save fails
    line = _one_line_error(capsys, f"no space left for {run_dir / 'epoch_0001.pth'}", "3.0 MiB are free",
                           "previous checkpoints", "intact")
    assert "unexpected pos" not in line
    # Nothing pruned: with SAVE_KEEP 1 a prune after the failed save would have removed epoch_0000.pth.
    assert sorted(p.name for p in run_dir.glob("*.pth*")) == ["best.pth", "ema_best.pth", "epoch_0000.pth",
                                                              "last.pth"]
    assert torch.load(run_dir / "epoch_0000.pth", weights_only=True)["epoch"] == 0

    # The space is checked before every save: a checkpoint that cannot fit is not even started.
    calls.clear()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=1 << 20))
    capsys.readouterr()
    monkeypatch.setattr("training.trainer.check_free_space", lambda run_dir, needed: None)  # past the start-up check
    assert _run(cfg, tmp_path / "out2", "SAVE_STEPS", "1") == 1
    _one_line_error(capsys, "no space left for", "last.pth", "1.0 MiB are free")
    assert calls == []


def test_resume_refuses_a_checkpoint_of_another_model(cfg: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      restore_logging: None) -> None:
    out = tmp_path / "out"
    assert _run(cfg, out, "TRAIN.STOP_AFTER_STEPS", "1") == 0
    checkpoint = out / MODEL_DIR / "default" / "last.pth"
    capsys.readouterr()
    assert _run(cfg, tmp_path / "other", "MODEL.NUM_CLASSES", "7", extra=("--resume", str(checkpoint))) == 1
    _one_line_error(capsys, f"cannot resume {checkpoint}", "MODEL.NUM_CLASSES=10", "head.weight", "--pretrained")
    # Auto-resume into the same run directory with another architecture: refused, files kept.
    before = checkpoint.read_bytes()
    config_yaml = (out / MODEL_DIR / "default" / "config.yaml").read_text()
    assert _run(cfg, out, "MODEL.CROSSFORMER.EMBED_DIM", "64") == 1
    _one_line_error(capsys, "cannot resume", "another run", "MODEL.CROSSFORMER.EMBED_DIM 32 -> 64", "--tag NAME",
                    "--pretrained")
    assert checkpoint.read_bytes() == before
    assert (out / MODEL_DIR / "default" / "config.yaml").read_text() == config_yaml


# -----------------------------------------------------------------------------
# Output directory
# -----------------------------------------------------------------------------
def test_unwritable_output_fails_before_training(cfg: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 restore_logging: None) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert _run(cfg, blocker / "out") == 1
    _one_line_error(capsys, "is not writable", "--output")
    assert blocker.read_text() == "not a directory"


def test_too_little_free_space_fails_before_the_first_step(cfg: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1024))
    out = tmp_path / "out"
    assert _run(cfg, out) == 1
    _one_line_error(capsys, "MiB free in", "a checkpoint needs about", "--output")
    run_dir = out / MODEL_DIR / "default"
    assert not list(run_dir.glob("*.pth")) and "train epoch" not in (run_dir / "log.txt").read_text()


# -----------------------------------------------------------------------------
# Bad input: one line, exit 1, nothing in the run directory touched
# -----------------------------------------------------------------------------
def _bad_inputs(tmp_path: Path) -> List[Tuple[str, List[str], List[str], str]]:
    flat = tmp_path / "flat"  # images directly under the root: no train/ and val/
    (flat / "cat").mkdir(parents=True)
    (flat / "cat" / "a.jpg").write_bytes(b"")
    imagenet = ["DATA.DATASET", "imagenet", "DATA.LOADER", "pytorch"]
    return [
        ("missing data path", imagenet, ["--data-path", str(tmp_path / "nowhere")], "does not exist"),
        ("empty data path", imagenet, [], "DATA.DATA_PATH is empty"),
        ("wrong layout", imagenet, ["--data-path", str(flat)], "split directory"),
        ("unknown key", ["TRAIN.EPOCH", "3"], [], "unknown config key TRAIN.EPOCH"),
        ("wrong type", ["TRAIN.EPOCHS", "many"], [], "has the wrong type"),
        ("unknown model", ["MODEL.NAME", "crossformer_xxl"], [], "is not a registered model"),
        ("batch size 0", [], ["--batch-size", "0"], "DATA.BATCH_SIZE=0 must be >= 1"),
        ("dataset smaller than a batch", ["DATA.SYNTHETIC_TRAIN_SIZE", "4"], [], "give no full batch of 8"),
        ("image size", ["DATA.IMG_SIZE", "48"], [], "must be a multiple of 32"),
    ]


def test_every_bad_input_is_one_line_and_destroys_nothing(cfg: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          restore_logging: None) -> None:
    out = tmp_path / "out"
    run_dir = out / MODEL_DIR / "default"
    run_dir.mkdir(parents=True)
    kept = {"config.yaml": b"previous: config\n", "last.pth": b"the user's checkpoint", "metrics.jsonl": b"{}\n"}
    for name, data in kept.items():
        (run_dir / name).write_bytes(data)
    for what, opts, flags, needle in _bad_inputs(tmp_path):
        code = _run(cfg, out, *opts, extra=tuple(flags))
        assert code == 1, what
        line = _one_line_error(capsys, needle)
        assert line.startswith("error (rank 0): ") and "rerun with --debug" in line, what
        for name, data in kept.items():
            assert (run_dir / name).read_bytes() == data, (what, name)
    # In a fresh output directory a bad input leaves nothing behind, not even its log.
    for what, opts, flags, needle in _bad_inputs(tmp_path / "again"):
        fresh = tmp_path / "fresh"
        assert _run(cfg, fresh, *opts, extra=tuple(flags)) == 1, what
        _one_line_error(capsys, needle)
        assert not fresh.exists() or not any(fresh.rglob("*")), (what, sorted(fresh.rglob("*")))


# -----------------------------------------------------------------------------
# launch.sh: forward the stop signal, requeue under SLURM
# -----------------------------------------------------------------------------
def test_launch_sh_forwards_the_signal_and_requeues(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import time

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # A stand-in for the launcher: on SIGTERM it passes SIGUSR1 to its one "worker", which saves (a
    # marker) and exits 75, and it waits for that worker.
    torchrun = bin_dir / "fake_torchrun"
    torchrun.write_text(f"""#!/usr/bin/env bash
bash -c 'trap "echo saved > {tmp_path}/saved; exit 75" USR1; touch {tmp_path}/ready; while true; do sleep 0.05; done' &
worker=$!
trap 'kill -USR1 $worker' TERM
while kill -0 $worker 2>/dev/null; do wait $worker || true; done
wait $worker
""")
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/usr/bin/env bash\n[[ $1 == show ]] && echo 'JobId=123 Requeue=0' && exit 0\n"
                        f"echo \"$@\" > {tmp_path}/scontrol\n")
    for script in (torchrun, scontrol):
        script.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TORCHRUN=str(torchrun), NPROC_PER_NODE="1",
               SLURM_JOB_ID="123", SLURM_NODEID="0", SLURM_JOB_NUM_NODES="1", MASTER_ADDR="127.0.0.1")
    proc = subprocess.Popen(["bash", str(REPO_ROOT / "launch.sh"), "--cfg", "x.yaml"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):
            if (tmp_path / "ready").exists():
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, output
    assert (tmp_path / "saved").read_text().strip() == "saved"
    assert (tmp_path / "scontrol").read_text().split() == ["requeue", "123"]
    assert "SLURM job 123 cannot be requeued (Requeue=0)" in output and "#SBATCH --requeue" in output


def test_launch_sh_keeps_relative_paths_relative_to_where_it_runs(tmp_path: Path) -> None:
    """launch.sh runs main.py by its absolute path from the caller's directory, as torchrun does."""
    import os
    import subprocess

    torchrun = tmp_path / "fake_torchrun"
    torchrun.write_text(f'#!/usr/bin/env bash\necho "$PWD" > {tmp_path}/cwd\nprintf "%s\\n" "$@" > {tmp_path}/args\n')
    torchrun.chmod(0o755)
    work = tmp_path / "myexp"
    work.mkdir()
    env = dict(os.environ, TORCHRUN=str(torchrun), NPROC_PER_NODE="1")
    env.pop("SLURM_JOB_ID", None)
    result = subprocess.run(["bash", str(REPO_ROOT / "launch.sh"), "--cfg", "my.yaml", "--data-path", "./data",
                             "--output", "./out"], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cwd").read_text().strip() == str(work)
    args = (tmp_path / "args").read_text().split("\n")
    main_index = args.index(str(REPO_ROOT / "main.py"))
    assert args[main_index + 1:main_index + 7] == ["--cfg", "my.yaml", "--data-path", "./data", "--output", "./out"]


def test_the_launcher_adds_a_line_only_for_exits_we_did_not_explain() -> None:
    from utils.launch import exit_code, failure_line
    from utils.reliability import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_PREEMPTED

    for code in (EXIT_ERROR, EXIT_PREEMPTED, EXIT_INTERRUPTED):  # the worker's own line says why
        assert failure_line(0, 123, code) is None and exit_code(code) == code
    killed = failure_line(1, 456, -9)
    assert killed.startswith("launch: local rank 1 (pid 456) on ") and "was killed by SIGKILL" in killed
    assert "out-of-memory" in killed and exit_code(-9) == 137
    assert "exited with code 2;" in failure_line(0, 7, 2)


def test_torch_distributed_launch_local_rank_flag_is_accepted() -> None:
    """Swin's ``python -m torch.distributed.launch ... main.py`` passes --local-rank / --local_rank."""
    from config import parse_option

    assert parse_option(["--cfg", "x.yaml", "--local-rank=1"]).local_rank == 1
    assert parse_option(["--cfg", "x.yaml", "--local_rank", "0"]).local_rank == 0
    assert parse_option(["--cfg", "x.yaml"]).local_rank is None


def test_loader_workers_ignore_stop_signals() -> None:
    """A job-wide SIGTERM, or a terminal's Ctrl-C (SIGINT to the whole process group), must not kill
    the DataLoader workers before the trainer has saved."""
    import subprocess
    import sys
    import time

    code = ("import time; from data.torch_loader import init_worker; init_worker(0); "
            "print('ready', flush=True); time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=str(REPO_ROOT),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        for stop_signal in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            proc.send_signal(stop_signal)
        time.sleep(0.5)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_restarted_ranks_use_a_store_namespace_of_their_restart(monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Under torchrun's shared store each restart gets its own key space (stale peer addresses
    of the dead attempt stay invisible); across nodes, where restart counts differ, a warning."""
    import datetime

    import torch.distributed as dist

    from utils.distributed import _restart_scoped_agent_store

    timeout = datetime.timedelta(seconds=5)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert _restart_scoped_agent_store(2, timeout) is None  # plain env:// (no torchrun agent)
    server = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timeout)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    server.set("default_pg/rank_1", "dead attempt's address")
    stores = {}
    for restart in ("0", "1"):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", restart)
        stores[restart] = _restart_scoped_agent_store(2, timeout)
    stores["0"].set("rank_1", "attempt 0")
    assert not stores["1"].check(["rank_1"]) and not stores["1"].check(["default_pg/rank_1"])
    stores["1"].set("rank_1", "attempt 1")
    assert stores["0"].get("rank_1") == b"attempt 0" and stores["1"].get("rank_1") == b"attempt 1"
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    with caplog.at_level("WARNING"):
        assert _restart_scoped_agent_store(4, timeout) is None  # 2 of 4 ranks on this node
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in caplog.text


def test_a_new_experiment_in_an_old_run_directory_is_refused_with_the_differences(
        cfg: Path, tmp_path: Path, capsys: pytest.CaptureFixture, restore_logging: None) -> None:
    """Auto-resume compares the run's identity (model, data, image size) with the checkpoint's."""
    out = tmp_path / "out"
    run_dir = out / MODEL_DIR / "default"
    assert _run(cfg, out, "TRAIN.STOP_AFTER_STEPS", "2") == 0
    before = {name: (run_dir / name).read_bytes() for name in ("last.pth", "config.yaml")}
    capsys.readouterr()
    assert _run(cfg, out, "DATA.IMG_SIZE", "64", "MODEL.NUM_CLASSES", "7") == 1
    _one_line_error(capsys, "another run", "MODEL.NUM_CLASSES 10 -> 7", "DATA.IMG_SIZE 32 -> 64", "--tag NAME",
                    f"--pretrained {run_dir / 'last.pth'}")
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    # A data path for a dataset that reads no folder is an error, not silently ignored.
    assert _run(cfg, out, extra=("--data-path", str(tmp_path))) == 1
    _one_line_error(capsys, "DATA.DATA_PATH", "DATA.DATASET='synthetic' reads no folder", "DATA.DATASET imagenet")
    # The same experiment, or another tag, still runs.
    assert _run(cfg, out, "DATA.IMG_SIZE", "64", extra=("--tag", "size64")) == 0


def test_eval_and_pretrained_take_the_ema_weights_when_asked(cfg: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture,
                                                            restore_logging: None) -> None:
    """--use-ema picks a checkpoint's EMA weights for --pretrained (and so for --eval); --eval logs
    the checkpoint's real position and warns at another image size."""
    import json

    out = tmp_path / "out"
    run_dir = out / MODEL_DIR / "default"
    assert _run(cfg, out, "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0") == 0
    ema_best = run_dir / "ema_best.pth"
    capsys.readouterr()

    def evaluate(*extra: str, opts: Tuple[str, ...] = ()) -> dict:
        assert _run(cfg, tmp_path / "eval", *opts, extra=("--eval", *extra)) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    both = evaluate("--resume", str(ema_best))
    assert both["weights"] == "model" and isinstance(both["val_count"], int)
    assert both["val_acc1"] != both["ema_val_acc1"] or both["val_loss"] != both["ema_val_loss"]
    raw = evaluate("--pretrained", str(ema_best))
    ema = evaluate("--pretrained", str(ema_best), "--use-ema")
    assert (raw["weights"], ema["weights"]) == ("model", "ema")
    assert (raw["val_acc1"], raw["val_loss"]) == (both["val_acc1"], both["val_loss"])
    assert (ema["val_acc1"], ema["val_loss"]) == (both["ema_val_acc1"], both["ema_val_loss"])
    log = (tmp_path / "eval" / MODEL_DIR / "default" / "log.txt").read_text()
    assert f"evaluating the weights of {ema_best}: after epoch 0, global step 8" in log
    assert f"loaded the EMA weights of {ema_best}" in log
    evaluate("--resume", str(ema_best), opts=("DATA.IMG_SIZE", "64"))
    assert f"evaluating {ema_best} at 64 px, but it was trained at 32 px" in \
        (tmp_path / "eval" / MODEL_DIR / "default" / "log.txt").read_text()


def test_use_ema_on_a_checkpoint_without_ema_is_one_line(cfg: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         restore_logging: None) -> None:
    out = tmp_path / "out"
    assert _run(cfg, out, "TRAIN.STOP_AFTER_STEPS", "1", "TRAIN.EMA.ENABLE", "False") == 0
    last = out / MODEL_DIR / "default" / "last.pth"
    capsys.readouterr()
    assert _run(cfg, tmp_path / "eval", extra=("--eval", "--pretrained", str(last), "--use-ema")) == 1
    _one_line_error(capsys, f"{last} holds no EMA weights", "drop --use-ema")


def test_changed_settings_on_resume_take_effect_or_are_refused(cfg: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture,
                                                               restore_logging: None) -> None:
    """A finished run says so; more epochs rebuild the LR schedule at the current step (not the old
    minimum LR); an optimizer hyperparameter change is refused with the fix; config.yaml follows."""
    from config import load_config
    from optim import build_optimizer, build_scheduler

    out = tmp_path / "out"
    run_dir = out / MODEL_DIR / "default"
    assert _run(cfg, out) == 0  # 2 epochs of 8 steps
    assert _run(cfg, out) == 0
    log = (run_dir / "log.txt").read_text()
    assert "the run has trained 2 epochs (0..1), TRAIN.EPOCHS=2: nothing to train, nothing written" in log
    assert "training epochs 2..1" not in log

    capsys.readouterr()
    config_yaml = (run_dir / "config.yaml").read_text()
    assert _run(cfg, out, "TRAIN.WEIGHT_DECAY", "0.1") == 1
    _one_line_error(capsys, "TRAIN.WEIGHT_DECAY 0.05 -> 0.1 cannot take effect on resume", "--pretrained",
                    "--tag NAME")
    assert (run_dir / "config.yaml").read_text() == config_yaml

    assert _run(cfg, out, "TRAIN.EPOCHS", "3", "TRAIN.BASE_LR", "1e-3", extra=("--resume-changed",)) == 0
    log = (run_dir / "log.txt").read_text().split("resumed from")[-1]
    assert "resuming with changed settings (checkpoint -> now): TRAIN.BASE_LR 0.0005 -> 0.001; TRAIN.EPOCHS 2 -> 3" \
        in log and "the LR schedule is rebuilt from the new settings (TRAIN.EPOCHS 3)" in log
    assert "EPOCHS: 3" in (run_dir / "config.yaml").read_text()
    # The third epoch followed the new 3-epoch schedule at the new LR from global step 16 on: the
    # LR logged at step 18 is the schedule's value after step 17, far above the old minimum.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    new = load_config(str(cfg), ["TRAIN.EPOCHS", "3", "TRAIN.BASE_LR", "1e-3"])
    optimizer = build_optimizer(new, torch.nn.Linear(2, 2))
    build_scheduler(new, optimizer, 8).step_update(17)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/lr")}
    assert logged[18] == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-6)
    rows = _metrics(run_dir)
    assert [row["epoch"] for row in rows] == [0, 1, 2] and logged[18] > 10 * rows[1]["lr"]


def test_every_epoch_point_survives_a_resume_in_tensorboard(cfg: Path, tmp_path: Path, restore_logging: None) -> None:
    """A run that died in epoch 1 before any save of that epoch resumes from the end of epoch 0:
    epoch 0's TensorBoard points (logged at that very step) must survive the purge."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    run_dir = out / MODEL_DIR / "default"
    assert _run(cfg, out, "TRAIN.STOP_AFTER_STEPS", "10") == 0
    (run_dir / "last.pth").unlink()  # as if killed in epoch 1 before it saved: epoch_0000.pth is newest
    assert _run(cfg, out) == 0
    assert "resumed from" in (run_dir / "log.txt").read_text()
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("epoch/val_acc1")] == [
        (8 * (row["epoch"] + 1), pytest.approx(row["val_acc1"])) for row in _metrics(run_dir)]
    assert [e.step for e in events.Scalars("train/loss")] == list(range(2, 17, 2))  # PRINT_FREQ 2, no repeats


def _metrics(run_dir: Path) -> List[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_stop_vote_side_group_gets_the_runs_collective_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """With NCCL the stop vote runs on a gloo side group: it must time out after DIST.TIMEOUT_S, not
    after torch's 30-minute default for a new group."""
    import datetime

    import utils.distributed as distributed

    monkeypatch.setenv("WORLD_SIZE", "1")
    for name in ("_timeout", "_host_group", "_host_group_ready"):  # restored afterwards
        monkeypatch.setattr(distributed, name, getattr(distributed, name))
    distributed.init_distributed(timeout_s=7)  # alone: records the timeout, joins no group
    created = {}
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    distributed._host_group_ready = False
    monkeypatch.setattr(distributed.dist, "get_backend", lambda *args: "nccl")
    monkeypatch.setattr(distributed.dist, "new_group", lambda **kwargs: created.update(kwargs) or "side group")
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda tensor, op, group: created.update(group=group))
    assert distributed.all_reduce_max_on_host([1, 0]) == [1, 0]
    assert created == {"backend": "gloo", "timeout": datetime.timedelta(seconds=7), "group": "side group"}


def test_launch_sh_refuses_a_node_rank_outside_nnodes(tmp_path: Path) -> None:
    import os
    import subprocess

    for nnodes, node_rank in (("2", "2"), ("2", "-1"), ("two", "0")):
        env = dict(os.environ, NNODES=nnodes, NODE_RANK=node_rank, MASTER_ADDR="127.0.0.1", TORCHRUN="true")
        env.pop("SLURM_JOB_ID", None)
        result = subprocess.run(["bash", str(REPO_ROOT / "launch.sh"), "--cfg", "x.yaml"], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and result.stderr.splitlines() == [
            f"launch.sh: NODE_RANK={node_rank} must be a whole number below NNODES={nnodes} (node ranks are "
            "0..NNODES-1, one per node); set NODE_RANK on each node, 0 on the node whose address is MASTER_ADDR"], \
            result.stderr


_SLOW_SAVER = """
import os, signal, sys, time
got = []
for signum in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(signum, lambda s, f: got.append(s))
open(os.path.join(sys.argv[1], "ready" + os.environ["LOCAL_RANK"]), "w").close()
while not got:
    time.sleep(0.02)
time.sleep(2)  # "saving"
open(os.path.join(sys.argv[1], "saved" + os.environ["LOCAL_RANK"]), "w").close()
sys.exit(75)
"""


@pytest.mark.parametrize("signals", [("SIGTERM", "SIGTERM", "SIGTERM"), ("SIGUSR1", "SIGTERM", "SIGUSR1")])
def test_the_launcher_waits_for_its_workers_whatever_signals_follow(tmp_path: Path, signals: Tuple[str, ...]) -> None:
    """utils.launch takes the first stop signal as a stop (passed to the workers) and ignores the
    ones after it (SLURM's, launch.sh's), so it exits 75 only once every worker has saved."""
    import os
    import subprocess
    import sys
    import time

    from tests.helpers import subprocess_env

    worker = tmp_path / "worker.py"
    worker.write_text(_SLOW_SAVER)
    log = tmp_path / "launcher.log"
    with open(log, "w") as stderr:  # a file: waiting for the launcher must not wait for its workers
        proc = subprocess.Popen([sys.executable, "-m", "utils.launch", "--standalone", "--nproc_per_node=2",
                                 str(worker), str(tmp_path)], cwd=tmp_path, env=subprocess_env(),
                                stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while not ((tmp_path / "ready0").exists() and (tmp_path / "ready1").exists()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        for name in signals:  # only the launcher: it must pass the stop on
            proc.send_signal(getattr(signal, name))
            time.sleep(0.1)
        proc.wait(timeout=120)
        saved = [(tmp_path / f"saved{rank}").exists() for rank in range(2)]  # when the launcher exited
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75 and "Traceback" not in log.read_text(), log.read_text()[-3000:]
    assert saved == [True, True]
