"""Logging setup: a coloured console on rank 0 and ``log.txt`` in the run directory."""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

from termcolor import colored

_FORMAT = "[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S"
_LEVEL_COLORS = {"WARNING": "yellow", "ERROR": "red", "CRITICAL": "red"}


class _ColorFormatter(logging.Formatter):
    """Green time and name, yellow / red level names for warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = colored(f"[{self.formatTime(record, _DATEFMT)} {record.name}]", "green")
        level = record.levelname
        if level in _LEVEL_COLORS:
            level = colored(level, _LEVEL_COLORS[level], attrs=["bold"])
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return f"{prefix} {level} {message}" if level != "INFO" else f"{prefix} {message}"


def setup_logging(rank: int, output_dir: Optional[str] = None, color: bool = True) -> None:
    """Route every module's ``logging`` to the console (rank 0) and ``output_dir/log.txt``.

    Other ranks only show warnings and errors, so a failing rank is still heard.

    Args:
        rank: This process's rank.
        output_dir: Run directory for ``log.txt`` (rank 0 writes it); None for console only.
        color: Colour the console (termcolor also honours NO_COLOR / FORCE_COLOR).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(_ColorFormatter() if color else logging.Formatter(_FORMAT, _DATEFMT))
    root.addHandler(console)
    if rank == 0 and output_dir:
        os.makedirs(output_dir, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(output_dir, "log.txt"), mode="a", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(_FORMAT, _DATEFMT))
        root.addHandler(file_handler)
    if rank != 0:
        # Prefix other ranks' lines so interleaved output stays readable.
        console.setFormatter(logging.Formatter(f"[rank {rank}] " + _FORMAT, _DATEFMT))
