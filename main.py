"""Train or evaluate CrossFormer / CrossFormer++ on ImageNet-1K (or the toy / synthetic sets).

    torchrun --nproc_per_node=8 main.py --cfg configs/crossformerpp_b.yaml --data-path /data/imagenet
    python main.py --cfg configs/demo.yaml                       # one process
    python main.py --cfg configs/crossformerpp_b.yaml --eval --resume output/.../best.pth
    python main.py --cfg configs/crossformerpp_b.yaml --throughput
"""
from __future__ import annotations

import json
import logging
import os
import random
import shlex
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from yacs.config import CfgNode

from config import config_to_dict, dump_config, get_config, parse_option
from data import build_loader, build_mixup
from engine import evaluate, measure_throughput, steps_per_epoch, summarize_train_epoch, train_one_epoch
from models import build_model
from optim import build_optimizer, build_scheduler
from utils.checkpoint import (BEST, EMA_BEST, LAST, NONFINITE_PREFIX, IncompatibleCheckpoint, TrainState,
                              check_format, epoch_checkpoint_name, find_resume_candidates, load_checkpoint,
                              load_pretrained, remap_position, save_checkpoint)
from utils.distributed import DistInfo, all_gather_object, cleanup, init_distributed
from utils.reliability import (EXIT_ERROR, EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED, PreemptionSignal, RunStopped,
                               check_free_space, check_output_writable, estimate_checkpoint_bytes,
                               remove_stale_temp_files)
from utils.logger import setup_logging
from utils.metrics import RunRecorder
from utils.precision import resolve_amp

