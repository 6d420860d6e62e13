"""One training epoch, one evaluation pass, and the throughput benchmark: plain importable functions."""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import time
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from yacs.config import CfgNode

from utils.checkpoint import TrainState
from utils.distributed import all_reduce_sum
from utils.precision import autocast, peak_memory_mb

logger = logging.getLogger(__name__)


def steps_per_epoch(num_batches: int, accumulation_steps: int) -> int:
    """Optimizer steps in an epoch of ``num_batches``; a last, shorter group still makes a step."""
    return math.ceil(num_batches / accumulation_steps)


def step_if_finite(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """``optimizer.step()`` only when ``finite`` (a 0-d bool tensor) is True.

    Fused optimizers (AdamW on CUDA here) skip on the device through the ``found_inf`` input that
    ``GradScaler`` uses: no host sync, the step counters are rolled back by the kernel. Other
    implementations need the flag on the host: free on a CPU, one sync per step on a GPU.

    Args:
        optimizer: The optimizer.
        finite: Whether the step's gradients are all finite (the same on every rank).
    """
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = (~finite).float()  # read by the fused kernel
        optimizer.grad_scale = None
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
    elif finite.item():  # host sync: non-fused optimizers only (free on a CPU)
        optimizer.step()


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    config: CfgNode,
    amp_dtype: Optional[torch.dtype] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    ema: Optional[nn.Module] = None,
    mixup_fn: Optional[Callable] = None,
    on_log: Optional[Callable[[int, Dict[str, float]], None]] = None,
    on_step: Optional[Callable[[TrainState], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
) -> bool:
    """Train from ``state.batch`` to the end of ``state.epoch``, or until a stop.

    A step whose (all-reduced) gradient norm is not finite is skipped: no optimizer update, its
    gradients dropped, counted in ``state.nonfinite_total`` / ``state.nonfinite_streak`` on the
    device. The streak is read on log steps; at ``TRAIN.MAX_NONFINITE_STEPS`` or more the epoch
    stops (the caller tells the reasons apart).

    Micro-batches are grouped by ``TRAIN.ACCUMULATION_STEPS``; each group's loss is averaged and
    makes one optimizer step, the gradient all-reduce happening only on its last micro-batch.
    The loader must already be positioned with ``loader.set_epoch(state.epoch, state.batch)``.

    Args:
        model: The model to train, DDP-wrapped when distributed.
        criterion: Loss on (logits, targets); targets are soft when ``mixup_fn`` is given.
        loader: Yields ``(images, labels)`` on the device; ``len(loader)`` is the full epoch.
        optimizer: Stepped once per group.
        scheduler: timm scheduler, ``step_update(global_step)`` after every optimizer step.
        state: Counters and running sums, updated in place.
        config: Reads ``TRAIN.ACCUMULATION_STEPS``, ``TRAIN.CLIP_GRAD``, ``TRAIN.EPOCHS``,
            ``TRAIN.STOP_AFTER_STEPS``, ``TRAIN.MAX_NONFINITE_STEPS``, ``TRAIN.DEBUG_NONFINITE_STEPS``,
            ``PRINT_FREQ``, ``SAVE_STEPS``.
        amp_dtype: Autocast dtype, None for float32.
        scaler: GradScaler (fp16 only).
        ema: timm ``ModelEmaV3`` updated after every optimizer step.
        mixup_fn: timm ``Mixup`` applied to each batch on the device.
        on_log: Called on log steps with ``(global_step, scalars)``.
        on_step: Called after every ``SAVE_STEPS``-th optimizer step (checkpointing).
        should_stop: Called after every optimizer step (on every rank: it may be a collective);
            True ends the epoch there (preemption).

    Returns:
        True when the epoch ran to its end, False when stopped (``TRAIN.STOP_AFTER_STEPS``,
        ``should_stop`` or too many non-finite steps in a row).
    """
    model.train()
    unwrapped = model.module if isinstance(model, DistributedDataParallel) else model
    device = state.loss_sum.device
    accumulation = config.TRAIN.ACCUMULATION_STEPS
    num_batches = len(loader)
    epoch_steps = steps_per_epoch(num_batches, accumulation)
    stop_after = config.TRAIN.STOP_AFTER_STEPS
    clip = config.TRAIN.CLIP_GRAD
    params = [p for p in model.parameters() if p.requires_grad]
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    inject_nonfinite = set(config.TRAIN.DEBUG_NONFINITE_STEPS) if rank == 0 else set()
    max_nonfinite = config.TRAIN.MAX_NONFINITE_STEPS
    reported_skipped = 0

    # Creating the iterator must not move the global RNG: a run resumed mid-epoch creates it
    # after restoring the RNG, the uninterrupted run before its first step.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        batches = iter(loader)
    epoch_start = time.perf_counter()
    time_before = state.train_time
    first_step = state.batch // accumulation
    window_start, window_samples = epoch_start, 0
    for index, (images, targets) in enumerate(batches, start=state.batch):
        group_start = index - index % accumulation
        group_size = min(accumulation, num_batches - group_start)
        is_step = index + 1 == group_start + group_size
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        skip_sync = not is_step and isinstance(model, DistributedDataParallel)
        with model.no_sync() if skip_sync else contextlib.nullcontext():
            with autocast(device, amp_dtype):
                outputs = model(images)  # (B, num_classes)
                loss = criterion(outputs, targets)
            if state.global_step + 1 in inject_nonfinite:
                loss = loss * float("nan")
            # The group's loss is the mean over its micro-batches.
            scaled = loss / group_size
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_finite = torch.isfinite(loss.detach())
        state.loss_sum += torch.where(loss_finite, loss.detach().double(), 0.0)
        state.loss_nonfinite += (~loss_finite).long()
        state.loss_count += 1
        state.samples += images.shape[0]
        state.batch = index + 1
        window_samples += images.shape[0]
        if not is_step:
            continue

        if scaler is not None:
            scaler.unscale_(optimizer)
        if clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)  # a tensor: no host sync
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        # Gradients are all-reduced, so the norm and this decision are the same on every rank.
        finite = torch.isfinite(grad_norm)
        if scaler is not None:
            scaler.step(optimizer)  # skips non-finite gradients itself
            scaler.update()
        else:
            step_if_finite(optimizer, finite)
        optimizer.zero_grad(set_to_none=True)
        skipped = (~finite).long()
        state.nonfinite_total += skipped
        state.nonfinite_streak.mul_(skipped).add_(skipped)  # +1 when skipped, else 0
        lr = optimizer.param_groups[0]["lr"]  # the LR this step used
        state.global_step += 1
        scheduler.step_update(state.global_step)
        if ema is not None:
            ema.update(unwrapped, step=state.global_step)

        step_in_epoch = index // accumulation + 1
        streak = 0
        if state.global_step % config.PRINT_FREQ == 0 or step_in_epoch == epoch_steps:
            # host sync: log step only
            loss_value = loss.item()
            norm_value = grad_norm.item()
            total_skipped, streak = int(state.nonfinite_total), int(state.nonfinite_streak)
            now = time.perf_counter()
            imgs_per_sec = window_samples * world_size / max(now - window_start, 1e-9)
            per_step = (now - epoch_start) / max(step_in_epoch - first_step, 1)
            eta = datetime.timedelta(seconds=int(per_step * (epoch_steps - step_in_epoch)))
            logger.info(
                "train epoch %d/%d [%d/%d] eta %s  loss %.4f (avg %.4f)  lr %.3e  grad_norm %.3f  "
                "%.1f img/s  mem %.0f MB",
                state.epoch, config.TRAIN.EPOCHS, step_in_epoch, epoch_steps, eta, loss_value,
                state.loss_sum.item() / max(state.loss_count, 1), lr, norm_value, imgs_per_sec,
                peak_memory_mb(device))
            if total_skipped != reported_skipped:  # warn when the count grows, not on every log line
                reported_skipped = total_skipped
                logger.warning("skipped %d optimizer step(s) with a non-finite loss or gradient so far, the last %d "
                               "in a row (stop at TRAIN.MAX_NONFINITE_STEPS=%d)", total_skipped, streak, max_nonfinite)
            if on_log is not None:
                on_log(state.global_step, {"train/loss": loss_value, "train/lr": lr,
                                           "train/grad_norm": norm_value, "train/imgs_per_sec": imgs_per_sec,
                                           "train/nonfinite_steps": float(total_skipped)})
            window_start, window_samples = now, 0
        state.train_time = time_before + time.perf_counter() - epoch_start
        if on_step is not None and config.SAVE_STEPS and state.global_step % config.SAVE_STEPS == 0:
            on_step(state)
        if stop_after and state.global_step >= stop_after:
            return False
        if streak >= max_nonfinite:
            return False
        if should_stop is not None and should_stop():
            return False
    state.train_time = time_before + time.perf_counter() - epoch_start
    return True


def summarize_train_epoch(state: TrainState) -> Dict[str, float]:
    """The epoch's mean train loss and images/s over all ranks (a collective).

    Args:
        state: After :func:`train_one_epoch` returned True.
    """
    totals = torch.tensor([state.loss_sum.item(), state.loss_count - int(state.loss_nonfinite), state.samples],
                          dtype=torch.float64, device=state.loss_sum.device)
    all_reduce_sum(totals)
    loss_sum, count, samples = totals.tolist()
    return {"train_loss": loss_sum / max(count, 1), "train_imgs_per_sec": samples / max(state.train_time, 1e-9)}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device,
             amp_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """Exact top-1 / top-5 accuracy (%) and mean cross-entropy over the whole validation set.

    Every rank sums over its own shard; one all-reduce of (loss sum, top-1 hits, top-5 hits,
    count) gives the exact totals for any number of ranks and uneven shards. Pass the unwrapped
    model: DDP's forward would add collectives per batch that hang on uneven shards.

    Args:
        model: Unwrapped model (or EMA module).
        loader: This rank's validation shard.
        device: Compute device.
        amp_dtype: Autocast dtype, None for float32.

    Returns:
        ``{"acc1", "acc5", "loss", "count"}``.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, samples
    for images, targets in loader:
        with autocast(device, amp_dtype):
            logits = model(images)  # (B, num_classes)
        logits = logits.float()
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, k)
        hits = topk.eq(targets[:, None])  # (B, k)
        sums += torch.stack([
            F.cross_entropy(logits, targets, reduction="sum").double(),
            hits[:, 0].sum().double(),
            hits.any(dim=1).sum().double(),
            torch.tensor(float(targets.shape[0]), dtype=torch.float64, device=device),
        ])
    all_reduce_sum(sums)
    loss_sum, top1, top5, count = sums.tolist()  # host sync: once per evaluation
    model.train(was_training)
    if count == 0:
        raise ValueError("the validation set is empty; check DATA.DATA_PATH (or the synthetic sizes)")
    return {"acc1": 100.0 * top1 / count, "acc5": 100.0 * top5 / count, "loss": loss_sum / count, "count": count}


def _timed(fn: Callable[[], None], iters: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure_throughput(model: nn.Module, config: CfgNode, device: torch.device,
                       amp_dtype: Optional[torch.dtype]) -> Dict[str, Any]:
    """Inference and training images/s of ``model`` on synthetic input, after a warm-up.

    Training is forward, backward and an AdamW step (the model's weights change).

    Args:
        model: Unwrapped model on ``device``.
        config: Reads ``DATA.BATCH_SIZE``, ``DATA.IMG_SIZE``, ``TRAIN.AMP``, ``THROUGHPUT.*``.
        device: Compute device.
        amp_dtype: Autocast dtype, None for float32.
    """
    batch, size = config.DATA.BATCH_SIZE, config.DATA.IMG_SIZE
    warmup, iters = config.THROUGHPUT.WARMUP_ITERS, config.THROUGHPUT.ITERS
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, config.MODEL.NUM_CLASSES, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    model.eval()

    def infer() -> None:
        with torch.inference_mode(), autocast(device, amp_dtype):
            model(images)

    _timed(infer, warmup, device)
    infer_seconds = _timed(infer, iters, device)
    infer_memory = peak_memory_mb(device)

    model.train()
    from optim import build_optimizer  # the training step measured is the real one
    optimizer = build_optimizer(config, model)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    def train_step() -> None:
        with autocast(device, amp_dtype):
            loss = F.cross_entropy(model(images), labels)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _timed(train_step, warmup, device)
    train_seconds = _timed(train_step, iters, device)
    return {
        "model": config.MODEL.NAME,
        "img_size": size,
        "batch_size": batch,
        "amp": config.TRAIN.AMP,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "infer_imgs_per_sec": batch * iters / infer_seconds,
        "train_imgs_per_sec": batch * iters / train_seconds,
        "infer_peak_memory_mb": infer_memory,
        "train_peak_memory_mb": peak_memory_mb(device),
        "iters": iters,
    }
