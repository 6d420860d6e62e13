"""The optimizers (against their reference classes), their parameter groups, and the per-step warmup + cosine
schedule (against the official formula)."""
from __future__ import annotations

import inspect
import io
import math
from typing import Dict, List, Optional, Set

import pytest
import torch
from timm.optim import Lamb, Lion
from torch import nn
from yacs.config import CfgNode

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


# -----------------------------------------------------------------------------
# The optimizers: each against its reference class, its groups, its state, its skipped steps
# -----------------------------------------------------------------------------
# TRAIN.OPTIMIZER.* settings, and the reference: the class built directly with the hyperparameters written out
# and the kernel named (the kernels' own numerics are torch's business: fused and foreach AdamW differ in rounding).
OPTIMIZERS = {
    "adamw": ([], lambda groups, lr: torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)),
    "lamb": ([], lambda groups, lr: Lamb(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6, max_grad_norm=None,
                                         foreach=True)),
    "lion": ([], lambda groups, lr: Lion(groups, lr=lr, betas=(0.9, 0.99), foreach=True)),
    "sgd": ([], lambda groups, lr: torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=False, foreach=True)),
    "sgd-nesterov": (["TRAIN.OPTIMIZER.NESTEROV", "True", "TRAIN.OPTIMIZER.MOMENTUM", "0.8"],
                     lambda groups, lr: torch.optim.SGD(groups, lr=lr, momentum=0.8, nesterov=True, foreach=True)),
}


def _config(case: str, *opts: str) -> CfgNode:
    name = case.split("-")[0]
    return load_config(opts=["TRAIN.OPTIMIZER.NAME", name, "DATA.BATCH_SIZE", "512", *OPTIMIZERS[case][0], *opts])


def _tiny(seed: int = 0) -> nn.Module:
    """_Net with its own initialisation from ``seed`` (the optimizers' tests need no CrossFormer forward)."""
    torch.manual_seed(seed)
    model = _Net()
    nn.init.normal_(model.table)
    return model


def _backward(model: nn.Module, seed: int, scaler: Optional[torch.amp.GradScaler] = None) -> None:
    generator = torch.Generator().manual_seed(seed)
    inputs, labels = torch.randn(8, 4, generator=generator), torch.randint(0, 2, (8,), generator=generator)
    hidden = model.norm(model.proj(inputs)) + model.table.sum(0)
    loss = nn.functional.cross_entropy(model.head(hidden), labels)
    (scaler.scale(loss) if scaler is not None else loss).backward()


