"""What differs between the config a checkpoint was trained with and this run's, and what it means.

On resume every changed key is listed. The run's identity (:data:`IDENTITY_KEYS`) may not change
under auto-resume (that is another experiment in the same directory); the optimizer's own
hyperparameters (:data:`OPTIMIZER_KEYS`) cannot change (its saved state carries them); the LR
schedule's keys (:data:`SCHEDULE_KEYS`) rebuild the schedule, which continues at the current step;
every other key takes effect by itself (the components are built from the config).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

# What makes a run this run.
IDENTITY_KEYS = ("MODEL.NAME", "MODEL.NUM_CLASSES", "MODEL.CROSSFORMER.EMBED_DIM", "MODEL.CROSSFORMER.DEPTHS",
                 "MODEL.CROSSFORMER.NUM_HEADS", "MODEL.CROSSFORMER.GROUP_SIZE", "MODEL.CROSSFORMER.CRS_INTERVAL",
                 "DATA.DATASET", "DATA.DATA_PATH", "DATA.IMG_SIZE")
SCHEDULE_KEYS = ("TRAIN.EPOCHS", "TRAIN.WARMUP_EPOCHS", "TRAIN.BASE_LR", "TRAIN.WARMUP_LR", "TRAIN.MIN_LR",
                 "TRAIN.LR_REFERENCE_BATCH", "TRAIN.LR_SCHEDULER.WARMUP_PREFIX")
OPTIMIZER_KEYS = ("TRAIN.WEIGHT_DECAY", "TRAIN.OPTIMIZER.NAME", "TRAIN.OPTIMIZER.EPS", "TRAIN.OPTIMIZER.BETAS")
# Set per command, derived from other keys, or reported elsewhere (the batch keys: the remapping).
UNLISTED_KEYS = ("MODEL.RESUME", "MODEL.PRETRAINED", "MODEL.PRETRAINED_WEIGHTS", "EVAL_MODE", "THROUGHPUT_MODE",
                 "TRAIN.SCALED_BASE_LR", "TRAIN.SCALED_WARMUP_LR", "TRAIN.SCALED_MIN_LR", "DATA.BATCH_SIZE",
                 "TRAIN.ACCUMULATION_STEPS")

Change = Tuple[str, Any, Any]  # (dotted key, checkpoint's value, this run's value)


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


def changes(saved: Dict[str, Any], current: Dict[str, Any]) -> List[Change]:
    """Keys both configs have whose values differ, in key order (keys a file lacks are skipped).

    Args:
        saved: The checkpoint's config (plain data).
        current: This run's config (plain data).
    """
    old, new = flatten(saved or {}), flatten(current)
    return [(key, old[key], new[key]) for key in sorted(old.keys() & new.keys())
            if key not in UNLISTED_KEYS and old[key] != new[key]]


def describe(found: List[Change]) -> str:
    """``KEY old -> new; ...``."""
    return "; ".join(f"{key} {old!r} -> {new!r}" for key, old, new in found)


def of(found: List[Change], keys: Tuple[str, ...]) -> List[Change]:
    """The changes among ``keys``."""
    return [change for change in found if change[0] in keys]
