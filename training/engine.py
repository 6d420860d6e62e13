"""One training epoch, one optimizer step, one evaluation pass, and the throughput benchmark."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3, unwrap_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from yacs.config import CfgNode

from deploy.analysis import top_k
from optim import current_lr, steps_per_epoch
from utils.checkpoint import EMA_KEY, ema_weights
from utils.distributed import all_gather_object, all_reduce_sum, rank_and_world_size
from utils.multilabel import average_precision, mean_average_precision
from utils.precision import amp_name, autocast, peak_memory_mb
from utils.progress import EpochProgress

from .stopping import StopPolicy, StopReason
from .train_state import TrainState

logger = logging.getLogger(__name__)


@dataclass
class Components:
    """What a training step reads and changes; built once by :class:`trainer.Trainer`.

    Args:
        train_model: What the step calls: the model or its DDP / compiled wrapper; :attr:`model` is
            the unwrapped model inside (its weights, the EMA's source, what checkpoints hold).
        criterion: Loss on (logits, targets); targets are soft when ``mixup_fn`` is set.
        optimizer: Stepped once per group of ``TRAIN.ACCUMULATION_STEPS`` micro-batches.
        scheduler: timm scheduler, ``step_update(global_step)`` after every optimizer step.
        scaler: ``GradScaler`` for fp16, else None.
        ema: timm ``ModelEmaV3`` updated after every optimizer step, or None.
        mixup_fn: timm ``Mixup`` applied to each batch on the device, or None.
        amp_dtype: Autocast dtype of training, None for float32.
        distiller: The teacher and distillation term (:mod:`distill`), or None; it sees the batch the
            student sees (after mixup) and turns the criterion's loss into the distilled loss.
    """

    train_model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[torch.amp.GradScaler] = None
    ema: Optional[ModelEmaV3] = None
    mixup_fn: Optional[Callable] = None
    amp_dtype: Optional[torch.dtype] = None
    distiller: Optional[nn.Module] = None

    @property
    def model(self) -> nn.Module:
        """The unwrapped model (timm's ``unwrap_model`` sees through DDP and ``torch.compile``)."""
        return unwrap_model(self.train_model)

    @property
    def ddp(self) -> Optional[DistributedDataParallel]:
        """The DDP wrapper of the model (possibly inside a compiled module), None when not distributed."""
        inner = getattr(self.train_model, "_orig_mod", self.train_model)
        return inner if isinstance(inner, DistributedDataParallel) else None

    def state_dict(self) -> Dict[str, Any]:
        """The states of the model, EMA, optimizer, scheduler and scaler (None where a part is absent), and
        the teacher's identity (compared on resume)."""
        return {
            "teacher": self.distiller.identity if self.distiller is not None else None,
            "model": self.model.state_dict(),
            EMA_KEY: self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, saved: Dict[str, Any], weights_only: bool = False,
                        restore_schedule: bool = True) -> None:
        """Restore what :meth:`state_dict` saved; a part the file lacks starts afresh, with one line.

        Args:
            saved: A checkpoint dict (it holds the keys of :meth:`state_dict`).
            weights_only: Restore only the model and EMA weights (``--eval``).
            restore_schedule: Restore the LR scheduler's state; False keeps the freshly built one.
        """
        self.model.load_state_dict(saved["model"])
        if self.ema is not None and not _load_optional(self.ema.module, ema_weights(saved),
                                                       "the checkpoint has no EMA weights; the EMA restarts from the model"):
            self.ema.set(self.model)
        if weights_only:
            if self.ema is None and ema_weights(saved) is not None:
                logger.info("the checkpoint also holds EMA weights: evaluate them with --pretrained FILE --use-ema, "
                            "or --opts TRAIN.EMA.ENABLE True to evaluate both")
            return
        # The kernel (fused / foreach) is this run's choice, not the file's (it may come from another device).
        kernels = [{key: group.get(key) for key in ("fused", "foreach")} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(saved["optimizer"])
        for group, kept in zip(self.optimizer.param_groups, kernels):
            group.update(kept)
        if restore_schedule:
            self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler is not None:
            _load_optional(self.scaler, saved.get("scaler"),
                           "the checkpoint has no fp16 grad-scaler state; the scaler starts afresh")


def _load_optional(component: Any, saved: Optional[Dict[str, Any]], missing: str) -> bool:
    """Load ``saved`` into ``component``; without it log ``missing`` and return False."""
    if saved is None:
        logger.warning(missing)
        return False
    component.load_state_dict(saved)
    return True


# Seconds between progress lines of a validation pass (ImageNet's 50,000 images take minutes on few GPUs).
VAL_PROGRESS_EVERY_S = 30.0


def step_if_finite(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """``optimizer.step()`` only when ``finite`` (a 0-d bool tensor) is True.

    Fused optimizers (AdamW here; ``optim`` builds the others unfused) skip on the device through
    the ``found_inf`` input that ``GradScaler`` uses: no host sync, the step counters are rolled
    back by the kernel. Other implementations (LAMB, Lion, SGD) need the flag on the host: free on
    a CPU, one sync per step on a GPU.

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


def optimizer_step(parts: Components, clip_grad: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unscale (fp16), clip, step only if the gradients are finite, and zero them.

    Gradients are all-reduced before this runs, so the norm and the decision are the same on
    every rank. Returns ``(grad_norm, finite)`` as device tensors (no host sync).

    Args:
        parts: The optimizer, the scaler and the model whose gradients are stepped.
        clip_grad: Max global gradient norm; 0 only measures the norm.
    """
    optimizer, scaler = parts.optimizer, parts.scaler
    params = [p for p in parts.model.parameters() if p.grad is not None]
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)  # a tensor: no host sync
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    finite = torch.isfinite(grad_norm)
    if scaler is not None:
        scaler.step(optimizer)  # skips non-finite gradients itself
        scaler.update()
    else:
        step_if_finite(optimizer, finite)
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def _micro_batch(parts: Components, images: torch.Tensor, targets: torch.Tensor, group_size: int,
                 sync: bool, nan_loss: bool) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns its (unscaled) loss.

    The gradient all-reduce runs only when ``sync`` (the group's last micro-batch); the group's
    loss is the mean over its micro-batches.
    """
    if parts.mixup_fn is not None:
        images, targets = parts.mixup_fn(images, targets)
    ddp = parts.ddp
    with ddp.no_sync() if ddp is not None and not sync else contextlib.nullcontext():
        with autocast(images.device, parts.amp_dtype):
            outputs = parts.train_model(images)  # (B, num_classes)
            loss = parts.criterion(outputs, targets)
            if parts.distiller is not None:
                loss = parts.distiller(images, outputs, loss)
        if nan_loss:  # TRAIN.DEBUG_NONFINITE_STEPS
            loss = loss * float("nan")
        scaled = loss / group_size
        (parts.scaler.scale(scaled) if parts.scaler is not None else scaled).backward()
    return loss


def _diverged(parts: Components, finite: torch.Tensor, nonfinite_losses: torch.Tensor) -> torch.Tensor:
    """Whether a step counts as non-finite (toward ``TRAIN.MAX_NONFINITE_STEPS``); a 0-d bool tensor.

    Without a loss scaler every skipped step counts. With fp16's ``GradScaler`` an overflow of the
    scaled gradients is routine (the scaler skips the step and lowers the scale), so a skipped step
    counts only when a micro-batch loss of the group was non-finite on some rank: one all-reduce of
    a single integer, on the device (no host sync), so that every rank keeps the same streak.

    Args:
        parts: Reads ``scaler``.
        finite: From :func:`optimizer_step`.
        nonfinite_losses: This rank's count of non-finite micro-batch losses in the group.
    """
    if parts.scaler is None:
        return ~finite
    return ~finite & (all_reduce_sum(nonfinite_losses.clone()) > 0)


def _accumulate_loss(state: TrainState, loss: torch.Tensor, samples: int) -> None:
    """Add a micro-batch to the epoch's running sums (a non-finite loss is counted, not summed)."""
    loss_finite = torch.isfinite(loss.detach())
    state.loss_sum += torch.where(loss_finite, loss.detach().double(), 0.0)
    state.loss_nonfinite += (~loss_finite).long()
    state.loss_count += 1
    state.samples += samples


def train_one_epoch(parts: Components, loader: Any, state: TrainState, config: CfgNode,
                    progress: Optional[EpochProgress] = None, after_step: Optional[Callable[[], None]] = None,
                    stops: Optional[StopPolicy] = None) -> StopReason:
    """Train from ``state.batch`` to the end of ``state.epoch``, or until a stop; returns why it returned.

    Micro-batches are grouped by ``TRAIN.ACCUMULATION_STEPS``; each group makes one
    :func:`optimizer_step`. A step whose gradient norm is not finite is skipped and counted on the
    device. After every step ``stops`` decides whether the run stops (:mod:`stopping`).
    The loader must already be positioned with ``loader.set_epoch(state.epoch, state.batch)``.

    Args:
        parts: Model, loss, optimizer, scheduler, scaler, EMA, mixup and precision.
        loader: Yields ``(images, labels)`` on the device; ``len(loader)`` is the full epoch.
        state: Counters and running sums, updated in place.
        config: Reads ``TRAIN.ACCUMULATION_STEPS``, ``TRAIN.CLIP_GRAD``, ``TRAIN.DEBUG_NONFINITE_STEPS``,
            ``TRAIN.EPOCHS``, ``PRINT_FREQ`` (and, for a default ``stops``, the stop limits).
        progress: Progress lines; a default one is made from ``config`` when None.
        after_step: Called after every optimizer step (the caller saves when ``SAVE_STEPS`` makes it due).
        stops: Decides after every optimizer step, on every rank (a collective when distributed);
            a default one checks the step limits of ``config``.
    """
    train = config.TRAIN
    accumulation, num_batches = train.ACCUMULATION_STEPS, len(loader)
    rank, world_size = rank_and_world_size()
    if progress is None:
        progress = EpochProgress(train.EPOCHS, steps_per_epoch(num_batches, accumulation), config.PRINT_FREQ,
                                 train.MAX_NONFINITE_STEPS, world_size)
    stops = stops if stops is not None else StopPolicy(config)
    nan_steps = set(train.DEBUG_NONFINITE_STEPS) if rank == 0 else set()
    parts.train_model.train()
    # Creating the iterator must not move the global RNG: a run resumed mid-epoch creates it
    # after restoring the RNG, the uninterrupted run before its first step.
    with torch.random.fork_rng(devices=[state.device] if state.device.type == "cuda" else []):
        batches = _timed(iter(loader))
    progress.start(state.batch // accumulation)
    time_before = state.train_time
    group_nonfinite_loss = torch.zeros((), dtype=torch.int64, device=state.device)
    for index, (waited, (images, targets)) in enumerate(batches, start=state.batch):
        group_start = index - index % accumulation
        group_size = min(accumulation, num_batches - group_start)
        is_step = index + 1 == group_start + group_size
        loss = _micro_batch(parts, images, targets, group_size, is_step, state.global_step + 1 in nan_steps)
        group_nonfinite_loss += (~torch.isfinite(loss.detach())).long()
        _accumulate_loss(state, loss, images.shape[0])
        progress.count(images.shape[0], waited)
        state.batch = index + 1
        if not is_step:
            continue
        lr = current_lr(parts.optimizer)  # the LR this step uses
        grad_norm, finite = optimizer_step(parts, train.CLIP_GRAD)
        state.count_step(_diverged(parts, finite, group_nonfinite_loss))
        group_nonfinite_loss = torch.zeros_like(group_nonfinite_loss)
        parts.scheduler.step_update(state.global_step)
        if parts.ema is not None:
            parts.ema.update(parts.model, step=state.global_step)
        step_in_epoch = index // accumulation + 1
        if progress.due(state.global_step, step_in_epoch):
            progress.log(state, step_in_epoch, loss, grad_norm, lr)
        state.train_time = time_before + time.perf_counter() - progress.epoch_start
        if after_step is not None:
            after_step()
        reason = stops.check(state)
        if reason is not None:
            return reason
    state.train_time = time_before + time.perf_counter() - progress.epoch_start
    return StopReason.COMPLETED


def _timed(batches: Iterator[Any]) -> Iterator[Tuple[float, Any]]:
    """``(seconds waited for it, batch)`` for each batch of ``batches``."""
    while True:
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        yield time.perf_counter() - start, batch


def summarize_train_epoch(state: TrainState) -> Dict[str, float]:
    """The epoch's mean train loss and images/s over all ranks (a collective).

    Args:
        state: After :func:`train_one_epoch` completed the epoch.
    """
    totals = torch.tensor([state.loss_sum.item(), state.loss_count - int(state.loss_nonfinite), state.samples],
                          dtype=torch.float64, device=state.device)
    all_reduce_sum(totals)
    loss_sum, count, samples = totals.tolist()
    return {"train_loss": loss_sum / max(count, 1), "train_imgs_per_sec": samples / max(state.train_time, 1e-9)}


def _validation_logits(model: nn.Module, loader: Any, device: torch.device,
                       amp_dtype: Optional[torch.dtype]) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """``(logits (B, num_classes) float32, targets)`` of each validation batch, on ``device``.

    For a compiled model a smaller last batch is padded to the first batch's size and the
    padding's outputs are left out, so it runs one graph (an eager model runs the batch as it is).
    """
    batch_size = 0
    compiled = hasattr(model, "_orig_mod")  # torch.compile's wrapper (what timm's unwrap_model looks for)
    start = last_report = time.perf_counter()
    for index, (images, targets) in enumerate(loader):
        if time.perf_counter() - last_report > VAL_PROGRESS_EVERY_S:  # a long validation shows it is moving
            last_report = time.perf_counter()
            logger.info("validation [%d/%d] %.0f s", index, len(loader), last_report - start)
        size = targets.shape[0]
        batch_size = batch_size or size
        with autocast(device, amp_dtype):
            if compiled:  # one graph: pad a smaller last batch, leave the padding's outputs out
                logits = model(pad_batch(images, batch_size))[:size]  # (B, num_classes)
            else:
                logits = model(images)  # (B, num_classes)
        yield logits.float(), targets


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
             collect: Optional[List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = None,
             multi_label: bool = False) -> Dict[str, Any]:
    """Exact top-1 / top-5 accuracy (%) and mean cross-entropy over the whole validation set.

    Every rank sums over its own part of the set; one all-reduce of (loss sum, top-1 hits, top-5 hits,
    count) gives the exact totals for any number of ranks and uneven rank parts. Pass the unwrapped
    model: DDP's forward would add collectives per batch that hang on uneven rank parts. The sums
    stay on the device (the host reads them once, at the end); a compiled model runs one graph
    (:func:`_validation_logits`).

    Args:
        model: Unwrapped model (or EMA module).
        loader: This rank's part of the validation set.
        device: Compute device.
        amp_dtype: Autocast dtype, None for float32.
        collect: When a list, each batch's ``(targets (B,), top-5 classes (B, 5), their softmax
            probabilities (B, 5))`` are appended, on ``device``, in this rank's sample order
            (:mod:`deploy.analysis` turns them into per-class statistics). Single-label data only.
        multi_label: The loader yields ``(B, C)`` multi-hot targets: :func:`evaluate_multilabel` instead.

    Returns:
        ``{"acc1", "acc5", "loss", "count"}``; for ``multi_label`` :func:`evaluate_multilabel`'s.
    """
    if multi_label:
        return evaluate_multilabel(model, loader, device, amp_dtype)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, samples
    count = 0  # samples: counted on the host, added to the sums once
    for logits, targets in _validation_logits(model, loader, device, amp_dtype):
        topk, probabilities = top_k(logits, 5)  # (B, k) each
        hits = topk.eq(targets[:, None])  # (B, k)
        if collect is not None:
            collect.append((targets, topk, probabilities))
        sums[:3] += torch.stack([
            F.cross_entropy(logits, targets, reduction="sum").double(),
            hits[:, 0].sum().double(),
            hits.any(dim=1).sum().double(),
        ])
        count += targets.shape[0]
    sums[3] = count
    all_reduce_sum(sums)
    loss_sum, top1, top5, count = sums.tolist()  # host sync: once per evaluation
    model.train(was_training)
    if count == 0:
        raise ValueError("the validation set is empty; check DATA.DATA_PATH (or the synthetic sizes)")
    return {"acc1": 100.0 * top1 / count, "acc5": 100.0 * top5 / count, "loss": loss_sum / count, "count": count}


@torch.no_grad()
def evaluate_multilabel(model: nn.Module, loader: Any, device: torch.device,
                        amp_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """Exact mAP (%), each class's AP and the mean binary cross-entropy over the whole validation set of
    multi-hot targets.

    AP ranks every image of the set, so the scores and targets of every rank are gathered (one
    ``all_gather_object`` of ``(n, C)`` float32 logits and targets per rank, about 8 x N x C bytes in
    all: a few MB for the tens of thousands of images and tens of classes of such datasets) and
    every rank computes the same APs (:func:`utils.multilabel.average_precision`, float64) from them
    and their mean over the classes with a positive, mAP. The loss is the mean over images of the BCE
    averaged over classes, unsmoothed.

    Args:
        model: Unwrapped model (or EMA module).
        loader: This rank's part of the validation set; yields ``(images, (B, C) float32 targets)``.
        device: Compute device.
        amp_dtype: Autocast dtype, None for float32.

    Returns:
        ``{"map", "loss", "count", "class_ap"}``: ``class_ap`` lists each class's AP (%), NaN for a class
        without positives; ``map`` is NaN when no val image has any class.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    scores, targets = [], []
    for logits, batch_targets in _validation_logits(model, loader, device, amp_dtype):
        loss_sum += F.binary_cross_entropy_with_logits(logits, batch_targets, reduction="none").mean(dim=1).sum()
        scores.append(logits)
        targets.append(batch_targets)
    mine = (torch.cat(scores).cpu().numpy(), torch.cat(targets).cpu().numpy(), loss_sum.item()) if scores else None
    parts = [part for part in all_gather_object(mine) if part is not None]  # host sync: once per evaluation
    model.train(was_training)
    if not parts:
        raise ValueError("the validation set is empty; check DATA.DATA_PATH and val.csv")
    all_scores = torch.from_numpy(np.concatenate([part[0] for part in parts]))  # (N, C)
    all_targets = torch.from_numpy(np.concatenate([part[1] for part in parts]))  # (N, C)
    count = all_scores.shape[0]
    class_ap = 100.0 * average_precision(all_scores, all_targets)  # (C,) float64
    return {"map": mean_average_precision(class_ap),
            "loss": sum(part[2] for part in parts) / count, "count": count, "class_ap": class_ap.tolist()}


def pad_batch(images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``images`` (n, C, H, W) with zero images appended up to ``batch_size``, in its memory format.

    The last validation batch is usually smaller; padded, it runs through the graph that a compiled
    model already has for the full batch instead of compiling a second one.

    Args:
        images: A batch of at most ``batch_size`` images.
        batch_size: The batch size to pad to.
    """
    size = images.shape[0]
    if size >= batch_size:
        return images
    channels_last = images.dim() == 4 and not images.is_contiguous() and images.is_contiguous(
        memory_format=torch.channels_last)
    padded = torch.empty((batch_size, *images.shape[1:]), dtype=images.dtype, device=images.device,
                         memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    padded[:size] = images
    padded[size:] = 0
    return padded


def _seconds(fn: Callable[[], None], warmup: int, iters: int) -> float:
    """Seconds for ``iters`` calls of ``fn`` after ``warmup`` untimed ones (CUDA synchronised by the Timer)."""
    # Imported here: torch.utils.benchmark loads cpp_extension, which warns on machines without CUDA.
    from torch.utils.benchmark import Timer

    for _ in range(warmup):
        fn()
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.timeit(iters).mean * iters


def measure_throughput(model: nn.Module, config: CfgNode, device: torch.device,
                       amp_dtype: Optional[torch.dtype]) -> Dict[str, Any]:
    """Inference and training images/s of ``model`` on synthetic input, after a warm-up.

    A training step is the one :func:`train_one_epoch` runs: forward and loss under autocast, backward
    (scaled for fp16), :func:`optimizer_step` (unscale, clip, step if finite, zero); the weights change.

    Args:
        model: Unwrapped model on ``device``.
        config: Reads ``DATA.BATCH_SIZE``, ``DATA.IMG_SIZE``, ``TRAIN.AMP``, ``TRAIN.CLIP_GRAD``, ``THROUGHPUT.*``
            and the optimizer's keys.
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

    infer_seconds = _seconds(infer, warmup, iters)
    infer_memory = peak_memory_mb(device)

    model.train()
    from optim import build_optimizer  # the training step measured is the real one
    optimizer = build_optimizer(config, model)
    parts = Components(train_model=model, criterion=nn.CrossEntropyLoss(), optimizer=optimizer, scheduler=None,
                       scaler=torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None,
                       amp_dtype=amp_dtype)

    def train_step() -> None:
        _micro_batch(parts, images, labels, group_size=1, sync=True, nan_loss=False)
        optimizer_step(parts, config.TRAIN.CLIP_GRAD)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_seconds = _seconds(train_step, warmup, iters)
    return {
        "model": config.MODEL.NAME,
        "img_size": size,
        "batch_size": batch,
        "amp": amp_name(amp_dtype),  # the precision measured (bf16 may resolve to another on this device)
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "infer_imgs_per_sec": batch * iters / infer_seconds,
        "train_imgs_per_sec": batch * iters / train_seconds,
        "infer_peak_memory_mb": infer_memory,
        "train_peak_memory_mb": peak_memory_mb(device),
        "iters": iters,
    }
