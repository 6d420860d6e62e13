"""The run's owner: builds every component once, then trains (:meth:`Trainer.fit`) or evaluates.

Data flows one way: config -> :class:`Trainer` (loaders, model and its wrappers, optimizer,
scheduler, scaler, EMA, checkpoint manager) -> :func:`engine.train_one_epoch` per epoch ->
:class:`resume.RunCheckpoints` after steps and epochs.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from timm.utils import ModelEmaV3, random_seed
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from yacs.config import CfgNode

from config import dump_config
from data import build_loader, build_mixup
from deploy.analysis import analyze_pass, write_class_ap
from models import build_model, freeze, keep_head_for_classes, load_pretrained
from models.stored import read_stored_info
from optim import build_optimizer, build_scheduler, current_lr, steps_per_epoch, warmup_epochs
from utils.checkpoint import BEST, EMA_BEST, find_resume_candidates
from utils.distributed import DistInfo
from utils.file_io import atomic_write_text, load_file, remove_stale_temp_files
from utils.metrics import RunRecorder
from utils.precision import amp_name, resolve_amp, set_tf32
from utils.progress import EpochProgress
from utils.reliability import EXIT_OK, PreemptionSignal, check_free_space, estimate_checkpoint_bytes

from .distill import build_distiller
from .engine import Components, evaluate, measure_throughput, summarize_train_epoch, train_one_epoch
from .loss import build_criterion
from .resume import RunCheckpoints, history_lines, warn_if_other_classes
from .stopping import StopPolicy, StopReason
from .train_state import TrainState

logger = logging.getLogger(__name__)

def prepare_model(config: CfgNode, dist_info: DistInfo) -> nn.Module:
    """The configured model, initialised identically on every rank, on this rank's device.

    Seeds from ``SEED`` first (the same initial weights everywhere), loads ``--pretrained``, freezes
    what ``TRAIN.FREEZE`` names (before the optimizer and DDP see the model), then reseeds per rank
    (drop path and mixup differ between ranks).

    Args:
        config: Reads ``MODEL.*``, ``TRAIN.FREEZE``, ``SEED``.
        dist_info: This process's place in the job.
    """
    random_seed(config.SEED)
    model = build_model(config)
    if config.MODEL.PRETRAINED:
        saved = load_pretrained(model, config.MODEL.PRETRAINED, config.MODEL.PRETRAINED_WEIGHTS)
        warn_if_trained_at_another_size(saved, config, config.MODEL.PRETRAINED)
    freeze(model, config.TRAIN.FREEZE)
    model.to(dist_info.device)
    random_seed(config.SEED, dist_info.rank)
    logger.info("%s: %.2fM parameters", config.MODEL.NAME, sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def warn_if_trained_at_another_size(saved: Optional[Dict[str, Any]], config: CfgNode, path: str) -> None:
    """``--eval`` of weights trained at another image size: a one-line warning (accuracy drops).

    Args:
        saved: The config the weights were trained with (None when the file has none).
        config: This run's config.
        path: The checkpoint, for the message.
    """
    trained = ((saved or {}).get("DATA") or {}).get("IMG_SIZE")
    if config.EVAL_MODE and trained and trained != config.DATA.IMG_SIZE:
        logger.warning("evaluating %s at %d px, but it was trained at %d px; --opts DATA.IMG_SIZE %d evaluates it at "
                       "its own size", path, config.DATA.IMG_SIZE, trained, trained)


def run_throughput(config: CfgNode, dist_info: DistInfo) -> int:
    """``--throughput``: measure, then print a table and, as the last line, one JSON object (rank 0).

    Args:
        config: The run's config.
        dist_info: This process's place in the job.
    """
    if dist_info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    set_tf32(config.TRAIN.TF32, dist_info.device)
    model = prepare_model(config, dist_info)
    amp_dtype = resolve_amp(config.TRAIN.AMP, dist_info.device, force_bf16=config.TRAIN.FORCE_BF16)
    result = measure_throughput(model, config, dist_info.device, amp_dtype)
    if dist_info.is_main:
        rows = [(key, f"{value:.1f}" if isinstance(value, float) else str(value)) for key, value in result.items()]
        width = max(len(key) for key, _ in rows)
        table = "\n".join(f"{key:<{width}}  {value}" for key, value in rows)
        sys.stdout.write(f"{table}\n{json.dumps(result)}\n")
        sys.stdout.flush()
    return EXIT_OK


def _precisions(config: CfgNode, device: torch.device) -> Tuple[Optional[torch.dtype], Optional[torch.dtype]]:
    """(training, validation and --eval) autocast dtypes, as :func:`utils.precision.resolve_amp` resolves them.

    ``--eval`` needs only its own precision: an fp16 run's config evaluates on a CPU with TEST.AMP
    none. ``TEST.AMP none`` gives a float32 number comparable across precisions.
    """
    force = config.TRAIN.FORCE_BF16
    train = None if config.EVAL_MODE and config.TEST.AMP != "train" else resolve_amp(config.TRAIN.AMP, device,
                                                                                      force_bf16=force)
    if config.TEST.AMP == "train":
        return train, train
    return train, resolve_amp(config.TEST.AMP, device, "TEST.AMP", force)


def _wrap_for_training(model: nn.Module, config: CfgNode, dist_info: DistInfo) -> nn.Module:
    """DDP when distributed; with ``TRAIN.COMPILE`` the DDP-wrapped model is compiled, so that
    DDP's gradient buckets overlap the backward pass (its optimizer splits the graph at them)."""
    wrapped = model
    if dist_info.distributed:
        device = dist_info.device
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if not config.TRAIN.COMPILE:
        return wrapped
    logger.info("torch.compile (backend %s) of the %s", config.TRAIN.COMPILE_BACKEND,
                "DDP-wrapped model" if dist_info.distributed else "model")
    return torch.compile(wrapped, backend=config.TRAIN.COMPILE_BACKEND)


