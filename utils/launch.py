"""torchrun, with the ends of a run reported in one line instead of a launcher traceback.

    python -m utils.launch --standalone --nproc_per_node=8 main.py --cfg ...   # what launch.sh runs

The arguments are torchrun's, unchanged, and torchrun (``torch.distributed.run``) does all the
work: rendezvous, worker processes, restarts. Only its ends differ:

* A worker that exits on purpose (an error explained in one line, a preemption, Ctrl-C, a
  non-finite loss: :mod:`utils.reliability`'s exit codes) has said why on its own stderr; torchrun's
  ``ChildFailedError`` traceback would bury that line, so nothing is added and the launcher exits
  with the worker's code.
* Any other failure (a Python traceback, a worker killed by a signal) gets one line naming the
  rank, the process and the exit code or signal; the worker's own output above it has the details.
* A signal to the launcher (Ctrl-C from the terminal, SIGTERM) still makes torchrun stop the
  workers, which finish their step and save; the launcher then exits 128 + the signal's number
  without torchrun's ``SignalException`` traceback. The time torchrun gives the workers before it
  kills them (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, torchrun's default 30 s) defaults here to
  :data:`SHUTDOWN_TIMEOUT_S`, enough for a step and a checkpoint write.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from typing import Optional, Sequence

from utils.reliability import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_NONFINITE, EXIT_PREEMPTED

SHUTDOWN_TIMEOUT_S = 300
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
    "failed (exitcode: N) local_rank: R ..." and "Sending process P closing signal SIGINT" (the
    workers received the terminal's Ctrl-C themselves and said so). Its "Received SIGINT death
    signal" warning is left out by level."""
    message = str(record.msg)
    return not (message.startswith("failed (exitcode")
                or (message.startswith("Sending process") and "SIGINT" in map(str, record.args or ())))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run torchrun with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    logging.getLogger("torch.distributed.elastic.agent.server.api").setLevel(logging.ERROR)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_repeats_left_out)
    try:
        torchrun_main(list(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        line = failure_line(failure.local_rank, failure.pid, failure.exitcode)
        if line:
            print(line, file=sys.stderr)
        return exit_code(failure.exitcode)
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
