"""Train or evaluate CrossFormer / CrossFormer++ on ImageNet-1K (or the toy / synthetic sets).

    torchrun --nproc_per_node=8 main.py --cfg configs/crossformerpp_b.yaml --data-path /data/imagenet
    python main.py --cfg configs/demo.yaml                       # one process
    python main.py --cfg configs/crossformerpp_b.yaml --eval --resume output/.../best.pth
    python main.py --cfg configs/crossformerpp_b.yaml --throughput

This file parses the command line, sets up the process and dispatches; :mod:`trainer` owns the run.
It imports torch, timm and the training code only after parsing, so ``--help`` answers at once.
"""
from __future__ import annotations

import logging
import os
from typing import Any, List, Optional, Sequence

from yacs.config import CfgNode

from config import ConfigError, config_to_dict, get_config, parse_option


def run(args: Any) -> int:
    """Set up from parsed arguments, then train, evaluate or benchmark; returns the exit code.

    Args:
        args: From :func:`config.parse_option`.
    """
    # The config comes first (it holds the collective timeout): a bad one fails before any rendezvous.
    config = get_config(args, int(os.environ.get("WORLD_SIZE", "1")))
    from training.trainer import Trainer, run_throughput
    from utils.distributed import init_distributed
    from utils.logger import setup_logging
    from utils.reliability import RunStopped, check_output_writable

    dist_info = init_distributed(config.DIST.TIMEOUT_S)
    run_dir = os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)
    created = _missing_directories(run_dir)  # before the collective below: no rank has created any yet
    check_same_config(config)
    if not (config.THROUGHPUT_MODE or config.EVAL_MODE):
        check_output_writable(run_dir)
    setup_logging(dist_info.rank, None if config.THROUGHPUT_MODE else run_dir)
    try:
        if config.THROUGHPUT_MODE:
            return run_throughput(config, dist_info)
        trainer = Trainer(config, dist_info, run_dir)
        return trainer.evaluate() if config.EVAL_MODE else trainer.fit()
    except RunStopped:  # the environment stopped the run (no space, a signal): its log says why, keep it
        raise
    except Exception:  # bad input: nothing of the run existed, so nothing of it is left behind
        if dist_info.is_main:
            _remove_if_only_a_log(created)
        raise


def check_same_config(config: CfgNode) -> None:
    """Every process runs the same config (a collective: nodes started with other files or flags).

    Args:
        config: This process's config.

    Raises:
        ConfigError: on every rank, naming the first key that differs, its values and their ranks.
    """
    from training.resume import flatten
    from utils.distributed import all_gather_object

    configs = [flatten(c) for c in all_gather_object(config_to_dict(config))]
    for rank, other in enumerate(configs[1:], start=1):
        differing = sorted(key for key in configs[0].keys() | other.keys() if configs[0].get(key) != other.get(key))
        if differing:
            key, more = differing[0], f" and {len(differing) - 1} more key(s)" if len(differing) > 1 else ""
            raise ConfigError(f"the processes run different configs: {key} is {configs[0].get(key)!r} on rank 0 and "
                              f"{other.get(key)!r} on rank {rank}{more}; start every node with the same command, config "
                              "files and --opts")


def _missing_directories(path: str) -> List[str]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _remove_if_only_a_log(created: List[str]) -> None:
    """A run that failed before it wrote anything but its log leaves no directory behind: remove
    the directories this command created (deepest first) while they hold nothing else."""
    if not created:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):  # close log.txt
        if isinstance(handler, logging.FileHandler) and os.path.dirname(handler.baseFilename) == created[0]:
            root.removeHandler(handler)
            handler.close()
    log = os.path.join(created[0], "log.txt")
    if os.path.isdir(created[0]) and set(os.listdir(created[0])) <= {"log.txt"}:
        if os.path.exists(log):
            os.remove(log)
        for directory in created:
            try:
                os.rmdir(directory)  # only ever an empty directory
            except OSError:
                break


def _collective_failure(error: Exception, message: str) -> bool:
    """Whether ``error`` is a collective that failed because another rank died or hangs: torch's
    ``DistError``, a timeout, or gloo's transport error for a peer's closed connection."""
    import torch

    lowered = message.lower()
    return isinstance(error, torch.distributed.DistError) or any(
        text in lowered for text in ("timed out", "connection reset by peer", "connection closed by peer"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; a failure is one line on stderr unless ``--debug`` is given.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).
    """
    args = parse_option(argv)  # before torch is imported: --help and a mistyped flag answer at once
    from utils.distributed import cleanup, unanswered_ranks
    from utils.reliability import EXIT_ERROR, EXIT_INTERRUPTED, RunStopped, first_line, record_traceback, report_failure

    if args.local_rank is not None:  # torch.distributed.launch's flag; its launcher sets LOCAL_RANK too
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    rank = os.environ.get("RANK", "0")
    try:
        return run(args)
    except KeyboardInterrupt as e:  # before training started, or a second Ctrl-C during it
        if args.debug:
            record_traceback(e)
            raise
        cause = "interrupted; checkpoints already written are intact, the same command resumes from the newest"
        report_failure(f"aborted (rank {rank}): {cause}", cause, EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except RunStopped as e:
        if args.debug:
            record_traceback(e)
            raise
        report_failure(f"stopped (rank {rank}): {e}", str(e), e.exit_code)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - reported in one line; --debug shows the traceback
        if args.debug:
            record_traceback(e)
            raise
        message = first_line(e)
        if _collective_failure(e, message):
            lost = unanswered_ranks()
            who = (f"rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} did not answer afterwards: "
                   "lost (its process or node died) or hung" if lost else "another rank died or hangs")
            message = (f"a collective failed, {who} ({message}); waits are bounded by DIST.TIMEOUT_S: run the job "
                       "again (or use torchrun --max-restarts) to auto-resume")
        cause = f"{message} [{type(e).__name__}; rerun with --debug for the traceback]"
        # Without a store to ask, a config error (the same on every rank) is printed by one rank per node.
        report_failure(f"error (rank {rank}): {cause}", cause, EXIT_ERROR,
                       print_without_store=not isinstance(e, ConfigError) or os.environ.get("LOCAL_RANK", "0") == "0")
        return EXIT_ERROR
    finally:
        cleanup()


if __name__ == "__main__":
    from utils.process import exit_with

    exit_with(main())
