"""What a user types is what runs, where commands meet: ``--eval`` of a named file in a run directory,
a second experiment in a finished run's directory, evaluation on data of other classes, one epoch
numbering everywhere, and short schedules of long recipes.

``main.main`` runs in-process (one process, the tiny model on synthetic or toy data); each test is the
user's commands in order, then what they printed and left on disk.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

from tests.helpers import MODEL_DIR, REPO_ROOT, read_metrics


def _main(*argv: str) -> int:
    import main

    return main.main(list(argv))


def _train(cfg: Path, out: Path, *opts: str, extra: Tuple[str, ...] = ()) -> int:
    return _main("--cfg", str(cfg), "--output", str(out), *extra, *(("--opts", *opts) if opts else ()))


def _error_line(capsys: pytest.CaptureFixture) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def _files(run_dir: Path) -> Dict[str, bytes]:
    """Every file of a run directory but its log, by relative path."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != "log.txt"}


@pytest.fixture
def finished(tiny_yaml: Path, tmp_path: Path, restore_logging: None, capsys: pytest.CaptureFixture) -> Path:
    """The run directory of a finished 2-epoch run of the tiny config (EMA on, mixup 0.8)."""
    assert _train(tiny_yaml, tmp_path / "out") == 0
    capsys.readouterr()
    return tmp_path / "out" / MODEL_DIR / "default"


