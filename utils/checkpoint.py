"""The resumable training state, atomic checkpoint files, auto-resume and weight loading.

A checkpoint is one ``torch.save`` dict (loadable with ``weights_only=True``):

``format_version``, ``model``, ``ema``, ``optimizer``, ``scheduler``, ``scaler``, ``epoch`` (the
epoch in progress), ``batch`` (its next batch), ``global_step``, the best accuracies, ``ranks``
(per rank: every RNG state and the running sums of the epoch's train loss), ``world_size`` and
``config`` (plain data).
"""
from __future__ import annotations

import logging
import os
import random
import re
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from models import checkpoint_filter_fn

from .distributed import all_gather_object, broadcast_object

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


# -----------------------------------------------------------------------------
# RNG states (stored as tensors and plain values so weights_only loading works)
# -----------------------------------------------------------------------------
def capture_rng_state() -> Dict[str, Any]:
    """This process's torch (CPU and every CUDA device), NumPy and Python ``random`` states."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`.

    Args:
        state: As returned by :func:`capture_rng_state` (possibly after a save/load round trip).
    """
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            logger.warning("checkpoint has CUDA RNG states of %d devices, this process sees %d; "
                           "restoring the first ones", len(state["cuda"]), torch.cuda.device_count())
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# -----------------------------------------------------------------------------
# Training state
# -----------------------------------------------------------------------------
class TrainState:
    """Everything a run needs to continue exactly where it stopped.

    Args:
        model: The unwrapped model (not DDP, not compiled).
        optimizer: Its optimizer.
        scheduler: timm scheduler (``state_dict`` / ``load_state_dict``).
        scaler: ``GradScaler`` for fp16, else None.
        ema: ``timm.utils.ModelEmaV3`` or None.
        config: The run's config as plain data (stored for reference).
        device: Where the running loss sum lives.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 scaler: Optional[torch.amp.GradScaler], ema: Optional[nn.Module], config: Dict[str, Any],
                 device: torch.device) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.ema = ema
        self.config = config
        self.device = device
        self.epoch = 0  # epoch in progress (or the next to start)
        self.batch = 0  # next batch of ``epoch`` to train on
        self.global_step = 0  # optimizer steps taken
        self.best_acc1 = float("-inf")
        self.best_epoch = -1
        self.best_ema_acc1 = float("-inf")
        self.best_ema_epoch = -1
        # Skipped non-finite optimizer steps: in total and in a row. The same on every rank (they are
        # decided by the all-reduced gradient norm); device tensors, read on log steps only.
        self.nonfinite_total = torch.zeros((), dtype=torch.int64, device=device)
        self.nonfinite_streak = torch.zeros((), dtype=torch.int64, device=device)
        self.reset_epoch_meters()

    def reset_epoch_meters(self) -> None:
        """Zero the running sums of the epoch in progress (this rank's)."""
        # Accumulated on device without a host sync; read at log steps and epoch end.
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_count = 0
        self.loss_nonfinite = torch.zeros((), dtype=torch.int64, device=self.device)  # left out of loss_sum
        self.samples = 0
        self.train_time = 0.0

    def state_dict(self) -> Dict[str, Any]:
        """The checkpoint dict. A collective: every rank must call it (RNG states are gathered)."""
        rank_state = {"rng": capture_rng_state(), "loss_sum": float(self.loss_sum), "loss_count": self.loss_count,
                      "loss_nonfinite": int(self.loss_nonfinite), "samples": self.samples,
                      "train_time": self.train_time}
        ranks = all_gather_object(rank_state)
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "batch": self.batch,
            "global_step": self.global_step,
            "best_acc1": self.best_acc1,
            "best_epoch": self.best_epoch,
            "best_ema_acc1": self.best_ema_acc1,
            "best_ema_epoch": self.best_ema_epoch,
            "nonfinite_total": int(self.nonfinite_total),
            "nonfinite_streak": int(self.nonfinite_streak),
            "ranks": ranks,
            "world_size": len(ranks),
            "config": self.config,
            "saved_at": time.time(),
        }

    def load_state_dict(self, checkpoint: Dict[str, Any], rank: int = 0, world_size: int = 1,
                        weights_only: bool = False, restore_schedule: bool = True) -> None:
        """Restore from a checkpoint dict.

        Args:
            checkpoint: From :func:`load_checkpoint`.
            rank: This process's rank (selects its RNG state and loss sums).
            world_size: Number of processes now.
            weights_only: Restore only the model and EMA weights (for ``--eval``).
            restore_schedule: Restore the LR scheduler's state; False keeps the freshly built one
                (its length in steps depends on the world size, see :func:`remap_position`).
        """
        check_format(checkpoint)
        check_compatible(checkpoint, self.model)
        self.model.load_state_dict(checkpoint["model"])
        if self.ema is not None:
            if checkpoint.get("ema") is not None:
                self.ema.load_state_dict(checkpoint["ema"])
            else:
                logger.warning("the checkpoint has no EMA weights; the EMA restarts from the model weights")
                self.ema.set(self.model)
        if weights_only:
            return
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if restore_schedule:
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.scaler is not None:
            if checkpoint.get("scaler") is not None:
                self.scaler.load_state_dict(checkpoint["scaler"])
            else:
                logger.warning("the checkpoint has no fp16 grad-scaler state; the scaler starts afresh")
        for key in ("epoch", "batch", "global_step", "best_acc1", "best_epoch", "best_ema_acc1", "best_ema_epoch"):
            setattr(self, key, checkpoint[key])
        self.nonfinite_total.fill_(checkpoint.get("nonfinite_total", 0))
        self.nonfinite_streak.fill_(checkpoint.get("nonfinite_streak", 0))
        ranks: List[Dict[str, Any]] = checkpoint["ranks"]
        self.reset_epoch_meters()
        if len(ranks) != world_size:
            logger.warning("checkpoint was written by %d processes, this run has %d: the loader order and "
                           "the random streams differ from an uninterrupted run (the resume is not exact)",
                           len(ranks), world_size)
        if rank < len(ranks):
            mine = ranks[rank]
            restore_rng_state(mine["rng"])
            self.loss_sum.fill_(mine["loss_sum"])
            self.loss_count = mine["loss_count"]
            self.loss_nonfinite.fill_(mine.get("loss_nonfinite", 0))
            self.samples = mine["samples"]
            self.train_time = mine["train_time"]


