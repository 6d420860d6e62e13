"""Checkpoint files: atomic writes, auto-resume by recorded step, pruning, RNG and state round trips."""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from config import load_config
from optim import build_optimizer, build_scheduler
from training.engine import Components
from training.resume import RunCheckpoints
from training.train_state import TrainState, capture_rng_state, restore_rng_state
from utils import checkpoint as ckpt
from utils.distributed import DistInfo
from utils.file_io import atomic_save, load_file, remove_stale_temp_files


class _Run:
    """A tiny model with its optimizer, scheduler, train state and checkpoint manager on ``run_dir``."""

    def __init__(self, run_dir: Path, seed: int = 0) -> None:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
        cfg = load_config(opts=["TRAIN.EPOCHS", "3", "TRAIN.WARMUP_EPOCHS", "1", "SAVE_KEEP", "1"])
        optimizer = build_optimizer(cfg, model)
        self.parts = Components(train_model=model, criterion=nn.MSELoss(), optimizer=optimizer,
                                scheduler=build_scheduler(cfg, optimizer, 4))
        self.state = TrainState(torch.device("cpu"))
        self.manager = RunCheckpoints(str(run_dir), self.parts, self.state, cfg,
                                      DistInfo(0, 1, 0, torch.device("cpu")))

    def train_steps(self, steps: int) -> None:
        for _ in range(steps):
            loss = self.parts.model(torch.randn(5, 4)).pow(2).mean()
            loss.backward()
            self.parts.optimizer.step()
            self.parts.optimizer.zero_grad()
            self.state.global_step += 1
            self.parts.scheduler.step_update(self.state.global_step)
            self.state.loss_sum += loss.detach().double()
            self.state.loss_count += 1


def test_rng_state_round_trip_through_a_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    saved = capture_rng_state()
    torch.save(saved, tmp_path / "rng.pth")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_train_state_round_trip_is_exact(tmp_path: Path) -> None:
    run = _Run(tmp_path)
    run.train_steps(3)
    state = run.state
    state.epoch, state.batch, state.best_acc1, state.best_epoch = 1, 2, 42.0, 0
    run.manager.save_last()
    data = load_file(str(tmp_path / ckpt.LAST))
    assert data["format_version"] == ckpt.FORMAT_VERSION and data["config"]["SEED"] == 0
    assert data["world_size"] == 1 and len(data["ranks"]) == 1
    run.train_steps(2)  # the continuation of the original

    resumed = _Run(tmp_path / "other", seed=5)
    resumed.manager.load_state_dict(data)
    assert (resumed.state.epoch, resumed.state.batch, resumed.state.global_step, resumed.state.best_acc1) == \
        (1, 2, 3, 42.0)
    assert resumed.state.loss_count == 3
    resumed.train_steps(2)
    for a, b in zip(run.parts.model.parameters(), resumed.parts.model.parameters()):
        assert torch.equal(a, b)
    assert run.parts.optimizer.param_groups[0]["lr"] == resumed.parts.optimizer.param_groups[0]["lr"]
    assert torch.equal(state.loss_sum, resumed.state.loss_sum)


def test_an_optimizer_state_saved_with_another_kernel_resumes_with_this_runs(tmp_path: Path) -> None:
    """A checkpoint whose AdamW ran the foreach kernel (a CPU run before fused AdamW on CPU, or another
    device) resumes with this run's fused kernel, which skips a non-finite step on the device."""
    from training.engine import step_if_finite

    run = _Run(tmp_path)
    for group in run.parts.optimizer.param_groups:
        group.update(fused=None, foreach=True)
    run.train_steps(2)
    run.manager.save_last()
    resumed = _Run(tmp_path / "other", seed=5)
    resumed.manager.load_state_dict(load_file(str(tmp_path / ckpt.LAST)))
    assert all(g["fused"] is True and not g["foreach"] for g in resumed.parts.optimizer.param_groups)
    before = [p.detach().clone() for p in resumed.parts.model.parameters()]
    for p in resumed.parts.model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    step_if_finite(resumed.parts.optimizer, torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(before, resumed.parts.model.parameters()))
    resumed.parts.optimizer.zero_grad()
    resumed.train_steps(1)
    assert not all(torch.equal(a, b) for a, b in zip(before, resumed.parts.model.parameters()))


