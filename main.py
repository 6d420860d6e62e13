"""Train or evaluate CrossFormer / CrossFormer++ on ImageNet-1K (or the toy / synthetic sets).

    torchrun --nproc_per_node=8 main.py --cfg configs/crossformerpp_b.yaml --data-path /data/imagenet
    python main.py --cfg configs/demo.yaml                       # one process
    python main.py --cfg configs/crossformerpp_b.yaml --eval --resume output/.../best.pth
    python main.py --cfg configs/crossformerpp_b.yaml --throughput

This file parses the command line, sets up the process and dispatches; :mod:`trainer` owns the run.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Optional, Sequence

import torch

from config import get_config, parse_option
from trainer import Trainer, run_throughput
from utils.distributed import cleanup, init_distributed
from utils.logger import setup_logging
from utils.reliability import EXIT_ERROR, EXIT_INTERRUPTED, RunStopped, check_output_writable, first_line


def run(args: Any) -> int:
    """Set up from parsed arguments, then train, evaluate or benchmark; returns the exit code.

    Args:
        args: From :func:`config.parse_option`.
    """
    # The config comes first (it holds the collective timeout): a bad one fails before any rendezvous.
    config = get_config(args, int(os.environ.get("WORLD_SIZE", "1")))
    dist_info = init_distributed(config.DIST.TIMEOUT_S)
    run_dir = os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)
    if not (config.THROUGHPUT_MODE or config.EVAL_MODE):
        check_output_writable(run_dir)
    setup_logging(dist_info.rank, None if config.THROUGHPUT_MODE else run_dir)
    if config.THROUGHPUT_MODE:
        return run_throughput(config, dist_info)
    trainer = Trainer(config, dist_info, run_dir)
    return trainer.evaluate() if config.EVAL_MODE else trainer.fit()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; a failure is one line on stderr unless ``--debug`` is given.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).
    """
    args = parse_option(argv)
    if args.local_rank is not None:  # torch.distributed.launch's flag; its launcher sets LOCAL_RANK too
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    rank = os.environ.get("RANK", "0")
    try:
        return run(args)
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C during it
        if args.debug:
            raise
        sys.stderr.write(f"aborted (rank {rank}): interrupted; checkpoints already written are intact, the same "
                         "command resumes from the newest\n")
        return EXIT_INTERRUPTED
    except RunStopped as e:
        if args.debug:
            raise
        sys.stderr.write(f"stopped (rank {rank}): {e}\n")
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - reported in one line; --debug shows the traceback
        if args.debug:
            raise
        message = first_line(e)
        if isinstance(e, torch.distributed.DistError) or "timed out" in message.lower():
            message = (f"a collective failed, another rank died or hangs ({message}); waits are bounded by "
                       "DIST.TIMEOUT_S: run the job again (or use torchrun --max-restarts) to auto-resume")
        sys.stderr.write(f"error (rank {rank}): {message} [{type(e).__name__}; rerun with --debug for the "
                         "traceback]\n")
        return EXIT_ERROR
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
