"""Fault handling: preemption signals, exit codes, output checks and the errors that end a run.

Exit codes of ``main.py`` (documented in ``docs/reliability.md``):

========  ================================================================================
0         finished (or stopped by ``TRAIN.STOP_AFTER_STEPS``)
1         an error: bad input, unreadable data, a dead or hung rank, a failed save
2         bad command line (argparse)
3         stopped after ``TRAIN.MAX_NONFINITE_STEPS`` consecutive non-finite steps
75        preempted (SIGTERM / SIGUSR1): ``last.pth`` written, run the same command again
130       interrupted (Ctrl-C): ``last.pth`` written at the agreed step (the first Ctrl-C), or
          aborted at once without a save (a second Ctrl-C)
========  ================================================================================
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from types import FrameType
from typing import Any, Dict, Optional, Sequence

from torch import nn

from .distributed import all_gather_object, all_reduce_max_on_host, broadcast_object, claim, rank_and_world_size

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75  # sysexits EX_TEMPFAIL: "try again later"

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# A launcher passes a terminal's interrupt on to its workers, which also received it from the
# terminal: a second SIGINT sooner than this after the first is that copy, not a second Ctrl-C.
_SECOND_INTERRUPT_AFTER_S = 1.0


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (library errors can span pages)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


# torchrun's agent sets this in every worker's environment; torch's ``record`` writes there.
ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"


def report_failure(line: str, cause: str, exit_code: int, print_without_store: bool = True) -> None:
    """Put this process's one-line failure on stderr, once per job, and in torchrun's failure summary.

    Processes that fail with the same ``cause`` (a bad config or dataset fails every rank alike)
    print it once: the first of them to claim it in the job's store
    (:func:`utils.distributed.claim`) prints its line, the others stay silent. Under torchrun every
    failing process also writes its line into its error file (``TORCHELASTIC_ERROR_FILE``, in the
    format of torch's ``record``), so that torchrun's summary shows it where it would say "To enable
    traceback see ...". The summary's "Root Cause" is the failure with the smallest timestamp
    (whole seconds; ties go to the lowest rank), so a process repeating a cause already reported
    records itself a second after the first: the root cause is the line the terminal shows. The
    file also holds ``exit_code`` (as ``errorCode``, the field torch's handler keeps the root cause's
    exit code in): torchrun may kill a process that reported its failure before it has exited, and
    ``utils.launch`` then still exits with the code the process chose.

    Args:
        line: The whole line, e.g. ``error (rank 1): ... [ValueError; rerun with --debug ...]``.
        cause: What the line says without naming this process (processes with equal causes print once).
        exit_code: The exit code this process is about to return.
        print_without_store: Whether to print when no store can be asked.
    """
    rank, now = os.environ.get("RANK", "0"), int(time.time())
    holder = claim(f"failure/{hashlib.sha256(cause.encode()).hexdigest()[:16]}", f"{rank}:{now}")
    first = holder == f"{rank}:{now}" if holder is not None else print_without_store
    if first:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    timestamp = now if first or holder is None else max(now, int(holder.rsplit(":", 1)[1]) + 1)
    _write_error_file({"message": line, "errorCode": exit_code, "extraInfo": {"timestamp": str(timestamp)}})


def record_traceback(error: BaseException) -> None:
    """Under torchrun, put ``error``'s traceback in torchrun's failure summary (what ``--debug`` asks
    for; call it inside the ``except`` block that caught ``error``).

    Args:
        error: The exception being handled.
    """
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    if os.environ.get(ERROR_FILE_ENV):
        ErrorHandler().record_exception(error)


def reported_exit_code(error_file_data: Dict[str, Any]) -> Optional[int]:
    """The exit code that :func:`report_failure` wrote in a worker's error file, else None.

    Args:
        error_file_data: The file's JSON (torch's ``ProcessFailure.error_file_data``).
    """
    message = error_file_data.get("message")
    code = message.get("errorCode") if isinstance(message, dict) else None
    return code if isinstance(code, int) and not isinstance(code, bool) else None


def _write_error_file(message: Dict[str, Any]) -> None:
    """Write ``message`` as torchrun's error file of this worker (nothing outside torchrun)."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"message": message}, f)
    except OSError:  # torchrun's summary then lacks the line; stderr still has it
        pass