def test_crash_while_saving_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pth"
    atomic_save({"global_step": 1}, str(path))

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"global_step": 2}, str(path))
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"global_step": 1}
    assert os.listdir(tmp_path) == ["last.pth"]  # no temp file left behind


def test_temp_files_of_killed_writers_are_removed_and_nothing_else(tmp_path: Path) -> None:
    names = [".last.pth.tmp-999999", ".provenance.json.tmp-999999", ".config.yaml.tmp-999999",
             f".last.pth.tmp-{os.getpid()}", "last.pth", "log.txt", "notes.tmp-1"]
    for name in names:
        (tmp_path / name).write_text("x")
    remove_stale_temp_files(str(tmp_path))
    kept = [f".last.pth.tmp-{os.getpid()}", "last.pth", "log.txt", "notes.tmp-1"]  # ours, complete, not temp
    assert sorted(os.listdir(tmp_path)) == sorted(kept)


def test_auto_resume_picks_highest_step_not_newest_file(tmp_path: Path) -> None:
    run = _Run(tmp_path)
    for step, name in ((8, "epoch_0001.pth"), (12, ckpt.LAST), (4, "epoch_0000.pth")):
        run.state.global_step, run.state.epoch = step, step // 4
        run.manager.save([name])
        time.sleep(0.01)
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")  # newest file, unreadable
    (tmp_path / ".last.pth.tmp-123").write_bytes(b"half written")
    os.utime(tmp_path / "epoch_0000.pth")  # newest mtime among the valid ones, but the lowest step
    assert ckpt.find_resume_candidates(str(tmp_path)) == [str(tmp_path / name) for name in
                                                          (ckpt.LAST, "epoch_0001.pth", "epoch_0000.pth")]
    assert ckpt.find_resume_candidates(str(tmp_path / "missing")) == []


def test_non_checkpoint_is_rejected_for_resume(tmp_path: Path) -> None:
    torch.save({"model": {}}, tmp_path / "weights.pth")
    with pytest.raises(ValueError, match="use --pretrained"):
        _Run(tmp_path).manager.load_state_dict(load_file(str(tmp_path / "weights.pth")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_file(str(tmp_path / "nope.pth"))


def test_keeps_only_the_newest_epoch_checkpoints(tmp_path: Path) -> None:
    for epoch in range(5):
        (tmp_path / ckpt.epoch_checkpoint_name(epoch)).write_bytes(b"x")
    (tmp_path / ckpt.LAST).write_bytes(b"x")
    ckpt.prune_epoch_checkpoints(str(tmp_path), keep=2)
    assert sorted(os.listdir(tmp_path)) == ["epoch_0003.pth", "epoch_0004.pth", "last.pth"]


def test_extra_names_are_complete_copies(tmp_path: Path) -> None:
    _Run(tmp_path).manager.save(["epoch_0000.pth", ckpt.LAST, ckpt.BEST], prune=True)
    os.remove(tmp_path / "epoch_0000.pth")  # pruning an epoch file must not affect last / best
    for name in (ckpt.LAST, ckpt.BEST):
        assert load_file(str(tmp_path / name))["global_step"] == 0


def test_pretrained_reinitialises_a_head_of_other_classes(tmp_path: Path) -> None:
    import models

    kwargs = dict(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8])
    source = models.create_model("crossformerpp_s", num_classes=10, **kwargs)
    # An official-style file: {"model": ...} with DDP's "module." prefix.
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "official.pth")
    target = models.create_model("crossformerpp_s", num_classes=5, **kwargs)
    head_before = target.head.weight.clone()
    models.load_pretrained(target, str(tmp_path / "official.pth"))
    assert torch.equal(target.head.weight, head_before) and target.head.weight.shape[0] == 5
    for name, tensor in target.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(tensor, source.state_dict()[name]), name
    other = models.create_model("crossformerpp_s", num_classes=10, embed_dim=64, depths=[1, 1, 1, 1],
                                num_heads=[1, 2, 4, 8])
    with pytest.raises(ValueError, match="has shape .* but the model expects"):
        models.load_pretrained(other, str(tmp_path / "official.pth"))


