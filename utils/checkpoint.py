"""Checkpoint files: the format, file names, atomic writes, the keep policy and resume discovery.

A checkpoint is one ``torch.save`` dict (loadable with ``weights_only=True``):

``format_version``, ``model``, ``model_ema`` (the EMA weights with the model's key names, where
timm's ``load_checkpoint(use_ema=True)`` and DeiT look; files of formats 1 and 2 hold them under
``ema``, with ``module.`` prefixes: :func:`ema_weights` reads both), ``optimizer``, ``scheduler``, ``scaler``, the
:class:`~training.train_state.TrainState` keys (the position: ``epoch``, the 0-based epoch the
file was saved in or after, as logs and ``metrics.jsonl`` number it (Swin, DeiT and timm store the
same), ``batch``, the batches of that epoch trained per process, and ``epoch_complete``, whether
that epoch had ended; ``global_step``, the best accuracies, the skipped-step counts, ``ranks``: per rank every RNG
state and the epoch's running sums, ``world_size``), ``config`` (plain data), ``class_names`` (the
dataset's, in label order; None for generated data), ``frozen`` (what ``TRAIN.FREEZE`` froze:
``spec``, ``parameters`` frozen, ``trainable``, the frozen top-level ``modules``; older files lack
it), ``provenance`` (what produced it: :mod:`utils.provenance`), ``config_history`` (the settings changed
on resume, where each took effect; older files lack it) and ``saved_at``. Format 1 stored instead the
epoch and batch to resume at (the file written after epoch 14 said epoch 15, batch 0); it is read
as such. ``training/resume.py`` decides what goes in and
what a run does with it; this module only reads, checks and writes files.

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
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .distributed import broadcast_object
from .file_io import atomic_copy, atomic_save, load_file
from .reliability import first_line

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 2: epochs numbered as logs number them; 3: the EMA under EMA_KEY with the model's key names
EMA_KEY = "model_ema"
LEGACY_EMA_KEY = "ema"  # formats 1 and 2: ModelEmaV3.state_dict(), keys prefixed with "module."
LAST = "last.pth"
BEST = "best.pth"
EMA_BEST = "ema_best.pth"
NONFINITE_PREFIX = "nonfinite_step"
_EPOCH_RE = re.compile(r"^epoch_(\d+)\.pth$")


def epoch_checkpoint_name(epoch: int) -> str:
    """File name of the checkpoint written after ``epoch`` (0-based) completed."""
    return f"epoch_{epoch:04d}.pth"


def ema_weights(checkpoint: Dict[str, Any]) -> Optional[Dict[str, torch.Tensor]]:
    """The EMA weights of a checkpoint dict with the model's key names (any format), or None.

    Args:
        checkpoint: A training checkpoint of this framework (any format).
    """
    for key in (EMA_KEY, LEGACY_EMA_KEY):
        weights = checkpoint.get(key)
        if isinstance(weights, dict):
            return {name.removeprefix("module."): tensor for name, tensor in weights.items()}
    return None


def stored_position(epoch: int, batch: int, ended_epoch_batches: int) -> Dict[str, Any]:
    """The position keys a checkpoint stores for the position where training continues.

    Args:
        epoch: The epoch to train next (0-based).
        batch: Its next batch; 0 with ``epoch`` > 0 is the end of the epoch before.
        ended_epoch_batches: The batches the epoch before had (stored when it is the one described).
    """
    if batch == 0 and epoch > 0:
        return {"epoch": epoch - 1, "batch": ended_epoch_batches, "epoch_complete": True}
    return {"epoch": epoch, "batch": batch, "epoch_complete": False}


def resume_position(checkpoint: Dict[str, Any]) -> Tuple[int, int]:
    """(epoch, batch) where training continues after ``checkpoint``: the epoch and its next batch.

    Args:
        checkpoint: A training checkpoint of any format version.
    """
    epoch, batch = int(checkpoint["epoch"]), int(checkpoint["batch"])
    if int(checkpoint.get("format_version", 1)) >= 2 and checkpoint.get("epoch_complete"):
        return epoch + 1, 0
    return epoch, batch


def describe_position(epoch: int, batch: int) -> str:
    """A position where training continues as logs name it: ``after epoch 14`` or ``epoch 15, batch 37``.

    Args:
        epoch: The epoch to train next (0-based).
        batch: Its next batch.
    """
    return f"after epoch {epoch - 1}" if batch == 0 and epoch > 0 else f"epoch {epoch}, batch {batch}"


def describe_checkpoint(checkpoint: Dict[str, Any]) -> str:
    """``after epoch 14, global step 960`` (or ``epoch 15, batch 37, global step 997``) for a checkpoint."""
    return f"{describe_position(*resume_position(checkpoint))}, global step {int(checkpoint['global_step'])}"


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
            position = (int(checkpoint["global_step"]), *resume_position(checkpoint))
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("skipping %s for auto-resume: %s", path, e)
            continue
        candidates.append((position + (int(name == LAST),), path))
    return [path for _, path in sorted(candidates, reverse=True)]


class CheckpointFiles:
    """Writes checkpoint dicts into a run directory; :meth:`write` is a collective with one outcome.

    Rank 0 writes; every rank learns the outcome, so a failed save stops all of them and none waits
    in a later collective.

    Args:
        run_dir: The run directory.
        is_main: Whether this process writes (global rank 0).
        keep: ``SAVE_KEEP``: how many ``epoch_*.pth`` a pruning write keeps.
    """

    def __init__(self, run_dir: str, is_main: bool, keep: int) -> None:
        self.run_dir, self.is_main, self.keep = run_dir, is_main, keep

    def write(self, checkpoint: Dict[str, Any], names: Sequence[str], prune: bool = False) -> None:
        """Write ``checkpoint`` under each of ``names`` (the first is written, the others are atomic copies).

        Before writing, rank 0 compares the free space with this checkpoint's real size; a save
        that fails (a full disk, a quota, permissions) leaves the previous files untouched, prunes
        nothing and raises :class:`CheckpointSaveError` on every rank with one line saying why.

        Args:
            checkpoint: The dict to save (the same on every rank; only rank 0's is written).
            names: File names in the run directory, e.g. ``["epoch_0003.pth", "last.pth"]``.
            prune: After a successful write, keep only the ``keep`` newest ``epoch_*.pth``.
        """
        error = None
        if self.is_main:
            error = self._write(checkpoint, names)
            if error is None and prune:
                prune_epoch_checkpoints(self.run_dir, self.keep)
        error = broadcast_object(error)
        if error:
            raise CheckpointSaveError(error)

    def _write(self, checkpoint: Dict[str, Any], names: Sequence[str]) -> Optional[str]:
        """Rank 0's part of :meth:`write`: None on success, else the one-line error."""
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
        logger.info("saved %s (%s, step %d) in %.1fs", ", ".join(names),
                    describe_position(*resume_position(checkpoint)), checkpoint["global_step"],
                    time.perf_counter() - start)
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
