"""Progress lines of a training epoch: position, ETA, loss, LR, gradient norm, images/s, the share
of the time spent waiting for data (how a slow loader shows), memory.

The epoch loop counts samples and calls :meth:`EpochProgress.log` on log steps only, where the
values are read from the device (the one host sync of those steps).
"""
from __future__ import annotations

import datetime
import logging
import time
from typing import Callable, Dict, Optional, Protocol

import torch

from .precision import peak_memory_mb

logger = logging.getLogger(__name__)


class RunCounters(Protocol):
    """What a progress line reads of the run's counters (``training.train_state.TrainState`` has them)."""

    epoch: int
    global_step: int
    device: torch.device
    nonfinite_total: torch.Tensor
    nonfinite_streak: torch.Tensor
    loss_sum: torch.Tensor
    loss_count: int

ScalarSink = Callable[[int, Dict[str, float]], None]


class EpochProgress:
    """Logs every ``print_freq`` optimizer steps and at the epoch's last step, like DeiT's ``MetricLogger``.

    Args:
        epochs: ``TRAIN.EPOCHS`` (shown as "epoch E/N").
        epoch_steps: Optimizer steps in a full epoch.
        print_freq: ``PRINT_FREQ``: log when the global step is a multiple of it.
        max_nonfinite: ``TRAIN.MAX_NONFINITE_STEPS`` (named in the skipped-steps warning).
        world_size: Processes (images/s is of the whole job, from this rank's count).
        on_scalars: Receives ``(global_step, {"train/loss": ..., ...})`` on log steps (TensorBoard).
    """

    def __init__(self, epochs: int, epoch_steps: int, print_freq: int, max_nonfinite: int, world_size: int = 1,
                 on_scalars: Optional[ScalarSink] = None) -> None:
        self.epochs = epochs
        self.epoch_steps = epoch_steps
        self.print_freq = print_freq
        self.max_nonfinite = max_nonfinite
        self.world_size = world_size
        self.on_scalars = on_scalars
        self.reported_skipped = 0
        self.start(0)

    def start(self, first_step: int) -> None:
        """Start timing an epoch that begins at its optimizer step ``first_step`` (> 0 after a resume).

        Args:
            first_step: Optimizer steps of the epoch already taken.
        """
        self.first_step = first_step
        self.epoch_start = self.window_start = time.perf_counter()
        self.window_samples = 0
        self.window_wait = 0.0

    def count(self, samples: int, waited: float = 0.0) -> None:
        """Add a micro-batch to the window: its samples, and the seconds spent waiting for it.

        Args:
            samples: Images in the micro-batch.
            waited: Seconds the loop waited for the loader to hand it over.
        """
        self.window_samples += samples
        self.window_wait += waited

    def due(self, global_step: int, step_in_epoch: int) -> bool:
        """Whether this optimizer step logs (every ``print_freq`` global steps and the epoch's last)."""
        return global_step % self.print_freq == 0 or step_in_epoch == self.epoch_steps

    def log(self, state: "RunCounters", step_in_epoch: int, loss: torch.Tensor, grad_norm: torch.Tensor,
            lr: float) -> None:
        """Log one progress line (and a warning when skipped steps grew).

        Args:
            state: The run's counters (global step, skipped steps, the epoch's loss sums).
            step_in_epoch: 1-based optimizer step within the epoch.
            loss: The last micro-batch's loss (device tensor).
            grad_norm: The step's total gradient norm (device tensor).
            lr: The learning rate the step used.
        """
        # host sync: log steps only
        loss_value, norm_value = loss.item(), grad_norm.item()
        total_skipped, streak = int(state.nonfinite_total), int(state.nonfinite_streak)
        now = time.perf_counter()
        elapsed = max(now - self.window_start, 1e-9)
        imgs_per_sec = self.window_samples * self.world_size / elapsed
        data_wait = 100.0 * min(self.window_wait / elapsed, 1.0)  # a slow loader shows here
        per_step = (now - self.epoch_start) / max(step_in_epoch - self.first_step, 1)
        eta = datetime.timedelta(seconds=int(per_step * (self.epoch_steps - step_in_epoch)))
        logger.info("train epoch %d/%d [%d/%d] eta %s  loss %.4f (avg %.4f)  lr %.3e  grad_norm %.3f  "
                    "%.1f img/s  data wait %.0f%%  mem %.0f MB", state.epoch, self.epochs, step_in_epoch,
                    self.epoch_steps, eta, loss_value, state.loss_sum.item() / max(state.loss_count, 1), lr,
                    norm_value, imgs_per_sec, data_wait, peak_memory_mb(state.device))
        if total_skipped != self.reported_skipped:  # warn when the count grows, not on every log line
            self.reported_skipped = total_skipped
            logger.warning("skipped %d optimizer step(s) with a non-finite loss or gradient so far, the last %d in "
                           "a row (stop at TRAIN.MAX_NONFINITE_STEPS=%d)", total_skipped, streak, self.max_nonfinite)
        if self.on_scalars is not None:
            self.on_scalars(state.global_step, {"train/loss": loss_value, "train/lr": lr,
                                                "train/grad_norm": norm_value, "train/imgs_per_sec": imgs_per_sec,
                                                "train/data_wait_percent": data_wait,
                                                "train/nonfinite_steps": float(total_skipped)})
        self.window_start, self.window_samples, self.window_wait = now, 0, 0.0
