"""AdamW parameter groups and the per-step warmup + cosine schedule (against the official formula)."""
from __future__ import annotations

import math
from typing import List, Set

import pytest
import torch
from torch import nn

from config import load_config
from optim import build_optimizer, build_scheduler, param_groups


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.table = nn.Parameter(torch.zeros(3, 4))  # 2-D but declared no-decay by the model
        self.head = nn.Linear(4, 2)

    def no_weight_decay(self) -> Set[str]:
        return {"table"}


def test_no_decay_for_1d_biases_and_model_set() -> None:
    model = _Net()
    decay, no_decay = param_groups(model, 0.05, model.no_weight_decay())
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["head.weight", "proj.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == [
        "head.bias", "norm.bias", "norm.weight", "proj.bias", "table"]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)


def test_real_model_no_decay_set_is_honoured() -> None:
    import models

    model = models.create_model("crossformerpp_s", num_classes=10, embed_dim=32, depths=[1, 1, 1, 1],
                                num_heads=[1, 2, 4, 8])
    decay, no_decay = param_groups(model, 0.05, model.no_weight_decay())
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)
    for skip in model.no_weight_decay():
        assert not any(n == skip or n.endswith("." + skip) for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_adamw_takes_betas_eps_and_scaled_lr_from_config() -> None:
    cfg = load_config(opts=["TRAIN.OPTIMIZER.BETAS", "[0.8, 0.95]", "TRAIN.OPTIMIZER.EPS", "1e-6",
                            "DATA.BATCH_SIZE", "256"])
    optimizer = build_optimizer(cfg, _Net())
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6
    assert group["lr"] == pytest.approx(cfg.TRAIN.SCALED_BASE_LR) == pytest.approx(2.5e-4)
    assert group["fused"] is True and not group["foreach"]  # torch's fused kernel on a CPU as on CUDA


def _lrs(epochs: int, warmup_epochs: int, steps_per_epoch: int, *opts: str) -> List[float]:
    cfg = load_config(opts=["TRAIN.EPOCHS", str(epochs), "TRAIN.WARMUP_EPOCHS", str(warmup_epochs),
                            "DATA.BATCH_SIZE", "512", *opts])
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=cfg.TRAIN.SCALED_BASE_LR)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    lrs = [optimizer.param_groups[0]["lr"]]  # the LR of step 0
    for step in range(1, epochs * steps_per_epoch + 1):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def official_lr(step: int, total: int, warmup: int, base: float, warm: float, floor: float) -> float:
    """The official code's LR at an optimizer step, written out from its recipe.

    Swin / CrossFormer build timm's ``CosineLRScheduler(t_initial=total_steps, lr_min=MIN_LR,
    warmup_lr_init=WARMUP_LR, warmup_t=warmup_steps, cycle_limit=1, t_in_epochs=False)``: a line
    from WARMUP_LR during the warmup, and one cosine over all steps after it.
    """
    if step < warmup:
        return warm + step * (base - warm) / warmup
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * step / total))