class IncompatibleCheckpoint(ValueError):
    """A readable checkpoint of another model or number of classes: a config error, never skipped."""


def check_compatible(checkpoint: Dict[str, Any], model: nn.Module) -> None:
    """Raise :class:`IncompatibleCheckpoint` unless ``checkpoint["model"]`` fits ``model`` exactly.

    Args:
        checkpoint: A training checkpoint (``model`` and ``config``).
        model: The unwrapped model of this run.
    """
    weights, own = checkpoint["model"], model.state_dict()
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
    else:
        detail = f"{len(missing)} tensors missing (e.g. {(missing or unexpected)[0]})" if missing else \
            f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})"
    raise IncompatibleCheckpoint(
        f"the checkpoint is of another model (MODEL.NAME={saved_model.get('NAME', '?')}, "
        f"MODEL.NUM_CLASSES={saved_model.get('NUM_CLASSES', '?')}; {detail}); resume it with the config it was "
        "trained with, or start a new run (--tag NAME) from its weights with --pretrained")


def check_format(checkpoint: Any) -> None:
    """Raise ValueError unless ``checkpoint`` is a training checkpoint this code can read."""
    if not isinstance(checkpoint, dict) or "format_version" not in checkpoint:
        raise ValueError("the file is not a training checkpoint of this framework (no format_version); "
                         "use --pretrained to load weights from it instead of --resume")
    version = checkpoint["format_version"]
    if version > FORMAT_VERSION:
        raise ValueError(f"checkpoint format_version {version} is newer than this code's {FORMAT_VERSION}; "
                         "update the code to resume it")


