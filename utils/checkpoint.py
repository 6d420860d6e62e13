"""The checkpoint manager: file names, best / EMA-best tracking, the keep policy, resume and remapping.

A checkpoint is one ``torch.save`` dict (loadable with ``weights_only=True``):

``format_version``, ``model``, ``ema``, ``optimizer``, ``scheduler``, ``scaler``, the
:class:`~utils.train_state.TrainState` keys (``epoch`` in progress, its next ``batch``,
``global_step``, the best accuracies, the skipped-step counts, ``ranks``: per rank every RNG
state and the epoch's running sums, ``world_size``), ``config`` (plain data), ``class_names`` (the
dataset's, in label order; None for generated data), ``provenance`` (what produced it:
:mod:`utils.provenance`) and ``saved_at``.

Files of a run directory: ``last.pth`` (newest position), ``epoch_NNNN.pth`` (the newest
``SAVE_KEEP``), ``best.pth`` / ``ema_best.pth`` (best validation top-1 of the weights / of their
EMA) and ``nonfinite_stepN.pth`` (the state when a non-finite streak stopped the run; never resumed
automatically). Writes are atomic (:mod:`utils.file_io`); pruning runs only after a save succeeded.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
from yacs.config import CfgNode

from . import config_diff, provenance
from .distributed import DistInfo, all_gather_object, broadcast_object
from .file_io import atomic_copy, atomic_save, load_file
from .reliability import first_line
from .train_state import TrainState

if TYPE_CHECKING:
    from engine import Components

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
LAST = "last.pth"
BEST = "best.pth"
EMA_BEST = "ema_best.pth"
NONFINITE_PREFIX = "nonfinite_step"
_EPOCH_RE = re.compile(r"^epoch_(\d+)\.pth$")


def epoch_checkpoint_name(epoch: int) -> str:
    """File name of the checkpoint written after ``epoch`` (0-based) completed."""
    return f"epoch_{epoch:04d}.pth"


class IncompatibleCheckpoint(ValueError):
    """A readable checkpoint of another model or number of classes: a config error, never skipped."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed; the message names the file and says the old ones are intact."""


def check_format(checkpoint: Any) -> None:
    """Raise ValueError unless ``checkpoint`` is a training checkpoint this code can read."""
    if not isinstance(checkpoint, dict) or "format_version" not in checkpoint:
        raise ValueError("the file is not a training checkpoint of this framework (no format_version); "
                         "use --pretrained to load weights from it instead of --resume")
    version = checkpoint["format_version"]
    if version > FORMAT_VERSION:
        raise ValueError(f"checkpoint format_version {version} is newer than this code's {FORMAT_VERSION}; "
                         "update the code to resume it")


def check_compatible(checkpoint: Dict[str, Any], own: Dict[str, Any]) -> None:
    """Raise :class:`IncompatibleCheckpoint` unless ``checkpoint["model"]`` fits the state dict ``own``.

    Args:
        checkpoint: A training checkpoint (``model`` and ``config``).
        own: This run's model ``state_dict()``.
    """
    weights = checkpoint["model"]
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    wrong = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or wrong):
        return
    saved = checkpoint.get("config") or {}
    saved_model = saved.get("MODEL", {}) if isinstance(saved, dict) else {}
    if wrong:
        key = wrong[0]
        detail = f"{key} has shape {tuple(weights[key].shape)}, this model {tuple(own[key].shape)}"
    elif missing:
        detail = f"{len(missing)} tensors missing (e.g. {missing[0]})"
    else:
        detail = f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})"
    raise IncompatibleCheckpoint(
        f"the checkpoint is of another model (MODEL.NAME={saved_model.get('NAME', '?')}, "
        f"MODEL.NUM_CLASSES={saved_model.get('NUM_CLASSES', '?')}; {detail}); resume it with the config it was "
        "trained with, or start a new run (--tag NAME) from its weights with --pretrained")


