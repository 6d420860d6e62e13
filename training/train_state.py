"""The counters that place a run in its schedule, the epoch's running sums, and every RNG stream.

:class:`TrainState` is the part of a checkpoint that is not a component's own ``state_dict``
(model, EMA, optimizer, scheduler and scaler are saved by :mod:`utils.checkpoint`).
"""
from __future__ import annotations

import logging
import random
from typing import Any, Dict, List

import numpy as np
import torch

from utils.checkpoint import resume_position, stored_position
from utils.distributed import all_gather_object

logger = logging.getLogger(__name__)

# Keys of the checkpoint dict that TrainState writes and reads back, beside the position
# (utils.checkpoint.stored_position: epoch, batch, epoch_complete).
COUNTER_KEYS = ("global_step", "best_acc1", "best_epoch", "best_ema_acc1", "best_ema_epoch")


def capture_rng_state() -> Dict[str, Any]:
    """This process's torch (CPU and every CUDA device), NumPy and Python ``random`` states.

    Stored as tensors and plain values, so ``torch.load(weights_only=True)`` reads them back.
    """
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`.

    Args:
        state: As returned by :func:`capture_rng_state` (possibly after a save/load round trip).
    """
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            logger.warning("checkpoint has CUDA RNG states of %d devices, this process sees %d; "
                           "restoring the first ones", len(state["cuda"]), torch.cuda.device_count())
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class TrainState:
    """Position, best accuracies, skipped-step counts and this rank's running sums of the epoch.

    Args:
        device: Where the device-side counters live (read on log steps only: no host sync per step).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.epoch = 0  # epoch in progress (or the next to start), 0-based
        self.batch = 0  # next batch of ``epoch`` to train on
        self.ended_epoch_batches = 0  # the batches of the epoch before ``epoch`` (a checkpoint after it says so)
        self.global_step = 0  # optimizer steps taken
        self.best_acc1 = float("-inf")  # the best validation top-1, or mAP for multi-label data
        self.best_epoch = -1
        self.best_ema_acc1 = float("-inf")
        self.best_ema_epoch = -1
        # Skipped non-finite optimizer steps, in total and in a row. The same on every rank (they are
        # decided by the all-reduced gradient norm).
        self.nonfinite_total = torch.zeros((), dtype=torch.int64, device=device)
        self.nonfinite_streak = torch.zeros((), dtype=torch.int64, device=device)
        self.reset_epoch_meters()

    def reset_epoch_meters(self) -> None:
        """Zero the running sums of the epoch in progress (this rank's)."""
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_count = 0
        self.loss_nonfinite = torch.zeros((), dtype=torch.int64, device=self.device)  # left out of loss_sum
        self.samples = 0
        self.train_time = 0.0

    def start_epoch(self, epoch: int) -> None:
        """Move to the first batch of ``epoch`` with fresh running sums.

        Args:
            epoch: The epoch about to start.
        """
        self.ended_epoch_batches = self.batch
        self.epoch, self.batch = epoch, 0
        self.reset_epoch_meters()

    def count_step(self, nonfinite: torch.Tensor) -> None:
        """Advance the global step and the non-finite step counts (on the device, no host sync).

        Args:
            nonfinite: 0-d bool tensor, whether the step was skipped for a non-finite loss or gradient.
        """
        skipped = nonfinite.long()
        self.nonfinite_total += skipped
        self.nonfinite_streak.mul_(skipped).add_(skipped)  # +1 when skipped, else 0
        self.global_step += 1

    def state_dict(self) -> Dict[str, Any]:
        """Counters and ``ranks`` (per rank: RNG states and running sums). A collective: every rank calls it."""
        rank_state = {"rng": capture_rng_state(), "loss_sum": float(self.loss_sum), "loss_count": self.loss_count,
                      "loss_nonfinite": int(self.loss_nonfinite), "samples": self.samples,
                      "train_time": self.train_time}
        ranks = all_gather_object(rank_state)
        counters = {key: getattr(self, key) for key in COUNTER_KEYS}
        return {**stored_position(self.epoch, self.batch, self.ended_epoch_batches), **counters,
                "nonfinite_total": int(self.nonfinite_total), "nonfinite_streak": int(self.nonfinite_streak),
                "ranks": ranks, "world_size": len(ranks)}

    def load_state_dict(self, checkpoint: Dict[str, Any], rank: int = 0, world_size: int = 1) -> None:
        """Restore the counters, and this rank's RNG streams and running sums.

        Args:
            checkpoint: A checkpoint dict (the keys :meth:`state_dict` wrote).
            rank: This process's rank (selects its RNG state and sums).
            world_size: Number of processes now.
        """
        for key in COUNTER_KEYS:
            setattr(self, key, checkpoint[key])
        self.epoch, self.batch = resume_position(checkpoint)
        self.ended_epoch_batches = int(checkpoint["batch"]) if self.batch == 0 else 0
        self.nonfinite_total.fill_(checkpoint.get("nonfinite_total", 0))
        self.nonfinite_streak.fill_(checkpoint.get("nonfinite_streak", 0))
        ranks: List[Dict[str, Any]] = checkpoint["ranks"]
        self.reset_epoch_meters()
        if len(ranks) != world_size:
            logger.warning("checkpoint was written by %d processes, this run has %d: the loader order and "
                           "the random streams differ from an uninterrupted run (the resume is not exact)",
                           len(ranks), world_size)
        if rank < len(ranks):
            mine = ranks[rank]
            restore_rng_state(mine["rng"])
            self.loss_sum.fill_(mine["loss_sum"])
            self.loss_count = mine["loss_count"]
            self.loss_nonfinite.fill_(mine.get("loss_nonfinite", 0))
            self.samples = mine["samples"]
            self.train_time = mine["train_time"]