def _val_columns(stats: Dict[str, Any], prefix: str) -> Dict[str, float]:
    """A validation pass's numbers as result / metrics.jsonl columns: ``{prefix}acc1``, ``{prefix}acc5`` and
    ``{prefix}loss``, or for multi-label data ``{prefix}map`` and ``{prefix}loss``."""
    names = ("map", "loss") if "map" in stats else ("acc1", "acc5", "loss")
    return {f"{prefix}{name}": stats[name] for name in names}


def _describe(stats: Dict[str, Any]) -> str:
    """A validation pass's numbers for a log line."""
    if "map" in stats:
        return f"mAP {stats['map']:.3f}  loss {stats['loss']:.4f}"
    return f"acc@1 {stats['acc1']:.3f}  acc@5 {stats['acc5']:.3f}  loss {stats['loss']:.4f}"


def _no_weights_to_evaluate(run_dir: str) -> str:
    """The one line for ``--eval`` without ``--resume`` or ``--pretrained``."""
    newest = find_resume_candidates(run_dir)
    hint = f" (the newest checkpoint of {run_dir} is {newest[0]})" if newest else ""
    return ("--eval found no weights to evaluate: name them with --resume FILE (a training checkpoint: its weights, "
            "and its EMA weights with TRAIN.EMA.ENABLE True) or --pretrained FILE (add --use-ema for its EMA weights)"
            f"{hint}; --eval never picks a file of the run directory by itself")


@dataclass
class ValidationPass:
    """What one validation pass of the weights computed: the pass's numbers and this rank's rows of
    :func:`engine.evaluate`'s ``collect`` (empty for multi-label data, whose numbers hold each class's AP).

    Args:
        epoch: The epoch whose weights were validated.
        stats: :func:`engine.evaluate`'s result.
        collected: This rank's ``(targets, top-5 classes, probabilities)`` per batch.
    """

    epoch: int
    stats: Dict[str, Any]
    collected: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)