def checkpoint_bytes(checkpoint: Any) -> int:
    """The bytes of every tensor in ``checkpoint`` (nested dicts and lists), most of its size on disk."""
    if isinstance(checkpoint, torch.Tensor):
        return checkpoint.numel() * checkpoint.element_size()
    if isinstance(checkpoint, dict):
        return sum(checkpoint_bytes(value) for value in checkpoint.values())
    if isinstance(checkpoint, (list, tuple)):
        return sum(checkpoint_bytes(value) for value in checkpoint)
    return 0


def prune_epoch_checkpoints(run_dir: str, keep: int) -> None:
    """Delete all but the ``keep`` newest ``epoch_*.pth`` files of ``run_dir``.

    Args:
        run_dir: The run directory.
        keep: How many to keep (0 deletes all).
    """
    found = sorted((int(m.group(1)), name) for name in os.listdir(run_dir) if (m := _EPOCH_RE.match(name)))
    for _, name in found[:max(len(found) - keep, 0)]:
        os.remove(os.path.join(run_dir, name))


def find_resume_candidates(run_dir: str) -> List[str]:
    """The readable checkpoints of ``run_dir``, newest first by recorded step (not file time).

    Files whose header cannot be read (e.g. truncated by a crash on a file system without
    atomic rename) are reported with one warning line each and left out; nothing is deleted.
    Diagnostic ``nonfinite_step*.pth`` files are never auto-resumed. Ties prefer ``last.pth``.

    Args:
        run_dir: The run directory.
    """
    if not os.path.isdir(run_dir):
        return []
    candidates: List[Tuple[Tuple[int, int, int, int], str]] = []
    for name in os.listdir(run_dir):
        if not name.endswith(".pth") or name.startswith(".") or name.startswith(NONFINITE_PREFIX):
            continue
        path = os.path.join(run_dir, name)
        try:
            checkpoint = load_file(path, mmap=True)
            check_format(checkpoint)
            position = (int(checkpoint["global_step"]), int(checkpoint["epoch"]), int(checkpoint["batch"]))
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("skipping %s for auto-resume: %s", path, e)
            continue
        candidates.append((position + (int(name == LAST),), path))
    return [path for _, path in sorted(candidates, reverse=True)]


def _load_optional(component: Any, saved: Optional[Dict[str, Any]], missing: str) -> bool:
    """Load ``saved`` into ``component``; without it log ``missing`` and return False."""
    if saved is None:
        logger.warning(missing)
        return False
    component.load_state_dict(saved)
    return True


def _batch_keys(checkpoint: Dict[str, Any], config: CfgNode) -> Tuple[int, int, int]:
    """(processes, per-process batch, accumulation steps) of the run that wrote ``checkpoint``."""
    saved = checkpoint.get("config") or {}
    return (int(checkpoint.get("world_size", len(checkpoint["ranks"]))),
            int(saved.get("DATA", {}).get("BATCH_SIZE", config.DATA.BATCH_SIZE)),
            int(saved.get("TRAIN", {}).get("ACCUMULATION_STEPS", config.TRAIN.ACCUMULATION_STEPS)))


