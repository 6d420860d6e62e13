"""What a run saves and when, and what it does with a checkpoint it resumes.

:class:`RunCheckpoints` decides: the checkpoint dict (each component saves and loads its own state:
:meth:`engine.Components.state_dict`, :meth:`training.train_state.TrainState.state_dict`), which
files a step, an epoch, a stop or a new best writes, best / EMA-best tracking, which file to
resume, what a changed setting means, and how a position moves to another total batch.
:class:`utils.checkpoint.CheckpointFiles` writes the files.

On resume every changed key is listed. What a change means is declared with the key in
``config.KEYS`` (:class:`config.OnResume`): the run's identity may not change under auto-resume
(that is another experiment in the same directory); its recipe (what it computes, the LR schedule
included) changes only with ``--resume-changed`` (``TRAIN.RESUME_CHANGED``), under auto-resume and
``--resume`` alike; ``TRAIN.EPOCHS`` extends or shortens the run; the optimizer's own
hyperparameters cannot change (its saved state carries them); how the run executes (workers,
saving, logging, compilation) changes freely. A changed schedule is rebuilt and continues at the
current step. Every accepted change of what the run computes is kept in ``config_history`` (carried
by every later checkpoint) with the position it took effect at and the command that made it.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from yacs.config import CfgNode

from config import OnResume, config_to_dict, keys_on_resume
from models.freeze import summary as frozen_summary
from optim import current_lr, steps_per_epoch
from utils import provenance
from utils.checkpoint import (BEST, EMA_BEST, FORMAT_VERSION, LAST, NONFINITE_PREFIX, CheckpointFiles,
                              IncompatibleCheckpoint, check_compatible, check_format, describe_checkpoint,
                              describe_position, epoch_checkpoint_name, find_resume_candidates)
from utils.distributed import DistInfo, all_gather_object
from utils.file_io import load_file
from utils.reliability import first_line

from .distill import teacher_differences
from .engine import Components
from .train_state import TrainState

logger = logging.getLogger(__name__)

Change = Tuple[str, Any, Any]  # (dotted key, checkpoint's value, this run's value)


# -----------------------------------------------------------------------------
# What differs between the config a checkpoint was trained with and this run's
# -----------------------------------------------------------------------------
def flatten(config: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"TRAIN.EMA.DECAY": 0.9998, ...}`` from a nested plain-data config."""
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    if "DATA.DATA_PATH" in flat and flat["DATA.DATA_PATH"]:
        flat["DATA.DATA_PATH"] = os.path.abspath(os.path.expanduser(flat["DATA.DATA_PATH"]))
    return flat


def config_changes(saved: Dict[str, Any], current: Dict[str, Any]) -> List[Change]:
    """Keys both configs have whose values differ, in key order (keys a file lacks are skipped).

    Args:
        saved: The checkpoint's config (plain data).
        current: This run's config (plain data).
    """
    old, new = flatten(saved or {}), flatten(current)
    not_compared = set(keys_on_resume(OnResume.NOT_COMPARED))
    return [(key, old[key], new[key]) for key in sorted(old.keys() & new.keys())
            if key not in not_compared and old[key] != new[key]]


def describe(found: List[Change]) -> str:
    """``KEY old -> new; ...``."""
    return "; ".join(f"{key} {old!r} -> {new!r}" for key, old, new in found)


def changes_meaning(found: List[Change], meaning: OnResume) -> List[Change]:
    """The changes of the keys whose change means ``meaning``."""
    keys = set(keys_on_resume(meaning))
    return [change for change in found if change[0] in keys]


def recorded_changes(found: List[Change]) -> List[Change]:
    """The changes a run's history keeps: all but those of how the run executes (``OnResume.RUNTIME``)."""
    runtime = set(keys_on_resume(OnResume.RUNTIME))
    return [change for change in found if change[0] not in runtime]