# -----------------------------------------------------------------------------
# Files
# -----------------------------------------------------------------------------
def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_path(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}")


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temp file, fsync, then rename over ``path``.

    A crash at any point leaves either the old file or the complete new one, never a partial
    file under ``path``.

    Args:
        obj: What to save.
        path: Destination.
    """
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    _publish(path, write)


def _publish_copy(src: str, dst: str) -> None:
    """Make ``dst`` an atomic copy of the complete file ``src`` (a hard link where possible)."""
    def write(tmp: str) -> None:
        if os.path.exists(tmp):
            os.remove(tmp)
        try:
            os.link(src, tmp)
        except OSError:  # no hard links on this file system
            import shutil
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 24)
                fout.flush()
                os.fsync(fout.fileno())

    _publish(dst, write)


def _publish(path: str, write: Callable[[str], None]) -> None:
    """Atomically make ``path`` the file that ``write(tmp)`` produces: temp file, rename, fsync the
    directory; on any failure the temp file is removed and ``path`` is untouched."""
    tmp = _temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def save_checkpoint(state: TrainState, run_dir: str, names: Sequence[str], is_main: bool,
                    keep_epochs: Optional[int] = None) -> None:
    """Write ``state`` under each of ``names`` in ``run_dir`` (rank 0 writes; all ranks must call).

    Args:
        state: The training state (its ``state_dict`` gathers every rank's RNG).
        run_dir: The run directory.
        names: File names, e.g. ``["epoch_0003.pth", "last.pth", "best.pth"]``; the first is
            written, the others are atomic links / copies of it.
        is_main: True on rank 0.
        keep_epochs: When given, keep only this many newest ``epoch_*.pth`` files.
    """
    checkpoint = state.state_dict()  # collective: before the rank check
    if not names:
        return
    error = None
    if is_main:
        start = time.perf_counter()
        first = os.path.join(run_dir, names[0])
        try:
            os.makedirs(run_dir, exist_ok=True)
            atomic_save(checkpoint, first)
            for name in names[1:]:
                _publish_copy(first, os.path.join(run_dir, name))
        except OSError as e:  # disk full, quota, permissions: the previous files are untouched
            error = (f"saving {first} failed ({e.strerror or e}); the previous checkpoints are intact: free space "
                     "or fix the output directory, then run the same command to resume")
        else:
            logger.info("saved %s (epoch %d, batch %d, step %d) in %.1fs", ", ".join(names), state.epoch,
                        state.batch, state.global_step, time.perf_counter() - start)
            if keep_epochs is not None:
                prune_epoch_checkpoints(run_dir, keep_epochs)
    # Every rank learns the outcome, so a failed save stops all of them instead of leaving some
    # waiting in the next collective.
    error = broadcast_object(error)
    if error:
        raise CheckpointSaveError(error)


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed; the message names the file and says the old ones are intact."""


def prune_epoch_checkpoints(run_dir: str, keep: int) -> None:
    """Delete all but the ``keep`` newest ``epoch_*.pth`` files of ``run_dir``.

    Args:
        run_dir: The run directory.
        keep: How many to keep (0 deletes all).
    """
    found = sorted((int(m.group(1)), name) for name in os.listdir(run_dir) if (m := _EPOCH_RE.match(name)))
    for _, name in found[:max(len(found) - keep, 0)]:
        os.remove(os.path.join(run_dir, name))


def load_checkpoint(path: str, map_location: Any = "cpu", mmap: bool = False) -> Dict[str, Any]:
    """Load a checkpoint without executing arbitrary pickled code.

    Args:
        path: The file.
        map_location: Where tensors go.
        mmap: Map tensors lazily (cheap peeking at the counters of big files).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path given to --resume / --pretrained")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - the message names the cause
        raise ValueError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         "it is truncated, corrupt or holds pickled objects other than tensors and "
                         "plain data: re-save it as {'model': state_dict}") from e


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
            checkpoint = load_checkpoint(path, mmap=True)
            check_format(checkpoint)
            position = (int(checkpoint["global_step"]), int(checkpoint["epoch"]), int(checkpoint["batch"]))
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("skipping %s for auto-resume: %s", path, e)
            continue
        candidates.append((position + (int(name == LAST),), path))
    return [path for _, path in sorted(candidates, reverse=True)]


def find_resume_checkpoint(run_dir: str) -> Optional[str]:
    """The newest readable checkpoint of ``run_dir`` (see :func:`find_resume_candidates`), or None.

    Args:
        run_dir: The run directory.
    """
    candidates = find_resume_candidates(run_dir)
    return candidates[0] if candidates else None


def remap_position(state: TrainState, saved_world_size: int, saved_batch_size: int, world_size: int,
                   batch_size: int, accumulation: int, num_batches: int) -> Tuple[int, int]:
    """Move a mid-epoch position to another world size or batch size; returns the old (batch, step).

    The samples already seen in the epoch are kept (rounded down to a whole optimizer step) and the
    global step is recomputed from the new steps per epoch, so the LR schedule, rebuilt for the new
    total batch, continues at the same fraction of training.

    Args:
        state: Resumed, with the saved ``epoch``, ``batch`` and ``global_step``.
        saved_world_size: Processes of the run that wrote the checkpoint.
        saved_batch_size: Its per-process batch.
        world_size: Processes now.
        batch_size: Per-process batch now.
        accumulation: ``TRAIN.ACCUMULATION_STEPS`` now.
        num_batches: Batches per epoch of this rank's loader now.
    """
    old = (state.batch, state.global_step)
    seen = state.batch * saved_batch_size * saved_world_size
    batch = min(seen // (batch_size * world_size), num_batches)
    state.batch = batch - batch % accumulation
    epoch_steps = -(-num_batches // accumulation)
    state.global_step = state.epoch * epoch_steps + state.batch // accumulation
    return old


# -----------------------------------------------------------------------------
# Weights only (--pretrained)
# -----------------------------------------------------------------------------
def load_pretrained(model: nn.Module, path: str) -> None:
    """Initialise ``model`` from one of our checkpoints, an official one or a bare state dict.

    The file's format (``model`` / ``state_dict`` / bare, DDP's ``module.`` prefix, a head of
    another number of classes, which keeps its fresh initialisation) is the model's
    :func:`models.checkpoint_filter_fn`'s business; any other shape mismatch is an error.

    Args:
        model: The unwrapped model.
        path: Checkpoint file.
    """
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict; pass a checkpoint "
                         "of this framework or an official CrossFormer release")
    try:
        weights = checkpoint_filter_fn(checkpoint, model)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    own = model.state_dict()
    for key, value in weights.items():
        if key in own and value.shape != own[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)} but the model expects "
                             f"{tuple(own[key].shape)}; check MODEL.NAME and MODEL.CROSSFORMER.*")
    result = model.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing:
        logger.warning("%s: %d model tensors were not in the checkpoint and keep their initialisation: %s",
                       path, len(missing), ", ".join(missing[:10]))
    if result.unexpected_keys:
        logger.warning("%s: %d checkpoint tensors are not used by the model: %s", path,
                       len(result.unexpected_keys), ", ".join(result.unexpected_keys[:10]))
    logger.info("loaded pretrained weights from %s", path)