logger = logging.getLogger("main")


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), NumPy and Python ``random``.

    Args:
        seed: The seed.
    """
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def build_criterion(config: CfgNode, mixup: bool) -> nn.Module:
    """Soft-target CE with mixup / cutmix (which apply the label smoothing), else smoothed CE.

    Args:
        config: Reads ``MODEL.LABEL_SMOOTHING``.
        mixup: Whether batches come with soft targets.
    """
    if mixup:
        return SoftTargetCrossEntropy()
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


def run_throughput(config: CfgNode, model: nn.Module, dist_info: DistInfo, amp_dtype: Optional[torch.dtype]) -> None:
    """Measure, then print a table and, as the last line, one JSON object (rank 0).

    Args:
        config: The run's config.
        model: Unwrapped model on the device.
        dist_info: This process's place in the job.
        amp_dtype: Autocast dtype, None for float32.
    """
    result = measure_throughput(model, config, dist_info.device, amp_dtype)
    if not dist_info.is_main:
        return
    rows = [(key, f"{value:.1f}" if isinstance(value, float) else str(value)) for key, value in result.items()]
    width = max(len(key) for key, _ in rows)
    table = "\n".join(f"{key:<{width}}  {value}" for key, value in rows)
    sys.stdout.write(f"{table}\n{json.dumps(result)}\n")
    sys.stdout.flush()


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
    return _run(config, dist_info, run_dir)


def _run(config: CfgNode, dist_info: DistInfo, run_dir: str) -> int:
    total_batch = config.DATA.BATCH_SIZE * dist_info.world_size * config.TRAIN.ACCUMULATION_STEPS
    logger.info("%d process(es) on %s; total batch %d = %d per process x %d x %d accumulation steps",
                dist_info.world_size, dist_info.device, total_batch, config.DATA.BATCH_SIZE,
                dist_info.world_size, config.TRAIN.ACCUMULATION_STEPS)
    logger.info("LR entered (for a total batch of %d): base %g, warmup %g, min %g; scaled: base %g, warmup %g, min %g",
                config.TRAIN.LR_REFERENCE_BATCH, config.TRAIN.BASE_LR, config.TRAIN.WARMUP_LR, config.TRAIN.MIN_LR,
                config.TRAIN.SCALED_BASE_LR, config.TRAIN.SCALED_WARMUP_LR, config.TRAIN.SCALED_MIN_LR)
    device = dist_info.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # --eval needs only its own precision: an fp16 run's config evaluates on a CPU with TEST.AMP none.
    amp_dtype = None if config.EVAL_MODE and config.TEST.AMP != "train" else resolve_amp(config.TRAIN.AMP, device)
    # Validation and --eval: TEST.AMP none gives a float32 number comparable across precisions.
    eval_dtype = amp_dtype if config.TEST.AMP == "train" else resolve_amp(config.TEST.AMP, device, "TEST.AMP")

    seed_everything(config.SEED)  # the same initial weights on every rank
    model = build_model(config)
    if config.MODEL.PRETRAINED:
        load_pretrained(model, config.MODEL.PRETRAINED)
    model.to(device)
    # Per-rank streams from here on: drop path and mixup differ between ranks.
    seed_everything(config.SEED + dist_info.rank)
    logger.info("%s: %.2fM parameters", config.MODEL.NAME, sum(p.numel() for p in model.parameters()) / 1e6)
    if config.THROUGHPUT_MODE:
        run_throughput(config, model, dist_info, amp_dtype)
        return EXIT_OK

    loaders = build_loader(config, device)
    if loaders.num_classes != config.MODEL.NUM_CLASSES:
        raise ValueError(f"the dataset has {loaders.num_classes} classes but MODEL.NUM_CLASSES="
                         f"{config.MODEL.NUM_CLASSES}; set --opts MODEL.NUM_CLASSES {loaders.num_classes}")
    mixup_fn = build_mixup(config)
    criterion = build_criterion(config, mixup_fn is not None)

    model_without_ddp = model
    eval_model: nn.Module = torch.compile(model) if config.TRAIN.COMPILE else model
    train_model: nn.Module = eval_model
    if dist_info.distributed:
        train_model = DistributedDataParallel(eval_model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(config, model_without_ddp)
    epoch_steps = steps_per_epoch(len(loaders.train), config.TRAIN.ACCUMULATION_STEPS)
    scheduler = build_scheduler(config, optimizer, epoch_steps)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    # Created after DDP has broadcast rank 0's weights, so every rank's EMA starts equal.
    ema = ModelEmaV3(model_without_ddp, decay=config.TRAIN.EMA.DECAY) if config.TRAIN.EMA.ENABLE else None
    state = TrainState(model_without_ddp, optimizer, scheduler, scaler, ema, config_to_dict(config), device)
    resume_path = resume(state, config, run_dir, dist_info, len(loaders.train))

    if config.EVAL_MODE:
        if not (resume_path or config.MODEL.PRETRAINED):
            raise ValueError(f"--eval found no weights: pass --resume PATH or --pretrained PATH (no checkpoint "
                             f"in {run_dir})")
        return run_eval(eval_model, ema, loaders.val, device, eval_dtype, dist_info)

    # Before the first step: a full disk fails now, not at the first save hours later.
    check_free_space(run_dir, estimate_checkpoint_bytes(model_without_ddp, ema is not None))
    if dist_info.is_main:
        remove_stale_temp_files(run_dir)
        # Written only once every input was accepted: a rejected command leaves the old config.yaml.
        dump_config(config, os.path.join(run_dir, "config.yaml"))
        logger.info("run directory %s; full config in config.yaml", run_dir)
    # Installed only now: before training there is nothing to save, and a process blocked in set-up
    # (e.g. a rendezvous) must still die on the launcher's SIGTERM.
    with PreemptionSignal() as stop_signal:
        return train(config, dist_info, run_dir, train_model, eval_model, criterion, loaders, mixup_fn, optimizer,
                     scheduler, scaler, ema, state, amp_dtype, eval_dtype, resumed=bool(resume_path),
                     stop_signal=stop_signal)


def resume(state: TrainState, config: CfgNode, run_dir: str, dist_info: DistInfo, num_batches: int) -> str:
    """Restore ``state`` from ``--resume`` or the newest loadable checkpoint of ``run_dir``.

    Auto-resume falls back to the next older checkpoint when one cannot be loaded (one warning
    line with its path; no file is deleted). Every rank must load the same file, so each
    candidate's outcome is agreed with one collective. A checkpoint of another model is an
    error, never skipped. With another world size, batch size or accumulation, the position and
    the LR schedule are moved to the new global batch and the consequences are logged.

    Args:
        state: The fresh training state.
        config: Reads ``MODEL.RESUME``, ``TRAIN.AUTO_RESUME``, ``EVAL_MODE`` and the batch keys.
        run_dir: The run directory (auto-resume looks here).
        dist_info: This process's place in the job.
        num_batches: Batches per epoch of this rank's train loader.

    Returns:
        The checkpoint resumed from, "" when none.
    """
    if config.MODEL.RESUME:
        candidates, explicit = [config.MODEL.RESUME], True
    elif config.TRAIN.AUTO_RESUME:
        candidates, explicit = find_resume_candidates(run_dir), False
    else:
        return ""
    batch_keys = (dist_info.world_size, config.DATA.BATCH_SIZE, config.TRAIN.ACCUMULATION_STEPS)
    for path in candidates:
        error, saved_keys = None, batch_keys
        try:
            checkpoint = load_checkpoint(path)
            check_format(checkpoint)
            saved = checkpoint.get("config") or {}
            saved_keys = (int(checkpoint.get("world_size", len(checkpoint["ranks"]))),
                          int(saved.get("DATA", {}).get("BATCH_SIZE", config.DATA.BATCH_SIZE)),
                          int(saved.get("TRAIN", {}).get("ACCUMULATION_STEPS", config.TRAIN.ACCUMULATION_STEPS)))
            state.load_state_dict(checkpoint, dist_info.rank, dist_info.world_size, weights_only=config.EVAL_MODE,
                                  restore_schedule=saved_keys == batch_keys)
            del checkpoint
        except IncompatibleCheckpoint as e:
            raise ValueError(f"cannot resume {path}: {e}") from None
        except (OSError, EOFError, ValueError, KeyError, TypeError, RuntimeError) as e:
            error = f"{type(e).__name__}: {_first_line(e)}"
        errors = [message for message in all_gather_object(error) if message]  # collective: agree on the file
        if errors and explicit:
            raise ValueError(f"cannot resume {path} ({errors[0]}); pass a complete checkpoint to --resume")
        if errors:
            logger.warning("cannot resume %s (%s); trying the previous checkpoint", path, errors[0])
            continue
        logger.info("resumed from %s: epoch %d, batch %d, global step %d", path, state.epoch, state.batch,
                    state.global_step)
        if saved_keys != batch_keys and not config.EVAL_MODE:
            _adapt_to_global_batch(state, config, saved_keys, dist_info.world_size, num_batches)
        return path
    if candidates:
        raise ValueError(f"none of the {len(candidates)} checkpoint(s) in {run_dir} can be loaded (see the warnings "
                         "above); move them aside to start afresh, or pass a good one to --resume")
    return ""


def _adapt_to_global_batch(state: TrainState, config: CfgNode, saved_keys: Tuple[int, int, int], world_size: int,
                           num_batches: int) -> None:
    saved_world, saved_batch, saved_accumulation = saved_keys
    accumulation = config.TRAIN.ACCUMULATION_STEPS
    saved_total = saved_world * saved_batch * saved_accumulation
    total = world_size * config.DATA.BATCH_SIZE * accumulation
    old_batch, old_step = remap_position(state, saved_world, saved_batch, world_size, config.DATA.BATCH_SIZE,
                                         accumulation, num_batches)
    state.scheduler.step_update(state.global_step)  # the rebuilt schedule, at the moved position
    samples_per_rank = num_batches * config.DATA.BATCH_SIZE * world_size
    saved_steps = -(-(samples_per_rank // (saved_world * saved_batch)) // saved_accumulation)
    reference = config.TRAIN.LR_REFERENCE_BATCH
    logger.warning(
        "the checkpoint was written with a total batch of %d (%d processes x %d x %d accumulation), this run has "
        "%d (%d x %d x %d): base LR %.4g -> %.4g (%s); optimizer steps per epoch ~%d -> %d; epoch %d continues at "
        "batch %d (was %d), global step %d (was %d), the same fraction of the LR schedule; the data order now "
        "differs from an uninterrupted run", saved_total, saved_world, saved_batch, saved_accumulation, total,
        world_size, config.DATA.BATCH_SIZE, accumulation,
        config.TRAIN.BASE_LR * saved_total / reference if reference else config.TRAIN.BASE_LR,
        config.TRAIN.SCALED_BASE_LR, f"linear scaling from TRAIN.LR_REFERENCE_BATCH={reference}" if reference
        else "no LR scaling", saved_steps, steps_per_epoch(num_batches, accumulation), state.epoch, state.batch,
        old_batch, state.global_step, old_step)


def _first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (library errors can span pages)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def run_eval(model: nn.Module, ema: Optional[ModelEmaV3], val_loader: Any, device: torch.device,
             amp_dtype: Optional[torch.dtype], dist_info: DistInfo) -> int:
    """Evaluate the loaded weights (and EMA), log them and print one JSON line (rank 0).

    Args:
        model: Unwrapped (possibly compiled) model with the weights to evaluate.
        ema: The EMA, evaluated too when given.
        val_loader: This rank's validation shard.
        device: Compute device.
        amp_dtype: Autocast dtype (``TEST.AMP``), None for float32; reported as ``amp``.
        dist_info: This process's place in the job.
    """
    result: Dict[str, Any] = {"amp": {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]}
    stats = evaluate(model, val_loader, device, amp_dtype)
    result.update({"val_acc1": stats["acc1"], "val_acc5": stats["acc5"], "val_loss": stats["loss"],
                   "val_count": stats["count"]})
    logger.info("eval: acc@1 %.3f  acc@5 %.3f  loss %.4f on %d images", stats["acc1"], stats["acc5"],
                stats["loss"], stats["count"])
    if ema is not None:
        ema_stats = evaluate(ema.module, val_loader, device, amp_dtype)
        result.update({"ema_val_acc1": ema_stats["acc1"], "ema_val_acc5": ema_stats["acc5"],
                       "ema_val_loss": ema_stats["loss"]})
        logger.info("eval EMA: acc@1 %.3f  acc@5 %.3f  loss %.4f", ema_stats["acc1"], ema_stats["acc5"],
                    ema_stats["loss"])
    if dist_info.is_main:
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


def train(config: CfgNode, dist_info: DistInfo, run_dir: str, train_model: nn.Module, eval_model: nn.Module,
          criterion: nn.Module, loaders: Any, mixup_fn: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
          scaler: Optional[torch.amp.GradScaler], ema: Optional[ModelEmaV3], state: TrainState,
          amp_dtype: Optional[torch.dtype], eval_dtype: Optional[torch.dtype], resumed: bool,
          stop_signal: Optional[PreemptionSignal] = None) -> int:
    """The epoch loop: train, validate (raw and EMA), track the best, checkpoint, record.

    Returns ``EXIT_OK``, or ``EXIT_PREEMPTED`` after a stop signal (``last.pth`` holds the
    position reached); raises :class:`RunStopped` after too many non-finite steps in a row.

    Args:
        config: The run's config.
        dist_info: This process's place in the job.
        run_dir: Where checkpoints and records go.
        train_model: The model to train (DDP-wrapped when distributed).
        eval_model: The unwrapped (possibly compiled) model for validation.
        criterion: Training loss.
        loaders: ``.train`` and ``.val`` from ``data.build_loader``.
        mixup_fn: timm ``Mixup`` or None.
        optimizer: AdamW.
        scheduler: Per-step LR schedule.
        scaler: GradScaler for fp16, else None.
        ema: ``ModelEmaV3`` or None.
        state: The training state, possibly resumed.
        amp_dtype: Autocast dtype of training, None for float32.
        eval_dtype: Autocast dtype of validation (``TEST.AMP``), None for float32.
        resumed: Whether ``state`` came from a checkpoint (drops stale metrics rows).
        stop_signal: Checked (a collective) after every optimizer step and before every epoch.
    """
    device = dist_info.device
    recorder = RunRecorder(run_dir, dist_info.is_main, resume_epoch=state.epoch if resumed else None,
                           resume_step=state.global_step if resumed else None)

    def checkpoint_step(current: TrainState) -> None:
        save_checkpoint(current, run_dir, [LAST], dist_info.is_main)

    def preempted() -> int:
        logger.warning("preempted: last.pth holds epoch %d, batch %d, global step %d; run the same command to "
                       "continue (exit code %d)", state.epoch, state.batch, state.global_step, EXIT_PREEMPTED)
        return EXIT_PREEMPTED

    should_stop = stop_signal.agreed if stop_signal is not None else None

    stop_after = config.TRAIN.STOP_AFTER_STEPS
    logger.info("training epochs %d..%d from batch %d (%d optimizer steps per epoch)", state.epoch,
                config.TRAIN.EPOCHS - 1, state.batch, steps_per_epoch(len(loaders.train),
                                                                      config.TRAIN.ACCUMULATION_STEPS))
    start_time = time.time()
    try:
        while state.epoch < config.TRAIN.EPOCHS:
            if stop_after and state.global_step >= stop_after:
                logger.info("stopping: TRAIN.STOP_AFTER_STEPS=%d reached", stop_after)
                return EXIT_OK
            if should_stop is not None and should_stop():  # signalled during evaluation or a save
                checkpoint_step(state)
                return preempted()
            epoch = state.epoch
            loaders.train.set_epoch(epoch, start_batch=state.batch)
            finished = train_one_epoch(train_model, criterion, loaders.train, optimizer, scheduler, state, config,
                                       amp_dtype=amp_dtype, scaler=scaler, ema=ema, mixup_fn=mixup_fn,
                                       on_log=recorder.scalars, on_step=checkpoint_step, should_stop=should_stop)
            if not finished:
                streak = int(state.nonfinite_streak)
                if streak >= config.TRAIN.MAX_NONFINITE_STEPS:
                    name = f"{NONFINITE_PREFIX}{state.global_step}.pth"
                    save_checkpoint(state, run_dir, [name], dist_info.is_main)  # never last.pth / best.pth
                    raise RunStopped(
                        f"stopped at global step {state.global_step}: the last {streak} optimizer steps had a "
                        f"non-finite loss or gradient and were skipped (TRAIN.MAX_NONFINITE_STEPS="
                        f"{config.TRAIN.MAX_NONFINITE_STEPS}); the state is in {os.path.join(run_dir, name)}, "
                        "last.pth is untouched: lower TRAIN.BASE_LR or TRAIN.CLIP_GRAD, or check the data, then "
                        "run again to resume from last.pth", EXIT_NONFINITE)
                if not (config.SAVE_STEPS and state.global_step % config.SAVE_STEPS == 0):
                    checkpoint_step(state)  # not saved by the step itself
                if stop_signal is not None and stop_signal.stopping:
                    return preempted()
                logger.info("stopping after global step %d: TRAIN.STOP_AFTER_STEPS=%d", state.global_step, stop_after)
                return EXIT_OK
            row: Dict[str, Any] = {"epoch": epoch, **summarize_train_epoch(state)}
            row["lr"] = optimizer.param_groups[0]["lr"]
            stats = evaluate(eval_model, loaders.val, device, eval_dtype)
            row.update({"val_acc1": stats["acc1"], "val_acc5": stats["acc5"], "val_loss": stats["loss"]})
            names: List[str] = []
            if stats["acc1"] > state.best_acc1:  # update the best before best.pth is written
                state.best_acc1, state.best_epoch = stats["acc1"], epoch
                names.append(BEST)
            if ema is not None:
                ema_stats = evaluate(ema.module, loaders.val, device, eval_dtype)
                row.update({"ema_val_acc1": ema_stats["acc1"], "ema_val_acc5": ema_stats["acc5"],
                            "ema_val_loss": ema_stats["loss"]})
                if ema_stats["acc1"] > state.best_ema_acc1:
                    state.best_ema_acc1, state.best_ema_epoch = ema_stats["acc1"], epoch
                    names.append(EMA_BEST)
            logger.info("epoch %d: train loss %.4f  val acc@1 %.3f (best %.3f @ %d)  acc@5 %.3f  loss %.4f%s",
                        epoch, row["train_loss"], stats["acc1"], state.best_acc1, state.best_epoch, stats["acc5"],
                        stats["loss"], f"  EMA acc@1 {row['ema_val_acc1']:.3f} (best {state.best_ema_acc1:.3f})"
                        if ema is not None else "")
            row.update({"global_step": state.global_step, "best_acc1": state.best_acc1})
            # The checkpoint describes the start of the next epoch.
            state.epoch, state.batch = epoch + 1, 0
            state.reset_epoch_meters()
            last_epoch = state.epoch == config.TRAIN.EPOCHS
            if state.epoch % config.SAVE_FREQ == 0 or last_epoch:
                keep = config.SAVE_KEEP
                names = ([epoch_checkpoint_name(epoch)] if keep else []) + [LAST] + names
            if names:  # the same on every rank: the accuracies are global
                save_checkpoint(state, run_dir, names, dist_info.is_main, keep_epochs=config.SAVE_KEEP)
            recorder.epoch(row, state.global_step)
    finally:
        recorder.close()
    elapsed = time.time() - start_time
    logger.info("done in %s: best acc@1 %.3f (epoch %d)%s", time.strftime("%H:%M:%S", time.gmtime(elapsed)),
                state.best_acc1, state.best_epoch,
                f", best EMA acc@1 {state.best_ema_acc1:.3f} (epoch {state.best_ema_epoch})" if ema is not None else "")
    log_run_outputs(run_dir, ema is not None)
    return EXIT_OK


def log_run_outputs(run_dir: str, has_ema: bool) -> None:
    """Say where the run's results are and the one command that evaluates its best checkpoint.

    Args:
        run_dir: The run directory.
        has_ema: Whether an EMA of the weights was kept (``ema_best.pth``).
    """
    best = os.path.join(run_dir, BEST)
    logger.info("run directory:   %s (config.yaml, log.txt, metrics.jsonl)", run_dir)
    logger.info("TensorBoard:     tensorboard --logdir %s", os.path.join(run_dir, "tensorboard"))
    logger.info("best checkpoint: %s%s", best, f" (EMA weights: {os.path.join(run_dir, EMA_BEST)})" if has_ema else "")
    logger.info("evaluate it:     python main.py --cfg %s --eval --resume %s",
                shlex.quote(os.path.join(run_dir, "config.yaml")), shlex.quote(best))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; a failure is one line on stderr unless ``--debug`` is given.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).
    """
    args = parse_option(argv)
    rank = os.environ.get("RANK", "0")
    try:
        return run(args)
    except KeyboardInterrupt:
        raise
    except RunStopped as e:
        if args.debug:
            raise
        sys.stderr.write(f"stopped (rank {rank}): {e}\n")
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - reported in one line; --debug shows the traceback
        if args.debug:
            raise
        message = _first_line(e)
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