def history_lines(history: Sequence[Dict[str, Any]]) -> List[str]:
    """One line per entry of a run's ``config_history``: where the changes took effect, what, and by which command.

    Args:
        history: ``config_history`` entries (``position``, ``global_step``, ``changes``, ``command``).
    """
    return [f"from {entry['position']} (global step {entry['global_step']}): "
            f"{describe([(key, old, new) for key, (old, new) in entry['changes'].items()])}; by: {entry['command']}"
            for entry in history]


def class_names_differ(stored: Optional[Sequence[str]], data: Optional[Sequence[str]]) -> Optional[str]:
    """How the class names a checkpoint was trained on differ from the data's, or None (also when either is unknown).

    Args:
        stored: The checkpoint's class names in label order.
        data: The dataset's class names in label order.
    """
    if not stored or not data or list(stored) == list(data):
        return None
    if len(stored) != len(data):
        return f"the data has {len(data)} classes, the weights were trained on {len(stored)}"
    differing = [i for i, (mine, theirs) in enumerate(zip(data, stored)) if mine != theirs]
    first = differing[0]
    return (f"{len(differing)} of {len(data)} labels name other classes, e.g. label {first} is {data[first]!r} in "
            f"the data and {stored[first]!r} in the checkpoint")


def warn_if_other_classes(path: str, stored: Optional[Sequence[str]], data: Optional[Sequence[str]]) -> None:
    """One warning when the weights of ``path`` were trained on other class names than the data's.

    Args:
        path: The weights file, for the message.
        stored: Its class names in label order (None when it stores none).
        data: The dataset's class names (None for generated data).
    """
    found = class_names_differ(stored, data)
    if found:
        logger.warning("the weights of %s were trained on other classes than this data's (%s): labels are matched by "
                       "index, so its predictions name other classes; use the data it was trained on, or fine-tune "
                       "from it on this data with --pretrained %s --tag NAME", path, found, path)


def _batch_keys(checkpoint: Dict[str, Any], config: CfgNode) -> Tuple[int, int, int]:
    """(processes, per-process batch, accumulation steps) of the run that wrote ``checkpoint``."""
    saved = checkpoint.get("config") or {}
    return (int(checkpoint.get("world_size", len(checkpoint["ranks"]))),
            int(saved.get("DATA", {}).get("BATCH_SIZE", config.DATA.BATCH_SIZE)),
            int(saved.get("TRAIN", {}).get("ACCUMULATION_STEPS", config.TRAIN.ACCUMULATION_STEPS)))


def _schedule_changed(found: List[Change]) -> bool:
    """Whether ``found`` changes the LR schedule (its keys, or the run's length)."""
    return bool(changes_meaning(found, OnResume.SCHEDULE) or changes_meaning(found, OnResume.LENGTH))


