"""The recipes' device-side paths: every optimizer's skipped fp16 step, the teacher, multi-label mAP.

* ``recipes/optimizer/<name>/skip_nonfinite``: for each ``TRAIN.OPTIMIZER.NAME``, fp16 autocast with
  ``GradScaler`` through ``engine.optimizer_step``: a step whose loss is infinite leaves the weights and
  the optimizer state bitwise unchanged and halves the scale; the next finite step moves the weights.
  On a GPU this is where fused AdamW skips on the device (``found_inf``) and the foreach kernels of
  SGD, LAMB and Lion go through the scaler's host-side decision.
* ``recipes/distill/{bf16,fp16}``: the teacher (``distill.Distiller``) resizes the student's batch on
  the device to its own size, runs under the run's autocast, and the distilled loss backpropagates
  into the student only; its forward time comes from CUDA events.
* ``recipes/multilabel_map``: ``engine.evaluate_multilabel`` on device batches in a process group
  (NCCL on a GPU: ``all_gather_object`` of the scores) equals the float64 mAP of the same logits.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from config import get_defaults, load_config
from models import build_model
from optim import build_optimizer
from training.distill import Distiller
from training.engine import Components, _micro_batch, evaluate_multilabel, optimizer_step
from utils.multilabel import average_precision, mean_average_precision

from .plan import TINY_ARCH, Context
from .report import Result, check
from .training import amp_dtype_for, process_group

OPTIMIZERS = ("adamw", "lamb", "lion", "sgd")
IMG_SIZE = 32  # the student's input; the teacher sees it at TEACHER_SIZE
TEACHER_SIZE = 64
NUM_CLASSES = 10


def tiny_model(device: torch.device, seed: int = 0) -> nn.Module:
    """The tiny CrossFormer++ of the tests, on ``device``."""
    config = get_defaults()
    config.MODEL.NAME, config.MODEL.NUM_CLASSES, config.MODEL.DROP_PATH_RATE = "crossformerpp_s", NUM_CLASSES, 0.0
    arch = config.MODEL.CROSSFORMER
    arch.EMBED_DIM, arch.DEPTHS, arch.NUM_HEADS = (TINY_ARCH["embed_dim"], list(TINY_ARCH["depths"]),
                                                   list(TINY_ARCH["num_heads"]))
    torch.manual_seed(seed)
    return build_model(config).to(device)


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, torch.Tensor]:
    state = {f"param/{name}": p.detach().clone() for name, p in model.named_parameters()}
    for index, values in optimizer.state.items():
        for key, value in values.items():
            if torch.is_tensor(value):
                state[f"state/{id(index)}/{key}"] = value.detach().clone()
    return state


def _same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def check_optimizer_skip(ctx: Context, name: str) -> Result:
    """A finite step, an infinite one (skipped: nothing changes, the scale halves), a finite one (moves)."""
    device = ctx.device
    config = load_config("", ["TRAIN.OPTIMIZER.NAME", name, "TRAIN.BASE_LR", "1e-3", "TRAIN.LR_REFERENCE_BATCH", "0"])
    model = tiny_model(device)
    optimizer = build_optimizer(config, model)
    parts = Components(train_model=model, criterion=nn.CrossEntropyLoss(), optimizer=optimizer, scheduler=None,
                       scaler=torch.amp.GradScaler(device.type), amp_dtype=amp_dtype_for("fp16", device))
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, IMG_SIZE, IMG_SIZE, generator=generator).to(device)
    labels = torch.randint(0, NUM_CLASSES, (4,), generator=generator).to(device)

    def step(nan: bool) -> None:
        _micro_batch(parts, images, labels, group_size=1, sync=True, nan_loss=nan)
        optimizer_step(parts, clip_grad=5.0)

    step(False)
    before, scale = _snapshot(model, optimizer), parts.scaler.get_scale()
    step(True)  # the loss is NaN: every gradient is, the scaler skips the step
    skipped = _same(before, _snapshot(model, optimizer))
    halved = parts.scaler.get_scale() == scale / 2
    step(False)
    moved = not torch.equal(before["param/head.weight"], model.head.weight.detach())
    return check(f"recipes/optimizer/{name}/skip_nonfinite", skipped and halved and moved,
                 f"unchanged {skipped}, scale {scale:g} -> {scale / 2:g} {halved}, next step moves {moved}",
                 "unchanged, scale halved, next step moves", f"{type(optimizer).__name__}, fp16 + GradScaler")


def check_distill(ctx: Context, amp: str) -> Result:
    """A distilled micro-batch: finite loss, gradients in the student only, the teacher timed."""
    device = ctx.device
    student, teacher = tiny_model(device, seed=0), tiny_model(device, seed=1)
    distiller = Distiller(teacher, "soft", 0.5, 2.0, TEACHER_SIZE, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
                          identity={}).to(device)
    parts = Components(train_model=student, criterion=nn.CrossEntropyLoss(), optimizer=None, scheduler=None,
                       amp_dtype=amp_dtype_for(amp, device), distiller=distiller)
    images = torch.randn(4, 3, IMG_SIZE, IMG_SIZE, device=device)
    labels = torch.arange(4, device=device) % NUM_CLASSES
    loss = _micro_batch(parts, images, labels, group_size=1, sync=True, nan_loss=False)
    finite = bool(torch.isfinite(loss))
    student_grads = all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in student.parameters())
    teacher_clean = all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    seconds, calls = distiller.pop_seconds()
    ok = finite and student_grads and teacher_clean and calls == 1 and seconds > 0
    return check(f"recipes/distill/{amp}", ok, f"loss {loss.item():.4f}, teacher {1000 * seconds:.2f} ms",
                 "finite, student gradients only, teacher timed",
                 f"teacher at {TEACHER_SIZE} px on a {IMG_SIZE} px batch, mean/std 0.5")


def check_multilabel_map(ctx: Context) -> Result:
    """Validation mAP on device batches (gathered through the process group) vs float64 on the same logits."""
    device = ctx.device
    model = tiny_model(device).eval()
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(size, 3, IMG_SIZE, IMG_SIZE, generator=generator).to(device),
                (torch.rand(size, NUM_CLASSES, generator=generator) < 0.3).float().to(device)) for size in (8, 8, 5)]
    with process_group(device):
        stats = evaluate_multilabel(model, batches, device)
    with torch.no_grad():
        logits = torch.cat([model(images).double() for images, _ in batches]).cpu()
    targets = torch.cat([t for _, t in batches]).cpu()
    expected = mean_average_precision(100.0 * average_precision(logits, targets))
    loss = float(sum(F.binary_cross_entropy_with_logits(logits, targets.double(), reduction="none").mean(1)) / 21)
    ok = stats["count"] == 21 and abs(stats["map"] - expected) < 1e-3 and math.isclose(stats["loss"], loss,
                                                                                       rel_tol=1e-4)
    return check("recipes/multilabel_map", ok, f"{stats['map']:.4f} vs {expected:.4f}", "|difference| < 1e-3",
                 "21 images, 10 classes, float32 logits on the device vs float64")


def check_recipes(ctx: Context) -> List[Result]:
    """Every check of the ``recipes`` group."""
    results = [check_optimizer_skip(ctx, name) for name in OPTIMIZERS]
    results += [check_distill(ctx, amp) for amp in ("bf16", "fp16")]
    results.append(check_multilabel_map(ctx))
    return results