@pytest.mark.parametrize("case", sorted(OPTIMIZERS))
def test_each_optimizer_steps_as_its_reference_class(case: str) -> None:
    """Three steps of ours equal, bitwise, the torch / timm class built directly over the same groups."""
    cfg = _config(case, "TRAIN.WEIGHT_DECAY", "0.1")
    ours_model, reference_model = _tiny(), _tiny()
    ours = build_optimizer(cfg, ours_model)
    groups = param_groups(reference_model, 0.1, reference_model.no_weight_decay())
    reference = OPTIMIZERS[case][1](groups, cfg.TRAIN.SCALED_BASE_LR)
    for step in range(3):
        for model, optimizer in ((ours_model, ours), (reference_model, reference)):
            _backward(model, step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    changed = 0
    for (name, a), b in zip(ours_model.named_parameters(), reference_model.parameters()):
        assert torch.equal(a, b), name
        changed += not torch.equal(a, _tiny().get_parameter(name))
    assert changed == len(list(ours_model.parameters()))


@pytest.mark.parametrize("case", sorted(OPTIMIZERS))
def test_no_decay_group_has_no_weight_decay_for_each_optimizer(case: str) -> None:
    model = _tiny()
    optimizer = build_optimizer(_config(case), model)
    decay, no_decay = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert sorted(names[id(p)] for p in decay["params"]) == ["head.weight", "proj.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == [
        "head.bias", "norm.bias", "norm.weight", "proj.bias", "table"]


@pytest.mark.parametrize("case", sorted(OPTIMIZERS))
def test_layer_decay_gives_every_optimizer_the_same_lr_scale_groups(case: str) -> None:
    import models

    model = models.create_model("crossformerpp_s", num_classes=10, embed_dim=32, depths=[1, 1, 1, 1],
                                num_heads=[1, 2, 4, 8])
    layered = ["TRAIN.LAYER_DECAY", "0.5"]
    groups = build_optimizer(_config(case, *layered), model).param_groups
    adamw = build_optimizer(_config("adamw", *layered), model).param_groups
    assert len(groups) == len(adamw) > 2
    for group, expected in zip(groups, adamw):  # the same fixed order of groups, scales and decays
        assert [id(p) for p in group["params"]] == [id(p) for p in expected["params"]]
        assert (group["lr_scale"], group["weight_decay"]) == (expected["lr_scale"], expected["weight_decay"])
    # The stem, 4 blocks, 3 patch merges and the head: 9 depths.
    assert sorted({group["lr_scale"] for group in groups}) == [0.5 ** d for d in range(8, -1, -1)]


@pytest.mark.parametrize("case", sorted(OPTIMIZERS))
def test_optimizer_state_survives_a_save_and_load(case: str) -> None:
    """The state through torch.save / a weights_only load (as checkpoints are read) continues bitwise."""
    cfg = _config(case)
    model = _tiny()
    optimizer = build_optimizer(cfg, model)
    for step in range(2):
        _backward(model, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    restored_model = _tiny(seed=1)
    restored_model.load_state_dict(saved["model"])
    restored = build_optimizer(cfg, restored_model)
    restored.load_state_dict(saved["optimizer"])
    assert len(restored.state) == len(list(model.parameters()))
    for m, o in ((model, optimizer), (restored_model, restored)):
        _backward(m, 2)
        o.step()
    for (name, a), b in zip(model.named_parameters(), restored_model.parameters()):
        assert torch.equal(a, b), name


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, torch.Tensor]:
    out = {f"param.{n}": p.detach().clone() for n, p in model.named_parameters()}
    for index, state in optimizer.state_dict()["state"].items():
        out.update({f"state.{index}.{k}": v.clone() for k, v in state.items() if torch.is_tensor(v)})
    return out


def _assert_same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    """Equal, except that ``b`` may hold fresh (all-zero) state that ``a`` lacks: a fused kernel creates the
    state before it skips the step, and that state is what the next step would create."""
    assert a.keys() <= b.keys()
    for key in b:
        assert torch.equal(a[key], b[key]) if key in a else not b[key].any(), key


@pytest.mark.parametrize("case", sorted(OPTIMIZERS))
@pytest.mark.parametrize("fp16", [False, True], ids=["step_if_finite", "grad_scaler"])
def test_a_non_finite_step_is_skipped_by_each_optimizer(case: str, fp16: bool) -> None:
    """A non-finite step (the first one too) leaves no trace: no weight, no state, and the next
    finite step is the one a run without it takes. Through engine.optimizer_step: the host flag or
    a fused kernel's found_inf (engine.step_if_finite), or fp16's GradScaler."""
    from training.engine import Components, optimizer_step

    cfg = _config(case)
    model, clean_model = _tiny(), _tiny()
    scaler = torch.amp.GradScaler("cpu") if fp16 else None
    parts = Components(train_model=model, criterion=None, optimizer=build_optimizer(cfg, model), scheduler=None,
                       scaler=scaler)
    clean = Components(train_model=clean_model, criterion=None, optimizer=build_optimizer(cfg, clean_model),
                       scheduler=None)
    for step in range(3):
        if step != 1:  # the first step, then a later one, are skipped
            before = _snapshot(model, parts.optimizer)
            _backward(model, step, scaler)
            model.proj.weight.grad[0, 0] = float("inf")
            _, finite = optimizer_step(parts, clip_grad=0.0)
            assert not finite
            _assert_same(before, _snapshot(model, parts.optimizer))
        for run in (parts, clean):
            _backward(run.model, 10 + step, run.scaler)
            assert optimizer_step(run, clip_grad=0.0)[1]
        _assert_same(_snapshot(clean_model, clean.optimizer), _snapshot(model, parts.optimizer))
    if scaler is not None:
        assert scaler.get_scale() == 65536.0 / 4  # the two overflows halved it twice


def test_optimizer_defaults_are_the_classes_own() -> None:
    """config.OPTIMIZER_DEFAULTS (what a null BETAS / EPS becomes) against the classes' signatures."""
    from config import OPTIMIZER_DEFAULTS

    classes = {"adamw": torch.optim.AdamW, "lamb": Lamb, "lion": Lion, "sgd": torch.optim.SGD}
    assert set(OPTIMIZER_DEFAULTS) == set(classes)
    for name, cls in classes.items():
        signature = inspect.signature(cls.__init__).parameters
        expected = {key.upper(): tuple(signature[key].default) if key == "betas" else signature[key].default
                    for key in ("betas", "eps") if key in signature}
        assert OPTIMIZER_DEFAULTS[name] == expected, name
    lion = load_config(opts=["TRAIN.OPTIMIZER.NAME", "lion"]).TRAIN.OPTIMIZER
    assert (tuple(lion.BETAS), lion.EPS) == ((0.9, 0.99), None)
    given = load_config(opts=["TRAIN.OPTIMIZER.NAME", "lamb", "TRAIN.OPTIMIZER.EPS", "1e-8"]).TRAIN.OPTIMIZER
    assert (tuple(given.BETAS), given.EPS) == ((0.9, 0.999), 1e-8)  # a value given is kept


@pytest.mark.parametrize("name", ["adamw", "lamb", "lion"])
def test_a_config_not_filled_by_load_config_takes_the_classes_defaults(name: str) -> None:
    """get_defaults() leaves BETAS / EPS None: the optimizer gets its class's own values, which load_config fills in."""
    from config import get_defaults

    raw = get_defaults()
    raw.TRAIN.OPTIMIZER.NAME = name
    model = nn.Linear(3, 2)
    built, filled = build_optimizer(raw, model), build_optimizer(load_config(opts=["TRAIN.OPTIMIZER.NAME", name]), model)
    for key in ("betas", "eps"):
        assert built.param_groups[0].get(key) == filled.param_groups[0].get(key), key