# -----------------------------------------------------------------------------
# 1. --eval evaluates exactly the weights named
# -----------------------------------------------------------------------------
def test_eval_of_a_named_file_in_a_run_directory_evaluates_that_file(finished: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """The README's "Evaluate the EMA weights of a run": the run's config.yaml, its ema_best.pth, --use-ema."""
    run_dir, ema_best = finished, finished / "ema_best.pth"
    config_yaml = str(run_dir / "config.yaml")
    assert _main("--cfg", config_yaml, "--eval", "--pretrained", str(ema_best), "--use-ema") == 0
    ema = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (ema["checkpoint"], ema["weights"]) == (str(ema_best), "ema")
    log = (run_dir / "log.txt").read_text().split("loaded the EMA weights of")[-1]
    assert str(ema_best) in log.splitlines()[0] and "last.pth" not in log
    assert f"eval of the EMA weights of {ema_best}: acc@1 {ema['val_acc1']:.3f}" in log
    # The same file's EMA, evaluated beside its weights through --resume: the same numbers.
    assert _main("--cfg", config_yaml, "--eval", "--resume", str(ema_best)) == 0
    both = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (both["checkpoint"], both["weights"]) == (str(ema_best), "model")
    assert (both["ema_val_acc1"], both["ema_val_loss"]) == (ema["val_acc1"], ema["val_loss"])
    # Weights trained on 10 classes, evaluated with 5: nothing asked to resume, so nothing is resumed.
    assert _main("--cfg", config_yaml, "--eval", "--pretrained", str(run_dir / "best.pth"),
                 "--opts", "MODEL.NUM_CLASSES", "5") == 0
    captured = capsys.readouterr()
    assert "cannot resume" not in captured.err + (run_dir / "log.txt").read_text()
    assert json.loads(captured.out.strip().splitlines()[-1])["checkpoint"] == str(run_dir / "best.pth")


def test_eval_without_a_named_file_is_one_line_naming_both_ways(finished: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    assert _main("--cfg", str(finished / "config.yaml"), "--eval") == 1
    line = _error_line(capsys)
    assert "--eval found no weights to evaluate" in line and "--resume FILE" in line and "--pretrained FILE" in line
    assert f"the newest checkpoint of {finished} is {finished / 'last.pth'}" in line


# -----------------------------------------------------------------------------
# 2. A second experiment in the same run directory
# -----------------------------------------------------------------------------
def test_another_recipe_in_a_finished_run_directory_is_refused_and_writes_nothing(
        tiny_yaml: Path, finished: Path, capsys: pytest.CaptureFixture) -> None:
    out, before = finished.parents[1], _files(finished)
    assert _train(tiny_yaml, out, "TRAIN.BASE_LR", "4e-3") == 1
    line = _error_line(capsys)
    assert f"cannot resume {finished / 'last.pth'}" in line and "TRAIN.BASE_LR 0.0005 -> 0.004" in line
    assert "--tag NAME" in line and "--resume-changed" in line
    # A longer run with another augmentation: only the recipe change is named, TRAIN.EPOCHS may change.
    assert _train(tiny_yaml, out, "AUG.MIXUP", "0.0", "TRAIN.EPOCHS", "3") == 1
    line = _error_line(capsys)
    assert "(AUG.MIXUP 0.8 -> 0.0)" in line and "TRAIN.EPOCHS" not in line
    # The finished run rerun as it is, or with a step limit it has passed, trains nothing and writes nothing.
    assert _train(tiny_yaml, out) == 0
    assert "nothing to train, nothing written" in (finished / "log.txt").read_text()
    assert _train(tiny_yaml, out, "TRAIN.EPOCHS", "3", "TRAIN.STOP_AFTER_STEPS", "4") == 0
    assert ("the checkpoint resumed is at global step 16, TRAIN.STOP_AFTER_STEPS=4: nothing to train, nothing "
            "written") in (finished / "log.txt").read_text()
    assert _files(finished) == before
    # --tag: the new experiment gets its own directory.
    assert _train(tiny_yaml, out, "TRAIN.BASE_LR", "4e-3", "TRAIN.EPOCHS", "1", extra=("--tag", "lr4e-3")) == 0
    assert _files(finished) == before


def test_resume_changed_continues_and_the_records_keep_the_history(tiny_yaml: Path, finished: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    out = finished.parents[1]
    rows_before = read_metrics(finished)
    command = ("AUG.MIXUP", "0.0", "TRAIN.EPOCHS", "3")
    assert _train(tiny_yaml, out, *command, extra=("--resume-changed",)) == 0
    change = {"position": "after epoch 1", "global_step": 16, "changes": {"AUG.MIXUP": [0.8, 0.0],
                                                                          "TRAIN.EPOCHS": [2, 3]}}
    # config.yaml: the new values, the change in its header, and not the per-command switch.
    text = (finished / "config.yaml").read_text()
    assert "#   from after epoch 1 (global step 16): AUG.MIXUP 0.8 -> 0.0; TRAIN.EPOCHS 2 -> 3; by: " in text
    from config import load_config

    again = load_config(str(finished / "config.yaml"))
    assert (again.AUG.MIXUP, again.TRAIN.EPOCHS, again.TRAIN.RESUME_CHANGED) == (0.0, 3, False)
    # provenance.json and the checkpoints carry the history; earlier rows of metrics.jsonl are kept.
    history = json.loads((finished / "provenance.json").read_text())["config_history"]
    last = torch.load(finished / "last.pth", weights_only=True)
    for entries in (history, last["config_history"]):
        assert [{k: e[k] for k in change} for e in entries] == [change]
        assert entries[0]["command"]  # the command line that made the change (here pytest's: main runs in-process)
    rows = read_metrics(finished)
    assert rows[:2] == rows_before and [row["epoch"] for row in rows] == [0, 1, 2]
    assert rows[2]["config_changes"] == {"position": "after epoch 1", "global_step": 16, "AUG.MIXUP": [0.8, 0.0],
                                         "TRAIN.EPOCHS": [2, 3]}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(finished / "tensorboard"))
    events.Reload()
    notes = [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors("config_changes/text_summary")]
    assert len(notes) == 1 and notes[0][0] == 16 and "AUG.MIXUP 0.8 -> 0.0" in notes[0][1]
    # Extending the run further needs no switch, and adds its own entry.
    assert _train(tiny_yaml, out, "AUG.MIXUP", "0.0", "TRAIN.EPOCHS", "4") == 0
    last = torch.load(finished / "last.pth", weights_only=True)
    assert [e["changes"] for e in last["config_history"]] == [change["changes"], {"TRAIN.EPOCHS": [3, 4]}]


# -----------------------------------------------------------------------------
# 5. Evaluating on data with other classes
# -----------------------------------------------------------------------------
def test_eval_on_data_of_other_classes_warns(toy_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                             restore_logging: None) -> None:
    cfg = REPO_ROOT / "configs" / "demo.yaml"
    data_opts = ("DATA.DATASET", "imagenet", "DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "0", "DATA.BATCH_SIZE", "16",
                 "MODEL.CROSSFORMER.DEPTHS", "[1, 1, 1, 1]")
    out = tmp_path / "out"
    assert _train(cfg, out, *data_opts, "TRAIN.STOP_AFTER_STEPS", "1", extra=("--data-path", str(toy_folder))) == 0
    last = out / MODEL_DIR / "demo" / "last.pth"
    digits = tmp_path / "digits"  # the same images under class folders 0..9 (a folder of digit scans)
    for split in ("train", "val"):
        for label, folder in enumerate(sorted((toy_folder / split).iterdir())):
            shutil.copytree(folder, digits / split / str(label))
    stored = torch.load(last, weights_only=True)["class_names"]

    def evaluate(data: Path, *weights: str) -> str:
        capsys.readouterr()
        assert _main("--cfg", str(cfg), "--output", str(tmp_path / "eval"), "--data-path", str(data), "--eval",
                     *weights, "--opts", *data_opts) == 0
        return (tmp_path / "eval" / MODEL_DIR / "demo" / "log.txt").read_text()

    for weights in (("--resume", str(last)), ("--pretrained", str(last))):
        log = evaluate(digits, *weights)
        assert (f"the weights of {last} were trained on other classes than this data's (10 of 10 labels name other "
                f"classes, e.g. label 0 is '0' in the data and {stored[0]!r} in the checkpoint)") in log
    (tmp_path / "eval" / MODEL_DIR / "demo" / "log.txt").unlink()
    assert "other classes" not in evaluate(toy_folder, "--resume", str(last))


# -----------------------------------------------------------------------------
# 6. One epoch numbering in logs, checkpoints, metrics.jsonl and --eval
# -----------------------------------------------------------------------------
def test_the_best_epoch_is_the_same_number_in_the_log_the_checkpoint_metrics_and_eval(
        tiny_yaml: Path, finished: Path, capsys: pytest.CaptureFixture) -> None:
    import re

    log = (finished / "log.txt").read_text()
    best_epoch = int(re.search(r"done in \S+: best acc@1 [\d.]+ \(epoch (\d+)\)", log).group(1))
    best = torch.load(finished / "best.pth", weights_only=True)
    assert (best["epoch"], best["epoch_complete"], best["best_epoch"]) == (best_epoch, True, best_epoch)
    rows = read_metrics(finished)
    assert [row["epoch"] for row in rows] == [0, 1]
    assert rows[best_epoch]["global_step"] == best["global_step"] == 8 * (best_epoch + 1)
    epoch0 = torch.load(finished / "epoch_0000.pth", weights_only=True)
    assert (epoch0["epoch"], epoch0["batch"], epoch0["epoch_complete"], epoch0["global_step"]) == (0, 8, True, 8)
    assert "saved epoch_0000.pth, last.pth, best.pth, ema_best.pth (after epoch 0, step 8)" in log
    assert _main("--cfg", str(finished / "config.yaml"), "--eval", "--resume", str(finished / "best.pth")) == 0
    assert (f"evaluating the weights of {finished / 'best.pth'}: after epoch {best_epoch}, global step "
            f"{8 * (best_epoch + 1)}") in (finished / "log.txt").read_text()


def test_a_format_1_checkpoint_resumes_where_it_said(tiny_yaml: Path, finished: Path, tmp_path: Path) -> None:
    """Format 1 stored the epoch to resume at (epoch 1, batch 0 after epoch 0): still read as such."""
    old = torch.load(finished / "epoch_0000.pth", weights_only=True)
    old.update(format_version=1, epoch=1, batch=0)
    for key in ("epoch_complete", "config_history"):
        del old[key]
    run_dir = tmp_path / "old" / MODEL_DIR / "default"
    run_dir.mkdir(parents=True)
    torch.save(old, run_dir / "last.pth")
    assert _train(tiny_yaml, tmp_path / "old") == 0
    assert f"resumed from {run_dir / 'last.pth'}: after epoch 0, global step 8" in (run_dir / "log.txt").read_text()
    assert [row["epoch"] for row in read_metrics(run_dir)] == [1]
    last = torch.load(run_dir / "last.pth", weights_only=True)
    assert (last["format_version"], last["epoch"], last["epoch_complete"], last["global_step"]) == (3, 1, True, 16)


# -----------------------------------------------------------------------------
# 9. Short schedules of long recipes
# -----------------------------------------------------------------------------
def test_a_run_shorter_than_its_warmup_trains_with_the_warmup_shortened(tiny_yaml: Path, tmp_path: Path,
                                                                        restore_logging: None) -> None:
    """TRAIN.EPOCHS 1 of a config with a 1-epoch warmup (the demo's), and TRAIN.EPOCHS 2 of transfer_small.yaml
    (5 warmup epochs)."""
    from config import load_config
    from optim import build_optimizer, build_scheduler, warmup_epochs

    out = tmp_path / "out"
    assert _train(tiny_yaml, out, "TRAIN.EPOCHS", "1") == 0
    run_dir = out / MODEL_DIR / "default"
    assert ("TRAIN.WARMUP_EPOCHS=1 does not end before the last of TRAIN.EPOCHS=1 epochs: the warmup is shortened "
            "to 0 epoch(s)") in (run_dir / "log.txt").read_text()
    # The one epoch ran the cosine from the base LR, with no warmup line below it.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    lrs: List[float] = [e.value for e in events.Scalars("train/lr")]
    config = load_config(str(run_dir / "config.yaml"))
    assert config.TRAIN.WARMUP_EPOCHS == 1  # config.yaml keeps what was entered; the schedule is a function of it
    scheduler = build_scheduler(config, build_optimizer(config, torch.nn.Linear(2, 2)), 8)
    optimizer = scheduler.optimizer
    expected = []
    for step in (2, 4, 6, 8):  # PRINT_FREQ 2: the LR logged at a step is the schedule's value after the step before
        scheduler.step_update(step - 1)
        expected.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx(expected, rel=1e-6) and lrs[0] > 0.5 * config.TRAIN.SCALED_BASE_LR
    transfer = load_config(str(REPO_ROOT / "configs" / "transfer_small.yaml"), ["TRAIN.EPOCHS", "2"])
    assert (transfer.TRAIN.WARMUP_EPOCHS, warmup_epochs(transfer)) == (5, 1)
