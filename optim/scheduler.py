"""Linear warmup then cosine decay, stepped after every optimizer step (timm's CosineLRScheduler)."""
from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler
from yacs.config import CfgNode


def build_scheduler(config: CfgNode, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> CosineLRScheduler:
    """The LR over optimizer steps ``t = 0 .. total``.

    ``SCALED_WARMUP_LR`` at ``t = 0`` rising linearly to ``SCALED_BASE_LR`` at the end of the
    warmup, then a cosine from exactly that peak (``warmup_prefix=True``: no drop after the
    warmup) down to ``SCALED_MIN_LR`` at the last step. Call ``step_update(global_step)`` after
    each optimizer step.

    Args:
        config: Reads ``TRAIN.EPOCHS``, ``TRAIN.WARMUP_EPOCHS`` and the scaled LRs.
        optimizer: Its groups' ``lr`` is set by the scheduler.
        steps_per_epoch: Optimizer steps per epoch (batches / accumulation steps, rounded up).
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1; the train loader yields no batch")
    total = config.TRAIN.EPOCHS * steps_per_epoch
    warmup = config.TRAIN.WARMUP_EPOCHS * steps_per_epoch
    return CosineLRScheduler(
        optimizer,
        t_initial=total - warmup,
        lr_min=config.TRAIN.SCALED_MIN_LR,
        warmup_t=warmup,
        warmup_lr_init=config.TRAIN.SCALED_WARMUP_LR,
        warmup_prefix=True,
        cycle_limit=1,
        t_in_epochs=False,
    )