def test_epoch_end_writes_due_files_best_files_and_keeps_the_newest_epochs(tmp_path: Path) -> None:
    """SAVE_FREQ 1, SAVE_KEEP 1: epoch and last files every epoch, best files only when they improve."""
    run = _Run(tmp_path)
    for epoch, acc1, ema_acc1 in ((0, 10.0, 5.0), (1, 8.0, 6.0), (2, 12.0, 4.0)):
        improved = run.manager.track_best(epoch, acc1, ema_acc1)
        run.state.global_step = 4 * (epoch + 1)
        run.state.start_epoch(epoch + 1)
        run.manager.save_epoch_end(epoch, improved)
        assert improved == {0: [ckpt.BEST, ckpt.EMA_BEST], 1: [ckpt.EMA_BEST], 2: [ckpt.BEST]}[epoch]
    assert sorted(os.listdir(tmp_path)) == ["best.pth", "ema_best.pth", "epoch_0002.pth", "last.pth"]
    steps = {name: load_file(str(tmp_path / name))["global_step"] for name in os.listdir(tmp_path)}
    assert steps == {"best.pth": 12, "ema_best.pth": 8, "epoch_0002.pth": 12, "last.pth": 12}
    assert (run.state.best_acc1, run.state.best_epoch, run.state.best_ema_acc1, run.state.best_ema_epoch) == \
        (12.0, 2, 6.0, 1)


def test_every_checkpoint_carries_the_provenance_stamp_and_changes_are_named(tmp_path: Path) -> None:
    from utils import provenance

    run = _Run(tmp_path)
    run.manager.save_last()
    stamp = load_file(str(tmp_path / ckpt.LAST))["provenance"]
    assert torch.__version__.startswith(stamp["packages"]["torch"]) and stamp["world_size"] == 1
    assert stamp["python"] and stamp["devices"] and "command" in stamp
    assert provenance.differences(stamp, stamp) == []
    assert provenance.differences(None, stamp) == []  # a file written without a stamp: nothing to compare
    newer = dict(stamp, packages=dict(stamp["packages"], timm="9.9.9"), git_commit="f" * 40, git_dirty=False)
    changed = provenance.differences(stamp, newer)
    assert f"timm {stamp['packages']['timm']} -> 9.9.9" in changed
    assert any(item.startswith("code ") and item.endswith("f" * 40) for item in changed)
    assert f"torch {stamp['packages']['torch']}" in provenance.describe(stamp)


def test_exported_weights_load_everywhere(tmp_path: Path) -> None:
    """deploy.export: the weights or the EMA weights of a training checkpoint, as .pth or .safetensors,
    load with torch.load(weights_only=True), --pretrained and timm.create_model(pretrained_cfg_overlay)."""
    import timm

    import models
    from timm.utils import ModelEmaV3
    from deploy.export import main as export

    kwargs = dict(num_classes=10, embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8])
    torch.manual_seed(0)
    model = models.create_model("crossformerpp_s", **kwargs)
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    ema.update(model, step=1)  # now the EMA differs from the weights
    torch.save({"format_version": 1, "model": model.state_dict(), "ema": ema.state_dict(), "config": {}},
               tmp_path / "best.pth")
    assert export([str(tmp_path / "best.pth"), str(tmp_path / "w.pth")]) == 0
    assert export([str(tmp_path / "best.pth"), str(tmp_path / "ema.safetensors"), "--ema"]) == 0
    plain = torch.load(tmp_path / "w.pth", weights_only=True)
    assert plain.keys() == model.state_dict().keys()
    assert all(torch.equal(plain[k], v) for k, v in model.state_dict().items())
    ema_weights = {k: v for k, v in ema.module.state_dict().items()}
    for path, expected in ((tmp_path / "w.pth", model.state_dict()), (tmp_path / "ema.safetensors", ema_weights)):
        loaded = models.create_model("crossformerpp_s", **kwargs)
        models.load_pretrained(loaded, str(path))
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items()), path
        via_timm = timm.create_model("crossformerpp_s", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                     **kwargs)
        assert all(torch.equal(via_timm.state_dict()[k], v) for k, v in expected.items()), path
    assert export([str(tmp_path / "w.pth"), str(tmp_path / "x.pth"), "--ema"]) == 1  # a bare file has no EMA