class RunStopped(Exception):
    """A run that ended on purpose with a non-zero exit code; ``main`` prints the message as one line.

    Args:
        message: What happened and what to do.
        exit_code: The process exit code.
    """

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class PreemptionSignal:
    """Turn SIGTERM / SIGUSR1 / SIGINT into a stop that every rank agrees on at a step boundary.

    The handler only sets a flag. Every rank contributes its flag to a MAX all-reduce on the host
    (:func:`utils.distributed.all_reduce_max_on_host`, never a device sync), so a signal delivered
    to any single rank stops all of them after the same step: :meth:`agreed` alone, or
    ``stopping.StopPolicy`` with the other stop conditions in the same all-reduce.

    Ctrl-C (SIGINT) stops the same way, after one line on rank 0 saying so; a second Ctrl-C
    raises ``KeyboardInterrupt`` at once (``main`` reports it in one line, exit 130).

    Use as a context manager; the previous handlers are restored on exit.

    Args:
        signals: The signals that request a stop.
    """

    _FLAGS = {signal.SIGTERM: 1, signal.SIGUSR1: 1, signal.SIGINT: 2}  # MAX-reduced: an interrupt wins

    def __init__(self, signals: Sequence[int] = PREEMPTION_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: Optional[int] = None
        self._received_at = 0.0
        self._previous: Dict[int, Any] = {}
        self.stopping = False  # the last agreed decision
        self.interrupted = False  # the agreed stop came from an interrupt (Ctrl-C) on some rank
        self._reported = False

    def __enter__(self) -> "PreemptionSignal":
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            if time.monotonic() - self._received_at > _SECOND_INTERRUPT_AFTER_S:
                raise KeyboardInterrupt  # the second Ctrl-C: abort now
            return
        if self.received is None:  # a flag, and for Ctrl-C one line written straight to stderr
            self.received, self._received_at = signum, time.monotonic()
            if signum == signal.SIGINT and rank_and_world_size()[0] == 0:
                os.write(2, b"interrupt: stopping after the current step and saving last.pth; the same command "
                            b"resumes there (Ctrl-C again to abort now, without saving)\n")

    def local_flag(self) -> int:
        """This rank's request: 0 none, 1 a stop signal, 2 an interrupt (Ctrl-C)."""
        return 0 if self.received is None else self._FLAGS.get(self.received, 1)

    def agreed(self) -> bool:
        """True on every rank when any rank has received a stop signal (a collective)."""
        return self.decide(all_reduce_max_on_host([self.local_flag()])[0])

    def decide(self, agreed_flag: int) -> bool:
        """Record the flag agreed by every rank (the MAX of :meth:`local_flag`); whether to stop.

        Args:
            agreed_flag: The MAX over ranks of :meth:`local_flag`.
        """
        stop = self.stopping = agreed_flag > 0
        self.interrupted = agreed_flag == 2
        if stop and not self._reported:
            self._reported = True
            if self.received is not None:
                logger.warning("received %s: stopping at this step boundary, writing last.pth",
                               signal.Signals(self.received).name)
            else:
                logger.info("another rank received a stop signal: stopping at this step boundary")
        return stop


# -----------------------------------------------------------------------------
# Output directory checks (before the first step)
# -----------------------------------------------------------------------------
def check_output_writable(run_dir: str) -> None:
    """Create ``run_dir`` and write, fsync and remove a probe file in it, on every rank (a collective).

    Every rank raises the same error when any rank failed, and when this returns no rank creates
    ``run_dir`` any more: a rank that removes it after a failure cannot race another one creating it.

    Args:
        run_dir: The run directory.

    Raises:
        RunStopped: with the path, the cause, the rank and the fix.
    """
    probe = os.path.join(run_dir, f".write-probe-{os.getpid()}")
    problem = None
    try:
        os.makedirs(run_dir, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"0")
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        problem = e.strerror or str(e)
    problems = all_gather_object(problem)
    failed = next((rank for rank, p in enumerate(problems) if p), None)
    if failed is not None:
        where = f" on rank {failed}" if len(problems) > 1 else ""
        raise RunStopped(f"the run directory {run_dir} is not writable{where} ({problems[failed]}); pass --output "
                         "DIR on a writable file system or fix its permissions", EXIT_ERROR)


def estimate_checkpoint_bytes(model: nn.Module, with_ema: bool) -> int:
    """An upper estimate of one checkpoint file: weights, EMA weights, AdamW's two moments, slack.

    Args:
        model: The unwrapped model.
        with_ema: Whether the EMA weights are saved too.
    """
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moments = sum(2 * p.numel() * 4 for p in model.parameters() if p.requires_grad)  # exp_avg, exp_avg_sq (fp32)
    return int(weights * (2 if with_ema else 1) + moments + (1 << 20))


def check_free_space(run_dir: str, needed: int) -> None:
    """Fail early when ``run_dir`` cannot hold one more checkpoint of ``needed`` bytes (collective).

    Rank 0 measures (it is the writer) and every rank raises the same error, so none is left
    waiting in a collective.

    Args:
        run_dir: The run directory (exists on rank 0).
        needed: Bytes of one checkpoint (a save writes a temp file beside the old one).

    Raises:
        RunStopped: when the free space is smaller than ``needed``.
    """
    message = None
    if rank_and_world_size()[0] == 0:
        free = shutil.disk_usage(run_dir).free
        if free < needed:
            message = (f"only {free / 2**20:.1f} MiB free in {run_dir} but a checkpoint needs about "
                       f"{needed / 2**20:.1f} MiB; free space or pass --output DIR on a larger file system")
        elif free < 3 * needed:
            logger.warning("%s has %.1f MiB free, room for fewer than 3 checkpoints of about %.1f MiB",
                           run_dir, free / 2**20, needed / 2**20)
    message = broadcast_object(message)
    if message:
        raise RunStopped(message, EXIT_ERROR)
