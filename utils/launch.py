"""torchrun, with the ends of a run reported in one line instead of a launcher traceback.

    python -m utils.launch --standalone --nproc_per_node=8 main.py --cfg ...   # what launch.sh runs

The arguments are torchrun's, unchanged, and torchrun (``torch.distributed.run``) does all the
work: rendezvous, worker processes, restarts. Only its ends differ:

* A worker that exits on purpose (an error explained in one line, a preemption, Ctrl-C, a
  non-finite loss: :mod:`utils.reliability`'s exit codes) has said why on its own stderr; torchrun's
  ``ChildFailedError`` traceback would bury that line, so nothing is added and the launcher exits
  with the worker's code: the one its error file records (:func:`utils.reliability.report_failure`;
  torchrun may have killed the worker after it reported and before it exited), else its exit code.
* Any other failure (a Python traceback, a worker killed by a signal) gets one line naming the
  rank, the process and the exit code or signal; the worker's own output above it has the details.
* A stop signal to the launcher (SIGTERM or SIGUSR1: SLURM's warning and ``scancel`` reach every
  process of a job step, this one included) makes torchrun pass that signal to the workers, which
  agree on a step, save ``last.pth`` and exit 75, and wait for every one of them to exit; torchrun
  restarts none of them (``--max-restarts`` is for failures). The launcher then exits 75. Only the
  first stop signal counts: later ones (SLURM's SIGTERM after its SIGUSR1, ``launch.sh`` passing
  on a signal the launcher received itself) are ignored, so the launcher never leaves before its
  workers. Plain torchrun raises at every SIGTERM (one arriving while it waits for the workers cuts
  the wait short, a third ends the launcher) and dies of SIGUSR1 at once, orphaning workers that are
  still writing ``last.pth``; here torchrun is told to leave both signals alone (``--signals-to-handle``).
* Ctrl-C (SIGINT) stays torchrun's: the workers finish their step and save; the launcher then
  exits 130 without torchrun's ``SignalException`` traceback.

The time torchrun gives the workers before it kills them (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``,
torchrun's default 30 s) defaults here to :data:`SHUTDOWN_TIMEOUT_S`, enough for a step and a
checkpoint write.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from types import FrameType
from typing import List, Optional, Sequence

from utils.reliability import (EXIT_ERROR, EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_PREEMPTED, first_line,
                               reported_exit_code)

SHUTDOWN_TIMEOUT_S = 300
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# The exits main.py makes on purpose, each after its own one-line explanation on stderr.
PURPOSEFUL_EXITS = (EXIT_ERROR, EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_INTERRUPTED)


def failure_line(local_rank: int, pid: int, exitcode: int) -> Optional[str]:
    """The launcher's line for a failed worker, or None when the worker's own line says it all.

    Args:
        local_rank: The worker's rank on this node.
        pid: Its process id.
        exitcode: Its exit code; negative: killed by that signal (as torchrun reports it).
    """
    if exitcode in PURPOSEFUL_EXITS:
        return None
    where = f"local rank {local_rank} (pid {pid}) on {socket.gethostname()}"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (the kernel's out-of-memory killer sends SIGKILL)" if -exitcode == signal.SIGKILL else ""
        return f"launch: {where} was killed by {name}{hint}; the workers' output above has the details"
    return f"launch: {where} exited with code {exitcode}; the workers' output above has the details"


def exit_code(exitcode: int) -> int:
    """The launcher's exit status for a worker's ``exitcode`` (a signal as the shell shows it)."""
    return 128 - exitcode if exitcode < 0 else exitcode


def _repeats_left_out(record: logging.LogRecord) -> bool:
    """False for torchrun's log lines that repeat what the workers or :func:`failure_line` say:
    "failed (exitcode: N) local_rank: R ..." and "Sending process P closing signal S" (the workers
    received the terminal's Ctrl-C themselves and said so; after a failure the others are stopped,
    which the failure's line implies; a stop signal is announced by the workers). Its "Received
    SIGINT death signal" warning is left out by level."""
    message = str(record.msg)
    return not message.startswith(("failed (exitcode", "Sending process"))


class _FirstStopSignal:
    """The launcher's SIGTERM / SIGUSR1 handler: the first one raises torchrun's ``SignalException``
    (its agent then passes that signal to the workers and waits for them, restarting none), later
    ones are ignored (an exception raised again inside that wait would end the launcher early)."""

    def __init__(self) -> None:
        self.received: Optional[int] = None

    def __call__(self, signum: int, frame: Optional[FrameType]) -> None:
        from torch.distributed.elastic.multiprocessing import SignalException

        if self.received is None:
            self.received = signum
            raise SignalException(f"launcher {os.getpid()} got {signal.Signals(signum).name}",
                                  sigval=signal.Signals(signum))


def _own_stop_signals(argv: Sequence[str]) -> List[str]:
    """Install our handler for both stop signals; ``argv`` with torchrun told to leave them alone.

    torchrun installs its own handlers for the signals of ``--signals-to-handle`` (default SIGTERM,
    SIGINT, SIGHUP, SIGQUIT) each time it starts workers; they raise at every signal, so a second
    SIGTERM during its shutdown would end the launcher before its workers. The stop signals are
    taken out of that list (given or default); the rest stay torchrun's.
    """
    argv, names = list(argv), {signal.Signals(s).name for s in STOP_SIGNALS}

    def without_stops(value: str) -> str:
        return ",".join(n.strip() for n in value.split(",") if n.strip() and n.strip() not in names)

    for i, arg in enumerate(argv):
        flag, has_value, value = arg.partition("=")
        if flag in ("--signals-to-handle", "--signals_to_handle"):
            if has_value:
                argv[i] = f"{flag}={without_stops(value)}"
            elif i + 1 < len(argv):
                argv[i + 1] = without_stops(argv[i + 1])
            break
    else:
        argv.insert(0, f"--signals-to-handle={without_stops('SIGTERM,SIGINT,SIGHUP,SIGQUIT')}")
    handler = _FirstStopSignal()
    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)
    return argv


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run torchrun with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    from torch.distributed import DistNetworkError
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    logging.getLogger("torch.distributed.elastic.agent.server.api").setLevel(logging.ERROR)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_repeats_left_out)
    # torchrun's record() copies the failed worker's error file to its own launcher's, if any; without one it
    # logs an error that names only the file: the worker's line has been printed already.
    logging.getLogger("torch.distributed.elastic.multiprocessing.errors.error_handler").setLevel(logging.CRITICAL)
    argv = _own_stop_signals(sys.argv[1:] if argv is None else argv)
    try:
        torchrun_main(argv)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        reported = reported_exit_code(failure.error_file_data)
        if reported is not None:  # the worker's own line said why
            return reported
        line = failure_line(failure.local_rank, failure.pid, failure.exitcode)
        if line:
            print(line, file=sys.stderr)
        return exit_code(failure.exitcode)
    except SignalException as e:
        # A stop signal: torchrun passed it on and waited for every worker (each saved and exited 75).
        return EXIT_PREEMPTED if e.sigval in STOP_SIGNALS else 128 + int(e.sigval)
    except DistNetworkError as e:  # the rendezvous store on MASTER_ADDR:MASTER_PORT cannot be reached
        print(f"launch: cannot reach the rendezvous ({first_line(e)}); check that MASTER_ADDR and MASTER_PORT are node "
              "rank 0's address and a free port reachable from this node, that node rank 0 is running, and the "
              "network interface (docs/training.md: several nodes)", file=sys.stderr)
        return EXIT_ERROR
    finally:
        for signum in STOP_SIGNALS:  # the workers are gone: nothing is left to stop
            signal.signal(signum, signal.SIG_IGN)
    return 0


if __name__ == "__main__":
    from utils.process import exit_with

    exit_with(main())