def test_schedule_is_the_official_formula() -> None:
    base, warm, floor = 5e-4, 5e-7, 5e-6  # the defaults, at the reference batch of 512
    steps, epochs, warmup_epochs = 7, 30, 2
    total, warmup = epochs * steps, warmup_epochs * steps
    lrs = _lrs(epochs, warmup_epochs, steps)
    checked = [0, 1, warmup - 1, warmup, warmup + 1, total // 2, total - 1, total]
    for step in checked:  # step 0, both sides of the end of the warmup, mid-run, the last steps
        assert lrs[step] == pytest.approx(official_lr(step, total, warmup, base, warm, floor), rel=1e-12), step
    assert lrs[0] == pytest.approx(warm) and lrs[-1] == pytest.approx(floor)
    assert lrs[total // 2] == pytest.approx((base + floor) / 2)  # the cosine's midpoint is mid-run
    # The whole curve, not only the checked steps.
    assert lrs == pytest.approx([official_lr(t, total, warmup, base, warm, floor) for t in range(total + 1)], rel=1e-12)


def test_schedule_warmup_prefix_shape() -> None:
    """``TRAIN.LR_SCHEDULER.WARMUP_PREFIX True``: the cosine starts at the peak after the warmup."""
    base, warm, floor = 5e-4, 5e-7, 5e-6
    steps, warmup = 7, 3 * 7
    lrs = _lrs(10, 3, steps, "TRAIN.LR_SCHEDULER.WARMUP_PREFIX", "True")
    # Linear warmup from WARMUP_LR, stepped every optimizer step (not per epoch).
    assert lrs[0] == pytest.approx(warm)
    rises = [b - a for a, b in zip(lrs[:warmup], lrs[1:warmup + 1])]
    assert all(r == pytest.approx(rises[0]) and r > 0 for r in rises)
    # Peak exactly at the end of the warmup, and no drop right after it.
    assert lrs[warmup] == pytest.approx(base)
    assert max(lrs) == pytest.approx(base)
    assert lrs[warmup + 1] == pytest.approx(floor + (base - floor) * (1 + math.cos(math.pi / (70 - warmup))) / 2)
    # Cosine: monotone down, halfway at the middle of the decay, the floor at the last step.
    decay = lrs[warmup:]
    assert all(b <= a for a, b in zip(decay, decay[1:]))
    middle = warmup + (70 - warmup) // 2
    assert lrs[middle] == pytest.approx(floor + (base - floor) * (1 + math.cos(math.pi * (middle - warmup) / 49)) / 2)
    assert lrs[-1] == pytest.approx(floor)
    assert min(lrs[warmup:]) >= floor - 1e-15
    # The prefix shape trains at a higher mean LR than the official one.
    assert sum(lrs) > sum(_lrs(10, 3, steps))


def test_schedule_without_warmup_starts_at_peak() -> None:
    lrs = _lrs(epochs=2, warmup_epochs=0, steps_per_epoch=5)
    assert lrs[0] == pytest.approx(5e-4) and lrs[-1] == pytest.approx(5e-6)


def test_schedule_state_round_trip() -> None:
    cfg = load_config(opts=["TRAIN.EPOCHS", "4", "TRAIN.WARMUP_EPOCHS", "1"])
    opt_a = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=cfg.TRAIN.SCALED_BASE_LR)
    sched_a = build_scheduler(cfg, opt_a, 10)
    for step in range(1, 16):
        sched_a.step_update(step)
    opt_b = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=cfg.TRAIN.SCALED_BASE_LR)
    sched_b = build_scheduler(cfg, opt_b, 10)
    sched_b.load_state_dict(sched_a.state_dict())
    opt_b.load_state_dict(opt_a.state_dict())
    sched_a.step_update(16)
    sched_b.step_update(16)
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"]


def test_layer_decay_scales_land_on_the_right_blocks() -> None:
    """TRAIN.LAYER_DECAY: depth d of D trains at LR x decay ** (D - d), counting the stem, every
    block and every patch merge in order; the final norm goes with the last block, the head is D."""
    import models

    torch.manual_seed(0)
    model = models.create_model("crossformerpp_s", num_classes=10, embed_dim=32, depths=[1, 1, 2, 1],
                                num_heads=[1, 2, 4, 8])
    cfg = load_config(opts=["TRAIN.LAYER_DECAY", "0.5", "TRAIN.EPOCHS", "2", "TRAIN.WARMUP_EPOCHS", "0"])
    optimizer = build_optimizer(cfg, model)
    scale = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    depth = {"patch_embed": 0, "layers.0.blocks.0": 1, "layers.0.downsample": 2, "layers.1.blocks.0": 3,
             "layers.1.downsample": 4, "layers.2.blocks.0": 5, "layers.2.blocks.1": 6, "layers.2.downsample": 7,
             "layers.3.blocks.0": 8, "norm": 8, "head": 9}
    skip = model.no_weight_decay()
    for name, param in model.named_parameters():
        prefix = next(p for p in depth if name == p or name.startswith(p + "."))
        assert scale[id(param)] == pytest.approx(0.5 ** (9 - depth[prefix])), name
        assert decay[id(param)] == (0.0 if name in skip else cfg.TRAIN.WEIGHT_DECAY), name
    # timm's scheduler applies the scales: the stem's LR is the base LR x 0.5 ** 9.
    scheduler = build_scheduler(cfg, optimizer, 4)
    scheduler.step_update(2)
    lrs = {group["lr_scale"]: group["lr"] for group in optimizer.param_groups}
    assert lrs[0.5 ** 9] == pytest.approx(lrs[1.0] * 0.5 ** 9)