class RunCheckpoints:
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

    def __init__(self, run_dir: str, components: Components, state: TrainState, config: CfgNode,
                 dist_info: DistInfo, class_names: Optional[Sequence[str]] = None) -> None:
        self.run_dir = run_dir
        self.components = components
        self.state = state
        self.config = config
        self.config_dict = config_to_dict(config)
        self.dist_info = dist_info
        self.class_names = list(class_names) if class_names is not None else None
        self.files = CheckpointFiles(run_dir, dist_info.is_main, config.SAVE_KEEP)
        self.provenance = provenance.collect(dist_info.world_size)
        # What TRAIN.FREEZE froze (informational: a changed spec is refused by the resume policy).
        self.frozen = frozen_summary(components.model, config.TRAIN.FREEZE)
        # Of the checkpoint resumed or evaluated: its stamp and its (epoch, batch, global step).
        self.loaded_provenance: Optional[Dict[str, Any]] = None
        self.loaded_config: Optional[Dict[str, Any]] = None
        self.loaded_changes: List[Change] = []
        self.loaded_class_names: Optional[List[str]] = None
        self.loaded_description = ""  # where the checkpoint is: "after epoch 14, global step 960"
        # The settings changed on resume, each with where it took effect (from the checkpoint resumed, then this
        # command's entry); ``new_change`` is this command's entry, None when it changed nothing recorded.
        self.history: List[Dict[str, Any]] = []
        self.new_change: Optional[Dict[str, Any]] = None

    # --- the checkpoint dict --------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The checkpoint dict (a collective: the RNG states of every rank are gathered)."""
        return {
            "format_version": FORMAT_VERSION,
            **self.components.state_dict(),
            **self.state.state_dict(),
            "config": self.config_dict,
            "class_names": self.class_names,
            "frozen": self.frozen,
            "config_history": self.history,
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
        check_format(checkpoint)
        check_compatible(checkpoint, self.components.model.state_dict())
        self.components.load_state_dict(checkpoint, weights_only, restore_schedule)
        if not weights_only:
            self.state.load_state_dict(checkpoint, self.dist_info.rank, self.dist_info.world_size)

    # --- saving ---------------------------------------------------------------------------
    def save(self, names: Sequence[str], prune: bool = False) -> None:
        """Write the state under each of ``names`` (see :meth:`utils.checkpoint.CheckpointFiles.write`).

        Args:
            names: File names in the run directory, e.g. ``["epoch_0003.pth", "last.pth"]``.
            prune: After a successful write, keep only the ``SAVE_KEEP`` newest ``epoch_*.pth``.
        """
        self.files.write(self.state_dict(), names, prune)  # state_dict is a collective: on every rank

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
        """Record an epoch's validation metric; the best-files it improved (``best.pth``, ``ema_best.pth``).

        The metric is top-1, or mAP for multi-label data (``DATA.FORMAT multilabel``); either is kept
        in the state's ``best_acc1`` / ``best_ema_acc1``.

        Args:
            epoch: The epoch just validated.
            acc1: Top-1 (or mAP) of the weights.
            ema_acc1: Top-1 (or mAP) of the EMA weights, None without EMA.
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
        elif config.TRAIN.AUTO_RESUME and not config.EVAL_MODE:  # --eval evaluates the file named, nothing else
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
            logger.info("%s %s: %s", "evaluating the weights of" if config.EVAL_MODE else "resumed from", path,
                        self.loaded_description)
            logger.info("checkpoint written by: %s", provenance.describe(self.loaded_provenance))
            warn_if_other_classes(path, self.loaded_class_names, self.class_names)
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
        """Log every changed setting, record those of what the run computes in the history; a changed LR
        schedule continues, rebuilt, at the current step."""
        recorded = recorded_changes(self.loaded_changes)
        logger.warning("resuming with changed settings (checkpoint -> now): %s%s", describe(self.loaded_changes),
                       "; the run's records keep them as its history of changes (config.yaml's header, "
                       "provenance.json, checkpoints, metrics.jsonl)" if recorded else "")
        if recorded:
            state = self.state
            self.new_change = {"position": describe_position(state.epoch, state.batch),
                               "global_step": state.global_step,
                               "changes": {key: [old, new] for key, old, new in recorded},
                               "command": self.provenance.get("command"), "time": time.time()}
            self.history.append(self.new_change)
        if _schedule_changed(self.loaded_changes):
            optimizer = self.components.optimizer
            before = current_lr(optimizer)
            self.components.scheduler.step_update(self.state.global_step)
            logger.warning("the LR schedule is rebuilt from the new settings (TRAIN.EPOCHS %d) and continues at "
                           "global step %d: LR %.4g -> %.4g", self.config.TRAIN.EPOCHS, self.state.global_step, before,
                           current_lr(optimizer))

    def _batch_keys_now(self) -> Tuple[int, int, int]:
        return self.dist_info.world_size, self.config.DATA.BATCH_SIZE, self.config.TRAIN.ACCUMULATION_STEPS

    def _check_changes(self, changed: List[Change], path: str, explicit: bool) -> None:
        """Refuse what cannot continue this run: another experiment's checkpoint under auto-resume, a
        changed recipe without ``--resume-changed``, changed optimizer hyperparameters (its saved state
        carries them)."""
        identity = changes_meaning(changed, OnResume.IDENTITY)
        if identity and not explicit:
            raise IncompatibleCheckpoint(
                f"the run directory holds another run ({describe(identity)}), and this command would "
                f"continue it; give this experiment its own directory with --tag NAME (or --output DIR), or start "
                f"from those weights with --pretrained {path} --tag NAME")
        recipe = sorted(changes_meaning(changed, OnResume.RECIPE) + changes_meaning(changed, OnResume.SCHEDULE))
        if recipe and not self.config.TRAIN.RESUME_CHANGED:
            raise IncompatibleCheckpoint(
                f"this command changes the recipe of the run it would continue ({describe(recipe)}); start a new run "
                f"with --tag NAME (from these weights: --pretrained {path} --tag NAME), or add --resume-changed to "
                "continue this run with the changes (its records keep them as a history)")
        fixed = changes_meaning(changed, OnResume.OPTIMIZER)
        if fixed:
            raise IncompatibleCheckpoint(
                f"{describe(fixed)} cannot take effect on resume (the optimizer's saved state carries "
                f"the old values); drop the change to continue this run, or start a new one from its weights with "
                f"--pretrained {path} --tag NAME")

    def _check_teacher(self, saved: Optional[Dict[str, Any]], path: str) -> None:
        """Refuse to continue a distillation with another teacher (other weights, model, size or normalisation)."""
        distiller = self.components.distiller
        found = teacher_differences(saved, distiller.identity if distiller is not None else None)
        if found:
            raise IncompatibleCheckpoint(
                f"the checkpoint was distilled from another teacher ({'; '.join(found)}); resume with the "
                f"checkpoint's teacher (MODEL.DISTILL.*), or start a new run from its weights with --pretrained {path} "
                "--tag NAME")

    def _try_load(self, path: str, explicit: bool) -> Tuple[Optional[str], Tuple[int, int, int]]:
        """Load ``path`` into the run; (None or the reason it failed, the saved batch keys).

        An auto-resumed (not ``explicit``) checkpoint of another experiment is an error, never skipped.
        """
        saved_keys = self._batch_keys_now()
        try:
            checkpoint = load_file(path)
            check_format(checkpoint)
            changed = [] if self.config.EVAL_MODE else config_changes(checkpoint.get("config") or {},
                                                                      self.config_dict)
            self._check_changes(changed, path, explicit)
            if not self.config.EVAL_MODE:
                self._check_teacher(checkpoint.get("teacher"), path)
            self.loaded_changes = changed
            saved_keys = _batch_keys(checkpoint, self.config)
            self.loaded_provenance = checkpoint.get("provenance")
            self.loaded_config = checkpoint.get("config")
            self.loaded_class_names = checkpoint.get("class_names")
            self.loaded_description = describe_checkpoint(checkpoint)
            self.history = list(checkpoint.get("config_history") or [])
            restore_schedule = saved_keys == self._batch_keys_now() and not _schedule_changed(changed)
            self.load_state_dict(checkpoint, weights_only=self.config.EVAL_MODE, restore_schedule=restore_schedule)
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
        epoch_steps = steps_per_epoch(num_batches, accumulation)
        state.global_step = state.epoch * epoch_steps + state.batch // accumulation
        self.components.scheduler.step_update(state.global_step)  # the rebuilt schedule, at the moved position
        saved_total = saved_world * saved_batch * saved_accumulation
        reference = config.TRAIN.LR_REFERENCE_BATCH
        saved_steps = steps_per_epoch(num_batches * batch_size * world_size // (saved_world * saved_batch),
                                      saved_accumulation)
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
