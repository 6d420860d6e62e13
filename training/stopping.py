"""Why a run stops, decided in one place after every optimizer step, and what each stop means.

========================  ==========================================  =================================
reason                    what is saved                               exit code
========================  ==========================================  =================================
completed                 the epoch-end files (``training/resume.py``)         0
stop after steps          ``last.pth`` (``TRAIN.STOP_AFTER_STEPS``)   0
preempted / interrupted   ``last.pth`` at the step every rank agreed  75 (SIGTERM, SIGUSR1) / 130 (Ctrl-C)
non-finite                ``nonfinite_stepN.pth``; last.pth untouched  3 (``TRAIN.MAX_NONFINITE_STEPS``)
========================  ==========================================  =================================

:class:`StopPolicy` checks all of them after every optimizer step with one host-side all-reduce,
so every rank stops at the same step. The non-finite streak lives on the device; on a GPU it
reaches the host through a pinned, non-blocking copy and is read once the copy has landed, so the
check never waits for the GPU and fires at most a few steps after the streak reached the limit
(on a CPU, at that step).
"""
from __future__ import annotations

import enum
import logging
from typing import Optional, Protocol, Tuple

import torch
from yacs.config import CfgNode

from utils.checkpoint import describe_position
from utils.distributed import all_reduce_max_on_host
from utils.reliability import EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED, PreemptionSignal, RunStopped

from .train_state import TrainState

logger = logging.getLogger(__name__)


class StopSaves(Protocol):
    """What a stop saves, and whether the step that stopped has saved already
    (``training.resume.RunCheckpoints`` is one)."""

    state: TrainState

    def save_last(self) -> None: ...

    def save_nonfinite(self) -> str: ...

    def step_save_due(self) -> bool: ...


class StopReason(enum.Enum):
    """Why an epoch (and with a stop, the run) ended."""

    COMPLETED = "completed"  # the epoch ran to its end
    STOP_AFTER_STEPS = "stop_after_steps"  # TRAIN.STOP_AFTER_STEPS reached
    PREEMPTED = "preempted"  # a stop signal, agreed by every rank
    NONFINITE = "nonfinite"  # TRAIN.MAX_NONFINITE_STEPS skipped steps in a row


class _HostValue:
    """The newest value of a 0-d device counter that has reached the host, without waiting for the device."""

    def __init__(self) -> None:
        self._host: Optional[torch.Tensor] = None
        self._copied: Optional[torch.cuda.Event] = None  # the copy in flight
        self._value = 0

    def read(self, counter: torch.Tensor) -> int:
        """``counter``'s value: exact on a CPU; on a GPU the last value whose copy has landed.

        Args:
            counter: A 0-d integer tensor.
        """
        if counter.device.type != "cuda":
            return int(counter)  # no device to wait for
        if self._copied is not None and self._copied.query():
            self._value, self._copied = int(self._host), None
        if self._copied is None:  # start the next copy behind the work already queued
            if self._host is None:
                self._host = torch.empty((), dtype=counter.dtype, pin_memory=True)
            self._host.copy_(counter, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        return self._value


class StopPolicy:
    """The one place that decides whether the run stops, and what a stop saves and returns.

    Args:
        config: Reads ``TRAIN.STOP_AFTER_STEPS`` and ``TRAIN.MAX_NONFINITE_STEPS``.
        stop_signal: The run's installed signal handler; None checks only the step limits.
    """

    def __init__(self, config: CfgNode, stop_signal: Optional[PreemptionSignal] = None) -> None:
        self.stop_after = config.TRAIN.STOP_AFTER_STEPS
        self.max_nonfinite = config.TRAIN.MAX_NONFINITE_STEPS
        self.signal = stop_signal
        self._streak = _HostValue()
        self.streak = 0  # the non-finite streak the last decision saw (agreed by every rank)

    def check(self, state: TrainState) -> Optional[StopReason]:
        """After every optimizer step (and before each epoch), on every rank: why the run stops, or None.

        A collective when distributed: one all-reduce on the host of (signal flag, non-finite streak).

        Args:
            state: The run's counters.
        """
        flag = self.signal.local_flag() if self.signal is not None else 0
        flag, self.streak = all_reduce_max_on_host([flag, self._streak.read(state.nonfinite_streak)])
        if self.signal is not None:
            self.signal.decide(flag)
        if self.stop_after and state.global_step >= self.stop_after:
            return StopReason.STOP_AFTER_STEPS
        if self.streak >= self.max_nonfinite:
            return StopReason.NONFINITE
        return StopReason.PREEMPTED if flag else None

    def conclude(self, reason: StopReason, checkpoints: StopSaves, at_epoch_start: bool = False) -> int:
        """Save what ``reason`` saves and return its exit code (a non-finite stop raises :class:`RunStopped`).

        Args:
            reason: From :meth:`check` (not ``COMPLETED``).
            checkpoints: The run's checkpoints (a collective: every rank calls this).
            at_epoch_start: The stop was found before an epoch began: a step limit reached there was
                reached by the checkpoint this run resumed from, which already holds the position.
        """
        state = checkpoints.state
        if reason is StopReason.NONFINITE:
            path = checkpoints.save_nonfinite()  # never last.pth / best.pth
            raise RunStopped(
                f"stopped at global step {state.global_step}: the last {self.streak} optimizer steps had a non-finite "
                f"loss or gradient and were skipped (TRAIN.MAX_NONFINITE_STEPS={self.max_nonfinite}); the state is in "
                f"{path}, last.pth is untouched: lower TRAIN.BASE_LR or TRAIN.CLIP_GRAD, or check the data, then run "
                "again to resume from last.pth", EXIT_NONFINITE)
        if reason is StopReason.STOP_AFTER_STEPS and at_epoch_start:
            logger.info("stopping: TRAIN.STOP_AFTER_STEPS=%d reached", self.stop_after)
            return EXIT_OK
        if at_epoch_start or not checkpoints.step_save_due():  # else the step itself saved
            checkpoints.save_last()
        if reason is StopReason.STOP_AFTER_STEPS:
            logger.info("stopping after global step %d: TRAIN.STOP_AFTER_STEPS=%d", state.global_step,
                        self.stop_after)
            return EXIT_OK
        what, code = self._preemption()
        position = describe_position(state.epoch, state.batch).replace("after epoch", "the end of epoch")
        logger.warning("%s: last.pth holds %s, global step %d; run the same command to continue (exit code %d)",
                       what, position, state.global_step, code)
        return code

    def _preemption(self) -> Tuple[str, int]:
        interrupted = self.signal is not None and self.signal.interrupted
        return ("interrupted", EXIT_INTERRUPTED) if interrupted else ("preempted", EXIT_PREEMPTED)