class Trainer:
    """Owns a run's components; :meth:`fit` trains, :meth:`evaluate` runs ``--eval``.

    Building it restores ``--resume`` or the newest checkpoint of the run directory.

    Args:
        config: The validated, frozen config.
        dist_info: This process's place in the job.
        run_dir: Where checkpoints, logs and records go.
    """

    def __init__(self, config: CfgNode, dist_info: DistInfo, run_dir: str) -> None:
        self.config, self.dist_info, self.run_dir = config, dist_info, run_dir
        if config.EVAL_MODE and not (config.MODEL.RESUME or config.MODEL.PRETRAINED):
            raise ValueError(_no_weights_to_evaluate(run_dir))
        device = dist_info.device
        self._log_batch_and_lr()
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        set_tf32(config.TRAIN.TF32, device)
        amp_dtype, self.eval_dtype = _precisions(config, device)
        model = prepare_model(config, dist_info)
        self.loaders = build_loader(config, device)
        if self.loaders.num_classes != config.MODEL.NUM_CLASSES:
            raise ValueError(f"the dataset has {self.loaders.num_classes} classes but MODEL.NUM_CLASSES="
                             f"{config.MODEL.NUM_CLASSES}; set --opts MODEL.NUM_CLASSES {self.loaders.num_classes}")
        if config.MODEL.PRETRAINED and not config.EVAL_MODE:  # rank 0's head reaches every rank through DDP
            keep_head_for_classes(model, config.MODEL.PRETRAINED, self.loaders.class_names)
        self.parts = self._build_components(model, amp_dtype)
        # Evaluation runs the unwrapped weights: DDP's forward would add collectives that hang on uneven rank parts.
        self.eval_model = model
        if config.TRAIN.COMPILE:
            self.eval_model = torch.compile(model, backend=config.TRAIN.COMPILE_BACKEND)
        self.state = TrainState(device)
        self.checkpoints = RunCheckpoints(run_dir, self.parts, self.state, config, dist_info,
                                          class_names=self.loaders.class_names)
        self.resumed_from = self.checkpoints.resume(len(self.loaders.train))
        # The epoch-end pass over the weights best.pth holds, when this process validated them: the
        # end-of-run analysis is written from it instead of a second pass over the same weights.
        self.best_pass: Optional[ValidationPass] = None

    def _log_batch_and_lr(self) -> None:
        config, world_size = self.config, self.dist_info.world_size
        train = config.TRAIN
        if config.EVAL_MODE:  # no step is taken: the total batch and the LRs do not concern it
            logger.info("%d process(es) on %s; batch %d per process", world_size, self.dist_info.device,
                        config.DATA.BATCH_SIZE)
            return
        logger.info("%d process(es) on %s; total batch %d = %d per process x %d x %d accumulation steps",
                    world_size, self.dist_info.device, config.DATA.BATCH_SIZE * world_size * train.ACCUMULATION_STEPS,
                    config.DATA.BATCH_SIZE, world_size, train.ACCUMULATION_STEPS)
        logger.info("LR entered (for a total batch of %d): base %g, warmup %g, min %g; scaled: base %g, warmup %g, "
                    "min %g", train.LR_REFERENCE_BATCH, train.BASE_LR, train.WARMUP_LR, train.MIN_LR,
                    train.SCALED_BASE_LR, train.SCALED_WARMUP_LR, train.SCALED_MIN_LR)
        warmup = warmup_epochs(config)
        if warmup != train.WARMUP_EPOCHS and not config.EVAL_MODE:
            logger.warning("TRAIN.WARMUP_EPOCHS=%d does not end before the last of TRAIN.EPOCHS=%d epochs: the warmup "
                           "is shortened to %d epoch(s); set --opts TRAIN.WARMUP_EPOCHS N (N < %d) to choose",
                           train.WARMUP_EPOCHS, train.EPOCHS, warmup, train.EPOCHS)

    def _build_components(self, model: nn.Module, amp_dtype: Optional[torch.dtype]) -> Components:
        config = self.config
        mixup_fn = build_mixup(config)
        train_model = _wrap_for_training(model, config, self.dist_info)
        optimizer = build_optimizer(config, model)
        epoch_steps = steps_per_epoch(len(self.loaders.train), config.TRAIN.ACCUMULATION_STEPS)
        scaler = torch.amp.GradScaler(self.dist_info.device.type) if amp_dtype == torch.float16 else None
        # Created after DDP has broadcast rank 0's weights, so every rank's EMA starts equal.
        ema = ModelEmaV3(model, decay=config.TRAIN.EMA.DECAY) if config.TRAIN.EMA.ENABLE else None
        distiller = None if config.EVAL_MODE else build_distiller(config, self.dist_info.device,
                                                                   self.loaders.class_names)
        return Components(train_model=train_model, criterion=build_criterion(config, mixup_fn is not None),
                          optimizer=optimizer, scheduler=build_scheduler(config, optimizer, epoch_steps),
                          scaler=scaler, ema=ema, mixup_fn=mixup_fn, amp_dtype=amp_dtype, distiller=distiller)

    # --- --eval -----------------------------------------------------------------------------
    def evaluate(self) -> int:
        """Evaluate the weights named by ``--resume`` or ``--pretrained`` (and the EMA), log them and print one JSON
        line (rank 0) that names the file and which of its weights were evaluated."""
        config, source = self.config, self.resumed_from or self.config.MODEL.PRETRAINED
        if self.resumed_from:
            warn_if_trained_at_another_size(self.checkpoints.loaded_config, config, source)
        else:
            warn_if_other_classes(source, read_stored_info(source)[1], self.loaders.class_names)
        ema_only = not self.resumed_from and config.MODEL.PRETRAINED_WEIGHTS == "ema"  # --pretrained --use-ema
        result: Dict[str, Any] = {"amp": amp_name(self.eval_dtype), "checkpoint": source,
                                  "weights": "ema" if ema_only else "model"}
        # Named by the weights and the data: evaluating best.pth on ImageNet and on ImageNet-V2 keeps both.
        data_path = config.DATA.DATA_PATH
        data = os.path.basename(os.path.normpath(data_path)) if data_path else config.DATA.DATASET
        stem = os.path.splitext(os.path.basename(source))[0]
        stats, analysis = self._validate_and_analyze(self.eval_model, f"eval-{stem}{'-ema' if ema_only else ''}-{data}")
        result.update({**_val_columns(stats, "val_"), "val_count": int(stats["count"]), **analysis})
        logger.info("eval of the %s of %s: %s on %d images", "EMA weights" if ema_only else "weights", source,
                    _describe(stats), stats["count"])
        if self.parts.ema is not None and self.resumed_from:  # the checkpoint's own EMA weights
            ema_stats, ema_analysis = self._validate_and_analyze(self.parts.ema.module, f"eval-{stem}-ema-{data}")
            result.update({**_val_columns(ema_stats, "ema_val_"), **{f"ema_{k}": v for k, v in ema_analysis.items()}})
            logger.info("eval of the EMA weights of %s: %s", source, _describe(ema_stats))
        if self.dist_info.is_main:
            sys.stdout.write(json.dumps(result) + "\n")
            sys.stdout.flush()
        return EXIT_OK

    def _validate(self, model: nn.Module, epoch: int = -1) -> ValidationPass:
        """One pass over the validation set, keeping each image's top-5 (single-label data) for the analysis."""
        collected: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        stats = evaluate(model, self.loaders.val, self.dist_info.device, self.eval_dtype,
                         collect=None if self.loaders.multi_label else collected, multi_label=self.loaders.multi_label)
        if collected:  # one tensor per column, in memory of its own (not the workers' shared batches)
            collected = [tuple(torch.cat(column) for column in zip(*collected))]
        return ValidationPass(epoch, stats, collected)

    def _validate_and_analyze(self, model: nn.Module, name: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """Validate, and write the per-class analysis to ``run_dir/analysis/name`` (:meth:`_analyze`).

        Returns the statistics and, on rank 0, ``val_real_acc1`` (with ``DATA.REAL_LABELS``) and
        ``analysis_dir`` for the result line.
        """
        done = self._validate(model)
        return done.stats, self._analyze(done, name)

    def _analyze(self, done: ValidationPass, name: str) -> Dict[str, Any]:
        """Write a validation pass's per-class analysis to ``run_dir/analysis/name`` (:mod:`deploy.analysis`);
        a collective. Multi-label data has no confusion matrix: its analysis is each class's average precision.

        Returns, on rank 0, ``analysis_dir`` and with ``DATA.REAL_LABELS`` ``val_real_acc1`` / ``val_real_count``.
        """
        stats = done.stats
        if self.loaders.multi_label:
            if not self.dist_info.is_main:
                return {}
            directory = os.path.join(self.run_dir, "analysis", name)
            write_class_ap(directory, stats, self.loaders.class_names or [])
            logger.info("multi-label data: per-class average precision in %s/analysis.json (no confusion matrix)",
                        directory)
            return {"analysis_dir": directory}
        summary = analyze_pass(done.collected, self.loaders, self.config, os.path.join(self.run_dir, "analysis", name))
        if summary is None:
            return {}
        extra: Dict[str, Any] = {"analysis_dir": summary["directory"]}
        if "real_top1" in summary:
            extra.update(val_real_acc1=summary["real_top1"], val_real_count=summary["real_count"])
            logger.info("ReaL top-1 %.3f on %d images with ReaL labels (original top-1 %.3f)", summary["real_top1"],
                        summary["real_count"], stats["acc1"])
        return extra

    def analyze_best(self) -> None:
        """The analysis of ``best.pth``'s weights at the end of training (``run_dir/analysis/best``).

        Written from the epoch-end validation that made those weights the best when this process ran
        it (the same weights, loader and batches: the same rows a separate pass would compute); only
        when the best epoch was validated before a resume are the weights loaded and validated again.
        """
        path = os.path.join(self.run_dir, BEST)
        if not os.path.isfile(path):
            return
        epoch = self.state.best_epoch
        if self.best_pass is not None and self.best_pass.epoch == epoch:
            logger.info("analysis of %s (epoch %d) from its epoch-end validation", BEST, epoch)
        else:
            logger.info("validating %s (epoch %d, validated before this process resumed) for its analysis", BEST, epoch)
            self.parts.model.load_state_dict(load_file(path)["model"])  # training is over: the weights may change
            self.best_pass = self._validate(self.eval_model, epoch)
        self._analyze(self.best_pass, "best")

    # --- training ---------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to ``TRAIN.EPOCHS``; returns the exit code.

        ``EXIT_OK``, or ``EXIT_PREEMPTED`` after a stop signal (``last.pth`` holds the position
        reached); raises :class:`RunStopped` after too many non-finite steps in a row.
        """
        state = self.state
        if state.epoch >= self.config.TRAIN.EPOCHS:  # nothing to train, so nothing is written
            logger.info("the run has trained %d epochs (0..%d), TRAIN.EPOCHS=%d: nothing to train, nothing written; "
                        "raise TRAIN.EPOCHS to train longer, or pass --tag NAME for a new run", state.epoch,
                        state.epoch - 1, self.config.TRAIN.EPOCHS)
            self.log_outputs()
            return EXIT_OK
        stop_after = self.config.TRAIN.STOP_AFTER_STEPS
        if stop_after and state.global_step >= stop_after:
            logger.info("the checkpoint resumed is at global step %d, TRAIN.STOP_AFTER_STEPS=%d: nothing to train, "
                        "nothing written", state.global_step, stop_after)
            return EXIT_OK
        self._prepare_run_dir()
        resumed = bool(self.resumed_from)
        recorder = RunRecorder(self.run_dir, self.dist_info.is_main, resume_epoch=state.epoch if resumed else None,
                               resume_step=state.global_step if resumed else None)
        change = self.checkpoints.new_change
        if change is not None:
            recorder.text("config_changes", history_lines([change])[0], state.global_step)
        # Installed only now: before training there is nothing to save, and a process blocked in set-up
        # (e.g. a rendezvous) must still die on the launcher's SIGTERM.
        try:
            with PreemptionSignal() as stop_signal:
                return self._train_epochs(stop_signal, recorder)
        finally:
            recorder.close()

    def _prepare_run_dir(self) -> None:
        # Before the first step: a full disk fails now, not at the first save hours later.
        check_free_space(self.run_dir, estimate_checkpoint_bytes(self.parts.model, self.parts.ema is not None))
        if self.dist_info.is_main:
            remove_stale_temp_files(self.run_dir)
            # Written only once every input was accepted and there is something to train: a rejected command, or
            # one that trains nothing, leaves the old config.yaml. Settings changed on resume are kept as a history.
            history = self.checkpoints.history
            header = ["The config this run trains with. Settings changed on resume (checkpoint -> this file):",
                      *[f"  {line}" for line in history_lines(history)]] if history else []
            dump_config(self.config, os.path.join(self.run_dir, "config.yaml"), header)
            atomic_write_text(json.dumps({**self.checkpoints.provenance, "config_history": history}, indent=1) + "\n",
                              os.path.join(self.run_dir, "provenance.json"))
            logger.info("run directory %s; full config in config.yaml, what runs it in provenance.json", self.run_dir)

    def _train_epochs(self, stop_signal: PreemptionSignal, recorder: RunRecorder) -> int:
        config, state, checkpoints = self.config, self.state, self.checkpoints
        train_loader = self.loaders.train
        epoch_steps = steps_per_epoch(len(train_loader), config.TRAIN.ACCUMULATION_STEPS)
        progress = EpochProgress(config.TRAIN.EPOCHS, epoch_steps, config.PRINT_FREQ, config.TRAIN.MAX_NONFINITE_STEPS,
                                 self.dist_info.world_size, recorder.scalars)
        stops = StopPolicy(config, stop_signal)

        def after_step() -> None:
            if checkpoints.step_save_due():
                checkpoints.save_last()

        logger.info("training epochs %d..%d from batch %d (%d optimizer steps per epoch)", state.epoch,
                    config.TRAIN.EPOCHS - 1, state.batch, epoch_steps)
        start_time = time.time()
        while state.epoch < config.TRAIN.EPOCHS:
            reason = stops.check(state)  # a step limit reached on resume; a signal during validation or a save
            if reason is not None:
                return stops.conclude(reason, checkpoints, at_epoch_start=True)
            train_loader.set_epoch(state.epoch, start_batch=state.batch)
            reason = train_one_epoch(self.parts, train_loader, state, config, progress, after_step, stops)
            if reason is not StopReason.COMPLETED:
                return stops.conclude(reason, checkpoints)
            self._end_epoch(recorder)
        metric = "mAP" if self.loaders.multi_label else "acc@1"
        logger.info("done in %s: best %s %.3f (epoch %d)%s",
                    time.strftime("%H:%M:%S", time.gmtime(time.time() - start_time)), metric, state.best_acc1,
                    state.best_epoch, f", best EMA {metric} {state.best_ema_acc1:.3f} (epoch {state.best_ema_epoch})"
                    if self.parts.ema is not None else "")
        self.analyze_best()
        self.log_outputs()
        return EXIT_OK

    def _end_epoch(self, recorder: RunRecorder) -> None:
        """Validate (weights and EMA), track the best, advance to the next epoch, checkpoint, record."""
        state, parts, epoch = self.state, self.parts, self.state.epoch
        row: Dict[str, Any] = {"epoch": epoch, **summarize_train_epoch(state),
                               "lr": current_lr(parts.optimizer)}
        # The tracked metric: top-1, or mAP for multi-label data (best.pth is the best of that metric).
        metric, name = ("map", "mAP") if self.loaders.multi_label else ("acc1", "acc@1")
        done = self._validate(self.eval_model, epoch)
        stats = done.stats
        row.update(_val_columns(stats, "val_"))
        ema_score = None
        if parts.ema is not None:
            ema_stats = self._validate(parts.ema.module).stats
            ema_score = ema_stats[metric]
            row.update(_val_columns(ema_stats, "ema_val_"))
        improved = self.checkpoints.track_best(epoch, stats[metric], ema_score)
        if BEST in improved:
            self.best_pass = done
        rest = (f"  acc@5 {stats['acc5']:.3f}  loss {stats['loss']:.4f}" if metric == "acc1"
                else f"  loss {stats['loss']:.4f}")
        logger.info("epoch %d: train loss %.4f  val %s %.3f (best %.3f @ %d)%s%s", epoch, row["train_loss"], name,
                    stats[metric], state.best_acc1, state.best_epoch, rest,
                    f"  EMA {name} {ema_score:.3f} (best {state.best_ema_acc1:.3f})" if ema_score is not None else "")
        row.update({"global_step": state.global_step, f"best_{metric}": state.best_acc1})
        if parts.distiller is not None:
            row.update(self._teacher_cost())
        change, self.checkpoints.new_change = self.checkpoints.new_change, None
        if change is not None:  # the first epoch row after settings changed on resume names them
            row["config_changes"] = {"position": change["position"], "global_step": change["global_step"],
                                     **change["changes"]}
        state.start_epoch(epoch + 1)  # a checkpoint describes the start of the next epoch
        self.checkpoints.save_epoch_end(epoch, improved)
        recorder.epoch(row, state.global_step)

    def _teacher_cost(self) -> Dict[str, float]:
        """Log the teacher's forward time per optimizer step of the epoch and its share of the training time
        (this process's, since it started or the last epoch ended)."""
        seconds, calls = self.parts.distiller.pop_seconds()
        steps = max(calls / self.config.TRAIN.ACCUMULATION_STEPS, 1e-9)
        share = 100.0 * min(seconds / max(self.state.train_time, 1e-9), 1.0)
        logger.info("teacher forward: %.1f ms per optimizer step (%d micro-batches), %.0f%% of this epoch's training "
                    "time on this rank", 1000.0 * seconds / steps, calls, share)
        return {"teacher_ms_per_step": 1000.0 * seconds / steps, "teacher_time_percent": share}

    def log_outputs(self) -> None:
        """Say where the run's results are and the one command that evaluates its best checkpoint."""
        run_dir, best = self.run_dir, os.path.join(self.run_dir, BEST)
        ema_note = f" (EMA weights: {os.path.join(run_dir, EMA_BEST)})" if self.parts.ema is not None else ""
        logger.info("run directory:   %s (config.yaml, log.txt, metrics.jsonl)", run_dir)
        logger.info("TensorBoard:     tensorboard --logdir %s", os.path.join(run_dir, "tensorboard"))
        logger.info("best checkpoint: %s%s", best, ema_note)
        logger.info("evaluate it:     python main.py --cfg %s --eval --resume %s",
                    shlex.quote(os.path.join(run_dir, "config.yaml")), shlex.quote(best))