class CheckpointManager:
    """Saves and restores a run: callers say "save the step", "the epoch ended", "resume".

    Every method that saves or loads is a collective: all ranks call it, rank 0 writes, and every
    rank learns the outcome (a failed save stops all of them, none waits in a later collective).

    Args:
        run_dir: The run directory.
        components: The model, EMA, optimizer, scheduler and scaler whose states are saved.
        state: The run's counters and running sums.
        config: The run's config: stored in every file; reads ``SAVE_*``, ``MODEL.RESUME``,
            ``TRAIN.AUTO_RESUME``, ``EVAL_MODE`` and the batch keys.
        dist_info: This process's place in the job.
        class_names: The dataset's class names in label order (stored in every file, read by
            ``predict`` and the exports), or None for generated data.
    """

    def __init__(self, run_dir: str, components: "Components", state: TrainState, config: CfgNode,
                 dist_info: DistInfo, class_names: Optional[Sequence[str]] = None) -> None:
        from config import config_to_dict

        self.run_dir = run_dir
        self.components = components
        self.state = state
        self.config = config
        self.config_dict = config_to_dict(config)
        self.dist_info = dist_info
        self.class_names = list(class_names) if class_names is not None else None
        self.provenance = provenance.collect(dist_info.world_size)
        # Of the checkpoint resumed or evaluated: its stamp and its (epoch, batch, global step).
        self.loaded_provenance: Optional[Dict[str, Any]] = None
        self.loaded_config: Optional[Dict[str, Any]] = None
        self.loaded_changes: List[config_diff.Change] = []
        self.loaded_position = (0, 0, 0)

    # --- the checkpoint dict --------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The checkpoint dict (a collective: the RNG states of every rank are gathered)."""
        parts = self.components
        return {
            "format_version": FORMAT_VERSION,
            "model": parts.model.state_dict(),
            "ema": parts.ema.state_dict() if parts.ema is not None else None,
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
            **self.state.state_dict(),
            "config": self.config_dict,
            "class_names": self.class_names,
            "provenance": self.provenance,
            "saved_at": time.time(),
        }

    def load_state_dict(self, checkpoint: Dict[str, Any], weights_only: bool = False,
                        restore_schedule: bool = True) -> None:
        """Restore every component and the train state from a checkpoint dict.

        Args:
            checkpoint: From :func:`utils.file_io.load_file`.
            weights_only: Restore only the model and EMA weights (``--eval``).
            restore_schedule: Restore the LR scheduler's state; False keeps the freshly built one
                (its length in steps depends on the total batch, see :meth:`_remap_position`).
        """
        parts = self.components
        check_format(checkpoint)
        check_compatible(checkpoint, parts.model.state_dict())
        parts.model.load_state_dict(checkpoint["model"])
        if parts.ema is not None and not _load_optional(
                parts.ema, checkpoint.get("ema"), "the checkpoint has no EMA weights; the EMA restarts from the model"):
            parts.ema.set(parts.model)
        if weights_only:
            if parts.ema is None and checkpoint.get("ema") is not None:
                logger.info("the checkpoint also holds EMA weights: evaluate them with --pretrained FILE --use-ema, "
                            "or --opts TRAIN.EMA.ENABLE True to evaluate both")
            return
        parts.optimizer.load_state_dict(checkpoint["optimizer"])
        if restore_schedule:
            parts.scheduler.load_state_dict(checkpoint["scheduler"])
        if parts.scaler is not None:
            _load_optional(parts.scaler, checkpoint.get("scaler"),
                           "the checkpoint has no fp16 grad-scaler state; the scaler starts afresh")
        self.state.load_state_dict(checkpoint, self.dist_info.rank, self.dist_info.world_size)

    # --- saving ---------------------------------------------------------------------------
    def save(self, names: Sequence[str], prune: bool = False) -> None:
        """Write the state under each of ``names`` (the first is written, the others are atomic links).

        Before writing, rank 0 compares the free space with this checkpoint's real size; a save
        that fails (a full disk, a quota, permissions) leaves the previous files untouched, prunes
        nothing and raises :class:`CheckpointSaveError` on every rank with one line saying why.

        Args:
            names: File names in the run directory, e.g. ``["epoch_0003.pth", "last.pth"]``.
            prune: After a successful write, keep only the ``SAVE_KEEP`` newest ``epoch_*.pth``.
        """
        checkpoint = self.state_dict()  # collective: before the rank check
        error = None
        if self.dist_info.is_main:
            error = self._write(checkpoint, names)
            if error is None and prune:
                prune_epoch_checkpoints(self.run_dir, self.config.SAVE_KEEP)
        error = broadcast_object(error)
        if error:
            raise CheckpointSaveError(error)

    def _write(self, checkpoint: Dict[str, Any], names: Sequence[str]) -> Optional[str]:
        """Rank 0's part of :meth:`save`: None on success, else the one-line error."""
        start = time.perf_counter()
        first = os.path.join(self.run_dir, names[0])
        needed = checkpoint_bytes(checkpoint) + (1 << 20)  # tensors plus the pickled rest
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            free = shutil.disk_usage(self.run_dir).free
            if free < needed:
                raise OSError(errno.ENOSPC, "not enough free space before writing")
            atomic_save(checkpoint, first)
            for name in names[1:]:
                atomic_copy(first, os.path.join(self.run_dir, name))
        # OSError: disk full, quota, permissions. torch.save's zip writer reports a full disk as a
        # RuntimeError ("unexpected pos ..."). Either way the previous files are untouched.
        except (OSError, RuntimeError) as e:
            return self._save_error(first, needed, e)
        logger.info("saved %s (epoch %d, batch %d, step %d) in %.1fs", ", ".join(names), self.state.epoch,
                    self.state.batch, self.state.global_step, time.perf_counter() - start)
        return None

    def _save_error(self, path: str, needed: int, error: BaseException) -> str:
        """One line for a failed save: what failed, the space needed and free, what is intact, the fix."""
        try:
            free = shutil.disk_usage(self.run_dir).free
        except OSError:
            free = -1
        intact = f"the previous checkpoints in {self.run_dir} are intact"
        no_space = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or 0 <= free < needed
        if no_space:
            return (f"no space left for {path}: the checkpoint needs about {needed / 2**20:.1f} MiB and "
                    f"{max(free, 0) / 2**20:.1f} MiB are free; {intact}: free space (or pass --output DIR on a "
                    "larger file system), then run the same command to resume")
        return (f"saving {path} failed ({getattr(error, 'strerror', None) or first_line(error)}); {intact}: fix "
                "the output directory, then run the same command to resume")

    def save_last(self) -> None:
        """Write ``last.pth`` at the current position (a preemption, a stop, ``SAVE_STEPS``)."""
        self.save([LAST])

    def step_save_due(self) -> bool:
        """Whether ``SAVE_STEPS`` asks for ``last.pth`` at the current global step."""
        every = self.config.SAVE_STEPS
        return bool(every) and self.state.global_step % every == 0

    def save_nonfinite(self) -> str:
        """Write the state as ``nonfinite_stepN.pth`` (never ``last.pth`` / ``best.pth``); returns its path."""
        name = f"{NONFINITE_PREFIX}{self.state.global_step}.pth"
        self.save([name])
        return os.path.join(self.run_dir, name)

    def track_best(self, epoch: int, acc1: float, ema_acc1: Optional[float]) -> List[str]:
        """Record an epoch's validation top-1; the best-files it improved (``best.pth``, ``ema_best.pth``).

        Args:
            epoch: The epoch just validated.
            acc1: Top-1 of the weights.
            ema_acc1: Top-1 of the EMA weights, None without EMA.
        """
        improved: List[str] = []
        if acc1 > self.state.best_acc1:
            self.state.best_acc1, self.state.best_epoch = acc1, epoch
            improved.append(BEST)
        if ema_acc1 is not None and ema_acc1 > self.state.best_ema_acc1:
            self.state.best_ema_acc1, self.state.best_ema_epoch = ema_acc1, epoch
            improved.append(EMA_BEST)
        return improved

    def save_epoch_end(self, epoch: int, improved: Sequence[str]) -> None:
        """The checkpoints due after ``epoch`` completed; the state already points at the next epoch.

        ``epoch_NNNN.pth`` and ``last.pth`` every ``SAVE_FREQ`` epochs and after the last one, the
        best-files whenever they improved (the same decision on every rank: the accuracies are global).

        Args:
            epoch: The epoch that completed.
            improved: From :meth:`track_best`.
        """
        names: List[str] = []
        if self.state.epoch % self.config.SAVE_FREQ == 0 or self.state.epoch == self.config.TRAIN.EPOCHS:
            names = ([epoch_checkpoint_name(epoch)] if self.config.SAVE_KEEP else []) + [LAST]
        names += list(improved)
        if names:
            self.save(names, prune=True)

    # --- resuming -------------------------------------------------------------------------
    def resume(self, num_batches: int) -> str:
        """Restore from ``--resume`` or the newest loadable checkpoint of the run directory.

        Auto-resume falls back to the next older checkpoint when one cannot be loaded (one warning
        line with its path; no file is deleted). Every rank must load the same file, so each
        candidate's outcome is agreed with one collective. A checkpoint of another model is an
        error, never skipped. With another world size, batch size or accumulation, the position
        and the LR schedule move to the new total batch and the consequences are logged.

        Args:
            num_batches: Batches per epoch of this rank's train loader.

        Returns:
            The checkpoint resumed from, "" when none.
        """
        config = self.config
        if config.MODEL.RESUME:
            candidates, explicit = [config.MODEL.RESUME], True
        elif config.TRAIN.AUTO_RESUME:
            candidates, explicit = find_resume_candidates(self.run_dir), False
        else:
            return ""
        for path in candidates:
            error, saved_keys = self._try_load(path, explicit)
            errors = [message for message in all_gather_object(error) if message]  # collective: agree on the file
            if errors and explicit:
                raise ValueError(f"cannot resume {path} ({errors[0]}); pass a complete checkpoint to --resume")
            if errors:
                logger.warning("cannot resume %s (%s); trying the previous checkpoint", path, errors[0])
                continue
            logger.info("%s %s: epoch %d, batch %d, global step %d", "evaluating the weights of" if config.EVAL_MODE
                        else "resumed from", path, *self.loaded_position)
            logger.info("checkpoint written by: %s", provenance.describe(self.loaded_provenance))
            changed = provenance.differences(self.loaded_provenance, self.provenance)
            if changed and not config.EVAL_MODE:
                logger.warning("resuming with other code or packages than the checkpoint's (%s): the run continues, "
                               "but it may not match an uninterrupted one", "; ".join(changed))
            if saved_keys != self._batch_keys_now() and not config.EVAL_MODE:
                self._remap_position(saved_keys, num_batches)
            if self.loaded_changes:
                self._apply_changes()
            return path
        if candidates:
            raise ValueError(f"none of the {len(candidates)} checkpoint(s) in {self.run_dir} can be loaded (see the "
                             "warnings above); move them aside to start afresh, or pass a good one to --resume")
        return ""

    def _apply_changes(self) -> None:
        """Log every changed setting; a changed LR schedule continues, rebuilt, at the current step."""
        logger.warning("resuming with changed settings (checkpoint -> now): %s; config.yaml records the new values",
                       config_diff.describe(self.loaded_changes))
        if config_diff.of(self.loaded_changes, config_diff.SCHEDULE_KEYS):
            groups = self.components.optimizer.param_groups
            before = max(group["lr"] for group in groups)
            self.components.scheduler.step_update(self.state.global_step)
            logger.warning("the LR schedule is rebuilt from the new settings (TRAIN.EPOCHS %d) and continues at "
                           "global step %d: LR %.4g -> %.4g", self.config.TRAIN.EPOCHS, self.state.global_step, before,
                           max(group["lr"] for group in groups))

    def _batch_keys_now(self) -> Tuple[int, int, int]:
        return self.dist_info.world_size, self.config.DATA.BATCH_SIZE, self.config.TRAIN.ACCUMULATION_STEPS

    def _check_changes(self, changed: List[config_diff.Change], path: str, explicit: bool) -> None:
        """Refuse what cannot continue this run: another experiment's checkpoint under auto-resume,
        changed optimizer hyperparameters (its saved state carries them)."""
        identity = config_diff.of(changed, config_diff.IDENTITY_KEYS)
        if identity and not explicit:
            raise IncompatibleCheckpoint(
                f"the run directory holds another run ({config_diff.describe(identity)}), and this command would "
                f"continue it; give this experiment its own directory with --tag NAME (or --output DIR), or start "
                f"from those weights with --pretrained {path} --tag NAME")
        fixed = config_diff.of(changed, config_diff.OPTIMIZER_KEYS)
        if fixed:
            raise IncompatibleCheckpoint(
                f"{config_diff.describe(fixed)} cannot take effect on resume (the optimizer's saved state carries "
                f"the old values); drop the change to continue this run, or start a new one from its weights with "
                f"--pretrained {path} --tag NAME")

    def _try_load(self, path: str, explicit: bool) -> Tuple[Optional[str], Tuple[int, int, int]]:
        """Load ``path`` into the run; (None or the reason it failed, the saved batch keys).

        An auto-resumed (not ``explicit``) checkpoint of another experiment is an error, never skipped.
        """
        saved_keys = self._batch_keys_now()
        try:
            checkpoint = load_file(path)
            check_format(checkpoint)
            changed = [] if self.config.EVAL_MODE else config_diff.changes(checkpoint.get("config") or {},
                                                                          self.config_dict)
            self._check_changes(changed, path, explicit)
            self.loaded_changes = changed
            saved_keys = _batch_keys(checkpoint, self.config)
            self.loaded_provenance = checkpoint.get("provenance")
            self.loaded_config = checkpoint.get("config")
            self.loaded_position = (int(checkpoint["epoch"]), int(checkpoint["batch"]), int(checkpoint["global_step"]))
            schedule_changed = bool(config_diff.of(changed, config_diff.SCHEDULE_KEYS))
            self.load_state_dict(checkpoint, weights_only=self.config.EVAL_MODE,
                                 restore_schedule=saved_keys == self._batch_keys_now() and not schedule_changed)
        except IncompatibleCheckpoint as e:
            raise ValueError(f"cannot resume {path}: {e}") from None
        except (OSError, EOFError, ValueError, KeyError, TypeError, RuntimeError) as e:
            return f"{type(e).__name__}: {first_line(e)}", saved_keys
        return None, saved_keys

    def _remap_position(self, saved_keys: Tuple[int, int, int], num_batches: int) -> None:
        """Move a mid-epoch position to this run's total batch and log what that changes.

        The samples already seen in the epoch are kept (rounded down to a whole optimizer step) and
        the global step is recomputed from the new steps per epoch, so the LR schedule, rebuilt for
        the new total batch, continues at the same fraction of training.
        """
        state, config = self.state, self.config
        saved_world, saved_batch, saved_accumulation = saved_keys
        world_size, batch_size, accumulation = self._batch_keys_now()
        old_batch, old_step = state.batch, state.global_step
        seen = state.batch * saved_batch * saved_world
        batch = min(seen // (batch_size * world_size), num_batches)
        state.batch = batch - batch % accumulation
        epoch_steps = -(-num_batches // accumulation)
        state.global_step = state.epoch * epoch_steps + state.batch // accumulation
        self.components.scheduler.step_update(state.global_step)  # the rebuilt schedule, at the moved position
        saved_total = saved_world * saved_batch * saved_accumulation
        reference = config.TRAIN.LR_REFERENCE_BATCH
        saved_steps = -(-(num_batches * batch_size * world_size // (saved_world * saved_batch)) // saved_accumulation)
        logger.warning(
            "the checkpoint was written with a total batch of %d (%d processes x %d x %d accumulation), this run has "
            "%d (%d x %d x %d): base LR %.4g -> %.4g (%s); optimizer steps per epoch ~%d -> %d; epoch %d continues "
            "at batch %d (was %d), global step %d (was %d), the same fraction of the LR schedule; the data order "
            "now differs from an uninterrupted run", saved_total, saved_world, saved_batch, saved_accumulation,
            world_size * batch_size * accumulation, world_size, batch_size, accumulation,
            config.TRAIN.BASE_LR * saved_total / reference if reference else config.TRAIN.BASE_LR,
            config.TRAIN.SCALED_BASE_LR, f"linear scaling from TRAIN.LR_REFERENCE_BATCH={reference}" if reference
            else "no LR scaling", saved_steps, epoch_steps, state.epoch, state.batch, old_batch,
            state.global_step, old_step)
