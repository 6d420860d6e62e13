"""Engine pieces in one process: accumulation, exact evaluation, --throughput, --eval, error lines."""
from __future__ import annotations

import copy
import shlex
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from config import load_config
from tests.helpers import TinyRun, last_json, read_metrics, run_main
from training.engine import Components, StopReason, evaluate, train_one_epoch
from training.train_state import TrainState

Batch = Tuple[torch.Tensor, torch.Tensor]


class _ListLoader:
    def __init__(self, batches: List[Batch]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)


class _NoSchedule:
    def step_update(self, num_updates: int) -> None:
        pass


def _tiny_model() -> nn.Module:
    import models

    torch.manual_seed(0)
    return models.create_model("crossformerpp_s", num_classes=10, embed_dim=32, depths=[1, 1, 1, 1],
                               num_heads=[1, 2, 4, 8], drop_path_rate=0.0)


def _one_step(model: nn.Module, batches: List[Batch], accumulation: int) -> TrainState:
    cfg = load_config(opts=["TRAIN.ACCUMULATION_STEPS", str(accumulation), "TRAIN.CLIP_GRAD", "0.0",
                            "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "PRINT_FREQ", "100"])
    parts = Components(train_model=model, criterion=nn.CrossEntropyLoss(),
                       optimizer=torch.optim.SGD(model.parameters(), lr=1.0), scheduler=_NoSchedule())
    state = TrainState(torch.device("cpu"))
    assert train_one_epoch(parts, _ListLoader(batches), state, cfg) is StopReason.COMPLETED
    return state


def test_accumulation_equals_the_large_batch_gradient() -> None:
    torch.manual_seed(1)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    big = _tiny_model()
    accumulated = copy.deepcopy(big)
    _one_step(big, [(images, labels)], accumulation=1)
    state = _one_step(accumulated, [(images[:4], labels[:4]), (images[4:], labels[4:])], accumulation=2)
    assert state.global_step == 1  # two micro-batches, one optimizer step
    for (name, a), b in zip(big.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_last_short_group_still_steps_with_its_own_mean() -> None:
    """In float64, so that the two summation orders' rounding (SGD at LR 1 for two steps) stays far
    below the tolerance and only the grouping is tested."""
    torch.manual_seed(2)
    images, labels = torch.randn(12, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (12,))
    reference = _tiny_model().double()
    grouped = copy.deepcopy(reference)
    _one_step(reference, [(images[:8], labels[:8])], accumulation=1)
    _one_step(reference, [(images[8:], labels[8:])], accumulation=1)
    state = _one_step(grouped, [(images[i:i + 4], labels[i:i + 4]) for i in (0, 4, 8)], accumulation=2)
    assert state.global_step == 2
    for a, b in zip(reference.parameters(), grouped.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_evaluate_counts_every_sample_once_with_uneven_batches() -> None:
    torch.manual_seed(3)
    logits = torch.randn(23, 7)
    labels = torch.randint(0, 7, (23,))

    class Fixed(nn.Module):
        def forward(self, index: torch.Tensor) -> torch.Tensor:
            return logits[index]

    batches = [(torch.arange(s, min(s + 5, 23)), labels[s:s + 5]) for s in range(0, 23, 5)]  # 5,5,5,5,3
    stats = evaluate(Fixed(), _ListLoader(batches), torch.device("cpu"))
    top5 = logits.topk(5, dim=1).indices
    assert stats["count"] == 23
    assert stats["acc1"] == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item())
    assert stats["acc5"] == pytest.approx(100 * (top5 == labels[:, None]).any(1).float().mean().item())
    assert stats["loss"] == pytest.approx(F.cross_entropy(logits, labels).item())


def test_a_compiled_model_validates_with_one_graph_and_the_eager_numbers() -> None:
    """21 validation images in batches of 8: the last batch (5) is padded, so the compiled model
    keeps the one graph it compiled for 8 (dynamo's counters), and the numbers equal the eager model's."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch.manual_seed(7)
    model = _tiny_model()
    batches = [(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))) for n in (8, 8, 5)]
    eager = evaluate(model, _ListLoader(batches), torch.device("cpu"))
    torch._dynamo.reset()
    counters.clear()
    compiled = evaluate(torch.compile(model, backend="eager"), _ListLoader(batches), torch.device("cpu"))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    # The counts and accuracies exactly; the loss to float32 rounding (under torch.compile torch 2.11
    # runs fc2 + residual as two ops where eager fuses them: models/cpu_kernels.py).
    assert {**compiled, "loss": None} == {**eager, "loss": None} and eager["count"] == 21
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-6)
    torch._dynamo.reset()


def test_throughput_prints_a_table_and_json_last(tiny_yaml: Path, tmp_path: Path) -> None:
    result = run_main("--cfg", str(tiny_yaml), "--throughput", "--batch-size", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    report = last_json(result.stdout)
    assert {"infer_imgs_per_sec", "train_imgs_per_sec", "batch_size", "amp", "device"} <= set(report)
    assert report["batch_size"] == 4 and report["amp"] == "none" and report["device"] == "cpu"
    assert report["infer_imgs_per_sec"] > 0 and report["train_imgs_per_sec"] > 0
    assert any(line.startswith("train_imgs_per_sec") for line in lines[:-1])  # the table
    assert not (tmp_path / "output").exists()  # a benchmark writes no run directory


def test_a_finished_run_says_where_its_outputs_are_and_how_to_evaluate(tiny_run: TinyRun, tmp_path: Path) -> None:
    """The closing lines name existing paths, and the printed command evaluates the best checkpoint."""
    log = tiny_run.stdout + tiny_run.stderr
    run_dir = tiny_run.run_dir
    assert f"run directory:   {run_dir}" in log
    assert f"tensorboard --logdir {run_dir / 'tensorboard'}" in log and any((run_dir / "tensorboard").iterdir())
    assert f"best checkpoint: {run_dir / 'best.pth'}" in log and (run_dir / "best.pth").is_file()
    command = shlex.split(log.split("evaluate it:")[1].splitlines()[0])
    assert command[:2] == ["python", "main.py"]
    evaluated = run_main(*command[2:], "--output", str(tmp_path / "eval"), cwd=tmp_path)  # the run stays as it is
    assert evaluated.returncode == 0, evaluated.stderr
    best = max(row["val_acc1"] for row in read_metrics(run_dir))
    assert last_json(evaluated.stdout)["val_acc1"] == pytest.approx(best)


def test_eval_precision_follows_test_amp(tiny_run: TinyRun, tmp_path: Path, capsys: pytest.CaptureFixture,
                                        restore_logging: None) -> None:
    """--eval runs in TRAIN.AMP's precision by default and in float32 with TEST.AMP none."""
    import main

    out, tiny_yaml = str(tmp_path / "out"), tiny_run.yaml
    checkpoint = str(tiny_run.run_dir / "last.pth")

    def evaluate_with(*opts: str) -> Tuple[int, str, str]:
        """main.py --eval in this process: (exit code, stdout, stderr)."""
        code = main.main(["--cfg", str(tiny_yaml), "--eval", "--resume", checkpoint, "--output", out, "--opts", *opts])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    reports = {}
    for test_amp in ("train", "none"):
        # TRAIN.FORCE_BF16: bf16 also where this CPU only emulates it (utils.precision.resolve_amp)
        code, stdout, stderr = evaluate_with("TRAIN.AMP", "bf16", "TRAIN.FORCE_BF16", "True", "TEST.AMP", test_amp)
        assert code == 0, stderr
        reports[test_amp] = last_json(stdout)
    assert reports["train"]["amp"] == "bf16" and reports["none"]["amp"] == "none"
    assert reports["train"]["val_count"] == reports["none"]["val_count"] == 21
    # The same weights: bf16 rounding moves the loss a little, float32 does not round at all.
    assert reports["train"]["val_loss"] != reports["none"]["val_loss"]
    assert abs(reports["train"]["val_loss"] - reports["none"]["val_loss"]) < 0.05
    code, _, stderr = evaluate_with("TRAIN.AMP", "bf16", "TRAIN.FORCE_BF16", "True", "TEST.AMP", "fp16")
    assert code == 1 and "TEST.AMP='fp16' needs a CUDA device" in stderr
    # The config of an fp16 (GPU) run still evaluates on a CPU in float32.
    code, stdout, stderr = evaluate_with("TRAIN.AMP", "fp16", "TEST.AMP", "none")
    assert code == 0, stderr
    assert last_json(stdout)["val_loss"] == reports["none"]["val_loss"]


def test_user_errors_are_one_line_and_debug_shows_the_traceback(
        tiny_yaml: Path, tmp_path: Path, capsys: pytest.CaptureFixture, restore_logging: None) -> None:
    import main

    assert main.main(["--cfg", str(tiny_yaml), "--opts", "TRAIN.EPOCH", "3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown config key TRAIN.EPOCH" in err and "TRAIN.EPOCHS" in err
    with pytest.raises(ValueError, match="unknown config key"):
        main.main(["--cfg", str(tiny_yaml), "--opts", "TRAIN.EPOCH", "3", "--debug"])
    out = str(tmp_path / "out")
    assert main.main(["--cfg", str(tiny_yaml), "--output", out, "--opts", "TRAIN.AMP", "fp16"]) == 1
    assert "needs a CUDA device" in capsys.readouterr().err
    assert main.main(["--cfg", str(tiny_yaml), "--eval", "--output", out]) == 1
    assert "--eval found no weights" in capsys.readouterr().err


class _HugeLoss(nn.Module):
    """Cross-entropy times 1e35: finite, but fp16's scaled gradients overflow float32."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets) * 1e35


def test_a_loss_scaler_overflow_is_not_a_non_finite_step_but_a_nan_loss_is() -> None:
    """fp16's routine overflows lower the scale without counting; a NaN loss under the scaler counts."""
    torch.manual_seed(4)
    model = _tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(3)]
    scaler = torch.amp.GradScaler("cpu")
    parts = Components(train_model=model, criterion=_HugeLoss(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       scheduler=_NoSchedule(), scaler=scaler)
    state = TrainState(torch.device("cpu"))
    cfg = load_config(opts=["TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "PRINT_FREQ", "1"])
    assert train_one_epoch(parts, _ListLoader(batches), state, cfg) is StopReason.COMPLETED
    assert scaler.get_scale() == 65536.0 / 8  # three overflows, three halvings, three skipped steps
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert (state.global_step, int(state.nonfinite_total), int(state.nonfinite_streak)) == (3, 0, 0)

    parts.criterion = nn.CrossEntropyLoss()
    nan_at = load_config(opts=["TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "PRINT_FREQ", "1",
                               "TRAIN.DEBUG_NONFINITE_STEPS", "[5]"])
    state.start_epoch(0)
    assert train_one_epoch(parts, _ListLoader(batches), state, nan_at) is StopReason.COMPLETED
    assert (state.global_step, int(state.nonfinite_total), int(state.nonfinite_streak)) == (6, 1, 0)


def test_progress_shows_the_share_of_time_spent_waiting_for_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loader that takes 10 s per batch shows as most of the step time in the progress lines.

    The loader's 10 s pass on the clock the loop reads (``time.perf_counter``), not on the wall, so
    the share does not depend on how fast this machine computes the step."""
    import time as clock

    from utils.progress import EpochProgress

    real_clock, loader_seconds = clock.perf_counter, [0.0]
    monkeypatch.setattr(clock, "perf_counter", lambda: real_clock() + loader_seconds[0])

    class SlowLoader(_ListLoader):
        def __iter__(self) -> Iterator[Batch]:
            for batch in self.batches:
                loader_seconds[0] += 10.0
                yield batch

    torch.manual_seed(5)
    model = _tiny_model()
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(3)]
    parts = Components(train_model=model, criterion=nn.CrossEntropyLoss(),
                       optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scheduler=_NoSchedule())
    cfg = load_config(opts=["TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "PRINT_FREQ", "1"])
    logged: List[float] = []
    progress = EpochProgress(1, 3, 1, 20, on_scalars=lambda step, values: logged.append(
        values["train/data_wait_percent"]))
    for loader, low, high in ((SlowLoader(batches), 50, 100), (_ListLoader(batches), 0, 30)):
        logged.clear()
        state = TrainState(torch.device("cpu"))
        assert train_one_epoch(parts, loader, state, cfg, progress) is StopReason.COMPLETED
        assert len(logged) == 3 and all(low <= value <= high for value in logged), logged


def test_a_long_validation_logs_its_progress(monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from training import engine

    monkeypatch.setattr(engine, "VAL_PROGRESS_EVERY_S", 0.0)  # every batch counts as "long" here
    batches = [(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))) for _ in range(3)]
    with caplog.at_level(logging.INFO, logger="training.engine"):
        evaluate(_tiny_model(), _ListLoader(batches), torch.device("cpu"))
    assert [r.getMessage().split(" ")[1] for r in caplog.records if r.getMessage().startswith("validation")] == \
        ["[0/3]", "[1/3]", "[2/3]"]  # batches done so far


def test_a_non_finite_streak_stops_at_the_step_it_is_reached_not_at_a_log_step() -> None:
    """stopping.StopPolicy decides after every step: with PRINT_FREQ 100 the streak still stops at step 4."""
    torch.manual_seed(6)
    model = _tiny_model()
    batches = [(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))) for _ in range(8)]
    parts = Components(train_model=model, criterion=nn.CrossEntropyLoss(),
                       optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scheduler=_NoSchedule())
    cfg = load_config(opts=["TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "PRINT_FREQ", "100",
                            "TRAIN.DEBUG_NONFINITE_STEPS", "[2, 3, 4]", "TRAIN.MAX_NONFINITE_STEPS", "3"])
    state = TrainState(torch.device("cpu"))
    assert train_one_epoch(parts, _ListLoader(batches), state, cfg) is StopReason.NONFINITE
    assert (state.global_step, int(state.nonfinite_total), int(state.nonfinite_streak)) == (4, 3, 3)
    limit = load_config(opts=["TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "PRINT_FREQ", "100",
                              "TRAIN.STOP_AFTER_STEPS", "6"])
    assert train_one_epoch(parts, _ListLoader(batches), state, limit) is StopReason.STOP_AFTER_STEPS
    assert state.global_step == 6
