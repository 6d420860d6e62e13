"""Linear warmup and cosine decay, stepped after every optimizer step (timm's CosineLRScheduler); the
steps in an epoch and the LR an optimizer runs at."""
from __future__ import annotations

import math

import torch
from timm.scheduler import CosineLRScheduler
from yacs.config import CfgNode


def steps_per_epoch(num_batches: int, accumulation_steps: int) -> int:
    """Optimizer steps in an epoch of ``num_batches``; a last, shorter group still makes a step."""
    return math.ceil(num_batches / accumulation_steps)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The base LR the optimizer runs at: the largest group LR (layer-wise decay scales the others down)."""
    return max(group["lr"] for group in optimizer.param_groups)


def warmup_epochs(config: CfgNode) -> int:
    """The warmup epochs the schedule runs: ``TRAIN.WARMUP_EPOCHS``, shortened to ``TRAIN.EPOCHS - 1`` when it
    would not end before the last epoch (a 1-epoch run has none), so that a short run of a long recipe trains.

    Args:
        config: Reads ``TRAIN.EPOCHS`` and ``TRAIN.WARMUP_EPOCHS``.
    """
    return min(config.TRAIN.WARMUP_EPOCHS, config.TRAIN.EPOCHS - 1)


def build_scheduler(config: CfgNode, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> CosineLRScheduler:
    """The LR over optimizer steps ``t = 0 .. total``, as the official code builds it.

    ``SCALED_WARMUP_LR`` at ``t = 0`` rising linearly towards ``SCALED_BASE_LR`` until the end of
    the warmup ``W`` (:func:`warmup_epochs`); from there
    ``min + (base - min) * (1 + cos(pi * t / total)) / 2``, reaching ``SCALED_MIN_LR`` at the last step.
    With ``TRAIN.LR_SCHEDULER.WARMUP_PREFIX`` the cosine instead starts at the end of the warmup:
    ``cos(pi * (t - W) / (total - W))``. Call ``step_update(global_step)`` after each optimizer step.

    Args:
        config: Reads ``TRAIN.EPOCHS``, ``TRAIN.WARMUP_EPOCHS``, ``TRAIN.LR_SCHEDULER`` and the
            scaled LRs.
        optimizer: Its groups' ``lr`` is set by the scheduler.
        steps_per_epoch: Optimizer steps per epoch (batches / accumulation steps, rounded up).
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1; the train loader yields no batch")
    total = config.TRAIN.EPOCHS * steps_per_epoch
    warmup = warmup_epochs(config) * steps_per_epoch
    prefix = config.TRAIN.LR_SCHEDULER.WARMUP_PREFIX
    return CosineLRScheduler(
        optimizer,
        t_initial=total - warmup if prefix else total,
        lr_min=config.TRAIN.SCALED_MIN_LR,
        warmup_t=warmup,
        warmup_lr_init=config.TRAIN.SCALED_WARMUP_LR,
        warmup_prefix=prefix,
        cycle_limit=1,
        t_in_epochs=False,
    )
