"""Configuration: yacs defaults reproducing the CrossFormer / CrossFormer++ ImageNet recipe.

Precedence (lowest to highest): these defaults < YAML file (with ``BASE`` inheritance)
< ``--opts KEY VALUE ...`` < named command-line flags that the user actually typed.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import functools
import logging
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml
from yacs.config import CfgNode as CN

logger = logging.getLogger(__name__)

_C = CN()

# YAML files listed here are merged first (paths relative to the including file).
_C.BASE = [""]

# -----------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------
_C.DATA = CN()
# Per-process batch size.
_C.DATA.BATCH_SIZE = 128
_C.DATA.DATA_PATH = ""
# "imagenet" (folder layout), "toy" (built-in generated JPEGs), "synthetic" (random tensors).
_C.DATA.DATASET = "imagenet"
# "dali" or "pytorch".
_C.DATA.LOADER = "dali"
# How an imagenet DATA_PATH stores its images: "folder" (train/<class>/<image>, val/...) or "shards"
# (train/ and val/ of tar shards with an index.json, written by python -m data.make_shards).
_C.DATA.FORMAT = "folder"
# How DATA_PATH/val's class folders give labels (folder format): "names" (sorted by name, as train's and
# torchvision's ImageFolder) or "indices" (named 0..N-1 by class index, ImageNet-V2's layout: the label is
# the folder's integer value, never its place in string order; the class names come from train/).
_C.DATA.VAL_LAYOUT = "names"
# ImageNet-ReaL's real.json (the correct classes of each original val image): --eval and the end of
# training report ReaL top-1 next to the original ("" = off).
_C.DATA.REAL_LABELS = ""
# Shards: places of each rank's shuffle buffer; a sample is drawn from the next SHUFFLE_BUFFER
# samples of the rank's shard stream (the buffer holds sample numbers, not images).
_C.DATA.SHUFFLE_BUFFER = 4096
_C.DATA.IMG_SIZE = 224
# Interpolation for random-resized-crop and eval resize: "bicubic", "bilinear".
_C.DATA.INTERPOLATION = "bicubic"
_C.DATA.PIN_MEMORY = True
# Loader workers per process: PyTorch DataLoader worker processes; for DALI, its CPU threads (and 4
# file-reading threads each). None (YAML null): the CPU cores available to this process divided by
# the processes on this node (LOCAL_WORLD_SIZE), at most 8; the log says what was chosen.
_C.DATA.NUM_WORKERS = None
# Where the toy dataset is generated on first use ("" = ~/.cache/crossformer/toy).
_C.DATA.TOY_ROOT = ""
# Keep the scanned file list of each split in $XDG_CACHE_HOME/crossformer/filelists (~/.cache/...)
# and reuse it while the class directories are unchanged: a restart does not list 1.28 M files again.
_C.DATA.FILE_LIST_CACHE = True
# Virtual dataset sizes (all ranks together) of the "synthetic" dataset.
_C.DATA.SYNTHETIC_TRAIN_SIZE = 1281167
_C.DATA.SYNTHETIC_VAL_SIZE = 50000

# -----------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------
_C.MODEL = CN()
# A registered variant, see models.list_models().
_C.MODEL.NAME = "crossformerpp_b"
_C.MODEL.NUM_CLASSES = 1000
_C.MODEL.DROP_RATE = 0.0
_C.MODEL.DROP_PATH_RATE = 0.3
_C.MODEL.LABEL_SMOOTHING = 0.1
# Weights-only initialisation from one of our checkpoints or an official one (a dict with "model");
# the head is re-initialised when its number of classes differs. Set by --pretrained.
_C.MODEL.PRETRAINED = ""
# Which weights of a training checkpoint --pretrained loads: "model" (the trained weights) or "ema"
# (their exponential moving average, as in ema_best.pth). Set to "ema" by --use-ema.
_C.MODEL.PRETRAINED_WEIGHTS = "model"
# A checkpoint to resume the whole training state from (overrides auto-resume). Set by --resume.
_C.MODEL.RESUME = ""
# Architecture overrides for custom (e.g. tiny) models: stage-1 width and one entry per stage.
# None (YAML null) keeps the variant's value; the types are declared in _NONE_KEYS below.
_C.MODEL.CROSSFORMER = CN()
_C.MODEL.CROSSFORMER.EMBED_DIM = None
_C.MODEL.CROSSFORMER.DEPTHS = None
_C.MODEL.CROSSFORMER.NUM_HEADS = None
_C.MODEL.CROSSFORMER.GROUP_SIZE = None
_C.MODEL.CROSSFORMER.CRS_INTERVAL = None

# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------
_C.TRAIN = CN()
_C.TRAIN.EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.WEIGHT_DECAY = 0.05
# Layer-wise LR decay (BEiT, timm's param_groups_layer_decay): parameters at depth d of D (stem,
# blocks and patch merges in order, the final norm with the last block, the head at D) train at
# LR x LAYER_DECAY ** (D - d).
# 1.0 = off (pre-training); fine-tuning recipes use 0.65-0.9.
_C.TRAIN.LAYER_DECAY = 1.0
# Learning rates are given for a total batch of 512 and scaled linearly.
_C.TRAIN.BASE_LR = 5e-4
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 5e-6
# The LRs above are for this total batch (per-process batch x processes x accumulation steps)
# and are scaled linearly with the real one; 0 disables the scaling.
_C.TRAIN.LR_REFERENCE_BATCH = 512
# Derived by get_config(): the scaled learning rates the optimizer actually uses.
_C.TRAIN.SCALED_BASE_LR = 0.0
_C.TRAIN.SCALED_WARMUP_LR = 0.0
_C.TRAIN.SCALED_MIN_LR = 0.0
_C.TRAIN.LR_SCHEDULER = CN()
# False (the official recipe): the cosine runs over all steps and the warmup line is laid over
# its start (timm's CosineLRScheduler with t_initial = all steps). True: the cosine starts at the
# end of the warmup and spans the remaining steps (a higher mean LR, about 7 % for 20 of 300 epochs).
_C.TRAIN.LR_SCHEDULER.WARMUP_PREFIX = False
# Max global gradient norm; 0 disables clipping (the norm is still logged).
_C.TRAIN.CLIP_GRAD = 5.0
# Resume from the newest complete checkpoint of the run directory when there is one.
_C.TRAIN.AUTO_RESUME = True
_C.TRAIN.ACCUMULATION_STEPS = 1
_C.TRAIN.USE_CHECKPOINT = False
# "bf16", "fp16" or "none". On a GPU without native bf16 (before Ampere: V100, T4) bf16 falls back
# to fp16 with a loss scaler, with a one-line notice.
_C.TRAIN.AMP = "bf16"
# torch.compile the model; when distributed the DDP-wrapped model, so DDP's gradient buckets overlap
# the backward pass. Evaluation compiles the unwrapped model separately.
_C.TRAIN.COMPILE = False
# The torch.compile backend: "inductor" (generated kernels), "aot_eager" or "eager" (graph capture
# only, eager kernels: for debugging a compile problem).
_C.TRAIN.COMPILE_BACKEND = "inductor"
# Let float32 matmuls and convolutions on NVIDIA GPUs (Ampere and newer) use TF32 tensor cores: a
# 10-bit mantissa in the products, fp32 accumulation. Speeds up float32 work (TRAIN.AMP none,
# the parts autocast keeps in float32); False keeps full IEEE float32.
_C.TRAIN.TF32 = True
# Save last.pth and stop after this many optimizer steps in total (0 = off), e.g. to rehearse a preemption.
_C.TRAIN.STOP_AFTER_STEPS = 0
# A step whose gradient norm is not finite is skipped (no update) and counted; after this many in a
# row the run writes nonfinite_stepN.pth and stops with exit code 3 (docs/reliability.md).
_C.TRAIN.MAX_NONFINITE_STEPS = 20
# Testing aid: rank 0's loss is replaced by NaN at these global optimizer steps (1-based); [] = off.
_C.TRAIN.DEBUG_NONFINITE_STEPS = []

_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = "adamw"
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)

_C.TRAIN.EMA = CN()
_C.TRAIN.EMA.ENABLE = False
_C.TRAIN.EMA.DECAY = 0.9998

# -----------------------------------------------------------------------------
# Distributed
# -----------------------------------------------------------------------------
_C.DIST = CN()
# Seconds a collective may wait for the other ranks before the process fails (a dead or hung rank);
# must exceed the longest checkpoint write and the slowest rank's lag.
_C.DIST.TIMEOUT_S = 600

# -----------------------------------------------------------------------------
# Augmentation (timm conventions)
# -----------------------------------------------------------------------------
_C.AUG = CN()
_C.AUG.COLOR_JITTER = 0.4
# RandAugment policy string; "" disables it.
_C.AUG.AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
_C.AUG.REPROB = 0.25
_C.AUG.REMODE = "pixel"
_C.AUG.RECOUNT = 1
# Random-resized-crop area fraction and aspect-ratio ranges (both loaders; timm / Inception defaults).
_C.AUG.SCALE = [0.08, 1.0]
_C.AUG.RATIO = [3.0 / 4.0, 4.0 / 3.0]
_C.AUG.MIXUP = 0.8
_C.AUG.CUTMIX = 1.0
_C.AUG.MIXUP_PROB = 1.0
_C.AUG.MIXUP_SWITCH_PROB = 0.5
_C.AUG.MIXUP_MODE = "batch"

# -----------------------------------------------------------------------------
# Testing
# -----------------------------------------------------------------------------
_C.TEST = CN()
# Eval: resize shorter side to IMG_SIZE / CROP_PCT, then center-crop IMG_SIZE (224 -> 256).
_C.TEST.CROP_PCT = 0.875
# Precision of validation and --eval: "train" (as TRAIN.AMP), "bf16", "fp16" or "none" (float32).
_C.TEST.AMP = "train"

# -----------------------------------------------------------------------------
# Misc
# -----------------------------------------------------------------------------
_C.OUTPUT = "output"
_C.TAG = "default"
# Checkpoint every SAVE_FREQ epochs and every SAVE_STEPS optimizer steps (0 = off).
_C.SAVE_FREQ = 1
_C.SAVE_STEPS = 0
# Number of per-epoch checkpoints kept.
_C.SAVE_KEEP = 3
# Log a progress line every PRINT_FREQ optimizer steps.
_C.PRINT_FREQ = 10
_C.SEED = 0
# Set by --eval / --throughput.
_C.EVAL_MODE = False
_C.THROUGHPUT_MODE = False

# -----------------------------------------------------------------------------
# Throughput benchmark (--throughput)
# -----------------------------------------------------------------------------
_C.THROUGHPUT = CN()
_C.THROUGHPUT.WARMUP_ITERS = 10
_C.THROUGHPUT.ITERS = 30


# -----------------------------------------------------------------------------
# Rules: the allowed values and value rules of every key, checked once by validate()
# -----------------------------------------------------------------------------
# Allowed values of the string keys that select an implementation.
_CHOICES: Dict[str, Tuple[str, ...]] = {
    "DATA.DATASET": ("imagenet", "toy", "synthetic"),
    "DATA.LOADER": ("dali", "pytorch"),
    "DATA.FORMAT": ("folder", "shards"),
    "DATA.VAL_LAYOUT": ("names", "indices"),
    "DATA.INTERPOLATION": ("bicubic", "bilinear"),
    "TRAIN.AMP": ("bf16", "fp16", "none"),
    "TEST.AMP": ("train", "bf16", "fp16", "none"),
    "TRAIN.OPTIMIZER.NAME": ("adamw",),
    "TRAIN.COMPILE_BACKEND": ("inductor", "aot_eager", "eager"),
    "MODEL.PRETRAINED_WEIGHTS": ("model", "ema"),
}

# Stages of every registered variant: the length of each per-stage MODEL.CROSSFORMER list.
NUM_STAGES = 4

# Keys whose default None means "decided when the run starts" (the variant's value; the worker count
# for this machine). A value given in YAML or --opts must have the type of this example; null (or
# None) restores the default.
_NONE_KEYS: Dict[str, Any] = {
    "DATA.NUM_WORKERS": 8,
    "MODEL.CROSSFORMER.EMBED_DIM": 64,
    "MODEL.CROSSFORMER.DEPTHS": [2, 2, 18, 2],
    "MODEL.CROSSFORMER.NUM_HEADS": [2, 4, 8, 16],
    "MODEL.CROSSFORMER.GROUP_SIZE": [4, 4, 14, 7],
    "MODEL.CROSSFORMER.CRS_INTERVAL": [4, 2, 1, 1],
}

# Named flag -> config key. A flag changes the config only when typed.
_FLAG_KEYS: Dict[str, str] = {
    "batch_size": "DATA.BATCH_SIZE",
    "data_path": "DATA.DATA_PATH",
    "output": "OUTPUT",
    "tag": "TAG",
    "resume": "MODEL.RESUME",
    "pretrained": "MODEL.PRETRAINED",
    "use_ema": "MODEL.PRETRAINED_WEIGHTS",
    "eval": "EVAL_MODE",
    "throughput": "THROUGHPUT_MODE",
    "accumulation_steps": "TRAIN.ACCUMULATION_STEPS",
    "use_checkpoint": "TRAIN.USE_CHECKPOINT",
}

_SCALED_KEYS = (("BASE_LR", "SCALED_BASE_LR"), ("WARMUP_LR", "SCALED_WARMUP_LR"), ("MIN_LR", "SCALED_MIN_LR"))


class ConfigError(ValueError):
    """A config value or key that cannot be used; the message names the key, the rule and the fix."""


def get_defaults() -> CN:
    """A fresh, mutable copy of the default config."""
    return _C.clone()


def flat_keys(node: CN, prefix: str = "") -> List[str]:
    """Every leaf key of ``node`` in dotted form, e.g. ``TRAIN.EMA.DECAY``.

    Args:
        node: A config node.
        prefix: Dotted path of ``node`` itself.
    """
    keys = []
    for name, value in node.items():
        full = f"{prefix}{name}"
        keys.extend(flat_keys(value, full + ".") if isinstance(value, CN) else [full])
    return keys


def _get(cfg: CN, key: str) -> Any:
    """The value at dotted ``key`` of ``cfg``."""
    return functools.reduce(lambda node, part: node[part], key.split("."), cfg)


def _range_ok(values: Sequence[float], upper: float) -> bool:
    """``values`` is ``[lo, hi]`` with ``0 < lo <= hi <= upper``."""
    return len(values) == 2 and 0 < values[0] <= values[1] <= upper


def _per_stage_ok(values: Optional[Sequence[int]]) -> bool:
    """``values`` is None (the variant's) or one integer >= 1 per stage."""
    return values is None or (len(values) == NUM_STAGES and all(v >= 1 for v in values))


def _value_rules(cfg: CN) -> List[Tuple[str, bool, str]]:
    """``(key, holds, rule)`` for every rule beyond a key's type and choices; a table, hence its length."""
    from models.crossformer import SIZE_DIVISOR  # the model's total downsampling

    train, arch = cfg.TRAIN, cfg.MODEL.CROSSFORMER
    per_stage = f"must be null (the variant's value) or {NUM_STAGES} integers >= 1, one per stage"
    return [
        ("DATA.BATCH_SIZE", cfg.DATA.BATCH_SIZE >= 1, "must be >= 1"),
        ("DATA.SHUFFLE_BUFFER", cfg.DATA.SHUFFLE_BUFFER >= 1, "must be >= 1 (1: no shuffling within a shard stream)"),
        ("DATA.NUM_WORKERS", cfg.DATA.NUM_WORKERS is None or cfg.DATA.NUM_WORKERS >= 0,
         "must be >= 0 (0 = load in the training process) or null (one per core, at most 8)"),
        ("DATA.IMG_SIZE", cfg.DATA.IMG_SIZE >= SIZE_DIVISOR and cfg.DATA.IMG_SIZE % SIZE_DIVISOR == 0,
         f"must be a multiple of {SIZE_DIVISOR} (the four stages downsample by {SIZE_DIVISOR} in total), e.g. 224"),
        ("TRAIN.EPOCHS", train.EPOCHS >= 1, "must be >= 1"),
        ("TRAIN.WARMUP_EPOCHS", 0 <= train.WARMUP_EPOCHS < train.EPOCHS,
         f"must be in [0, TRAIN.EPOCHS={train.EPOCHS})"),
        ("TRAIN.ACCUMULATION_STEPS", train.ACCUMULATION_STEPS >= 1, "must be >= 1"),
        ("TRAIN.BASE_LR", train.BASE_LR > 0, "must be > 0"),
        ("TRAIN.MIN_LR", 0 <= train.MIN_LR <= train.BASE_LR, "must be in [0, TRAIN.BASE_LR]"),
        ("TRAIN.WARMUP_LR", 0 <= train.WARMUP_LR <= train.BASE_LR, "must be in [0, TRAIN.BASE_LR]"),
        ("TRAIN.WEIGHT_DECAY", train.WEIGHT_DECAY >= 0, "must be >= 0"),
        ("TRAIN.LAYER_DECAY", 0 < train.LAYER_DECAY <= 1, "must be in (0, 1] (1 = no layer-wise decay)"),
        ("TRAIN.CLIP_GRAD", train.CLIP_GRAD >= 0, "must be >= 0 (0 = no clipping)"),
        ("TRAIN.LR_REFERENCE_BATCH", train.LR_REFERENCE_BATCH >= 0, "must be >= 0 (0 = no LR scaling)"),
        ("TRAIN.STOP_AFTER_STEPS", train.STOP_AFTER_STEPS >= 0, "must be >= 0 (0 = off)"),
        ("TRAIN.MAX_NONFINITE_STEPS", train.MAX_NONFINITE_STEPS >= 1, "must be >= 1"),
        ("TRAIN.DEBUG_NONFINITE_STEPS", all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                                            for s in train.DEBUG_NONFINITE_STEPS),
         "must be a list of global steps >= 1"),
        ("TRAIN.EMA.DECAY", 0 <= train.EMA.DECAY < 1, "must be in [0, 1)"),
        ("TRAIN.OPTIMIZER.BETAS", len(train.OPTIMIZER.BETAS) == 2 and all(0 <= b < 1 for b in train.OPTIMIZER.BETAS),
         "must be two numbers in [0, 1)"),
        ("TRAIN.OPTIMIZER.EPS", train.OPTIMIZER.EPS > 0, "must be > 0"),
        ("DIST.TIMEOUT_S", cfg.DIST.TIMEOUT_S >= 1, "must be >= 1 (seconds)"),
        ("MODEL.NUM_CLASSES", cfg.MODEL.NUM_CLASSES >= 1, "must be >= 1"),
        ("MODEL.DROP_PATH_RATE", 0 <= cfg.MODEL.DROP_PATH_RATE < 1, "must be in [0, 1)"),
        ("MODEL.DROP_RATE", 0 <= cfg.MODEL.DROP_RATE < 1, "must be in [0, 1)"),
        ("MODEL.LABEL_SMOOTHING", 0 <= cfg.MODEL.LABEL_SMOOTHING < 1, "must be in [0, 1)"),
        ("MODEL.CROSSFORMER.EMBED_DIM", arch.EMBED_DIM is None or arch.EMBED_DIM >= 1,
         "must be null (the variant's value) or >= 1"),
        *((f"MODEL.CROSSFORMER.{name}", _per_stage_ok(arch[name]), per_stage)
          for name in ("DEPTHS", "NUM_HEADS", "GROUP_SIZE", "CRS_INTERVAL")),
        ("AUG.SCALE", _range_ok(cfg.AUG.SCALE, 1.0),
         "must be [lo, hi] with 0 < lo <= hi <= 1 (fractions of the image area), e.g. [0.08, 1.0]"),
        ("AUG.RATIO", _range_ok(cfg.AUG.RATIO, float("inf")),
         "must be [lo, hi] with 0 < lo <= hi (width / height), e.g. [0.75, 1.333]"),
        ("SAVE_FREQ", cfg.SAVE_FREQ >= 1, "must be >= 1"),
        ("SAVE_STEPS", cfg.SAVE_STEPS >= 0, "must be >= 0 (0 = off)"),
        ("SAVE_KEEP", cfg.SAVE_KEEP >= 0, "must be >= 0"),
        ("PRINT_FREQ", cfg.PRINT_FREQ >= 1, "must be >= 1"),
        ("THROUGHPUT.ITERS", cfg.THROUGHPUT.ITERS >= 1, "must be >= 1"),
        ("THROUGHPUT.WARMUP_ITERS", cfg.THROUGHPUT.WARMUP_ITERS >= 0, "must be >= 0"),
    ]


def validate(cfg: CN) -> None:
    """Check every allowed value and value rule; the builders rely on a config that passed.

    Args:
        cfg: A fully merged config.

    Raises:
        ConfigError: naming the key, the rule and a fix.
    """
    from models import list_models

    for key, allowed in _CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}={value!r} is not supported{hint}; use one of {', '.join(allowed)}")
    for key, holds, rule in _value_rules(cfg):
        if not holds:
            raise ConfigError(f"{key}={_get(cfg, key)!r} {rule}; change it in the YAML or with --opts {key} VALUE")
    if cfg.DATA.DATA_PATH and cfg.DATA.DATASET != "imagenet":
        raise ConfigError(f"DATA.DATA_PATH={cfg.DATA.DATA_PATH!r} was given but DATA.DATASET={cfg.DATA.DATASET!r} "
                          "reads no folder; add --opts DATA.DATASET imagenet to train on the folder, or drop "
                          "--data-path")
    if cfg.DATA.FORMAT == "shards" and cfg.DATA.DATASET != "imagenet":
        raise ConfigError(f"DATA.FORMAT='shards' reads DATA_PATH but DATA.DATASET={cfg.DATA.DATASET!r} reads none; "
                          "add --opts DATA.DATASET imagenet and --data-path SHARDS, or drop DATA.FORMAT")
    if (cfg.DATA.VAL_LAYOUT != "names" or cfg.DATA.REAL_LABELS) and (cfg.DATA.DATASET, cfg.DATA.FORMAT) != (
            "imagenet", "folder"):
        raise ConfigError(f"DATA.VAL_LAYOUT={cfg.DATA.VAL_LAYOUT!r} / DATA.REAL_LABELS={cfg.DATA.REAL_LABELS!r} "
                          "apply to an image folder (DATA.DATASET imagenet, DATA.FORMAT folder); drop them or "
                          "evaluate a folder")
    if cfg.DATA.REAL_LABELS and not os.path.isfile(cfg.DATA.REAL_LABELS):
        raise ConfigError(f"DATA.REAL_LABELS={cfg.DATA.REAL_LABELS!r} is not a file; pass the path of ImageNet-ReaL's "
                          "real.json")
    if cfg.MODEL.RESUME and cfg.MODEL.PRETRAINED:
        raise ConfigError("--resume and --pretrained were both given: --resume restores the whole training "
                          "state (weights included), --pretrained only initialises the weights; pass one")
    if cfg.MODEL.NAME not in list_models():
        close = difflib.get_close_matches(cfg.MODEL.NAME, list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"MODEL.NAME={cfg.MODEL.NAME!r} is not a registered model{hint}; "
                          f"use one of {', '.join(list_models())}")


# -----------------------------------------------------------------------------
# Merging: defaults < YAML (BASE first) < --opts < named flags the user typed
# -----------------------------------------------------------------------------
# yacs's merge_from_other_cfg / merge_from_list are not used: their errors name neither the file or
# flag a value came from nor the closest valid key, and their type rule accepts None for any key
# but rejects an int for a float key and a quoted YAML number for a string key. Rewriting their
# errors would mean wrapping every call; this small merge is shorter. yacs decodes --opts values.
def _closest(key: str, candidates: Iterable[str]) -> str:
    candidates = list(candidates)
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.5)
    if not close:  # a typo in the last part only, e.g. TRAIN.EPOCH -> TRAIN.EPOCHS
        last = key.rsplit(".", 1)[-1]
        close = [c for c in candidates if c.rsplit(".", 1)[-1] in difflib.get_close_matches(
            last, [k.rsplit(".", 1)[-1] for k in candidates], n=3, cutoff=0.6)][:3]
    return f"closest valid keys: {', '.join(close)}" if close else "see config.py for the valid keys"


def _coerce(key: str, value: Any, example: Any, source: str) -> Any:
    """Check ``value`` against the type of ``example`` and convert where it is lossless.

    Args:
        key: Dotted key, for the error message.
        value: The new value (from YAML, --opts or a flag).
        example: A value of the key's type (its current value, or its ``_NONE_KEYS`` entry).
        source: Where the value came from, for the error message.
    """
    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{key}={value!r} ({type(value).__name__}) from {source} has the wrong type: "
                           f"expected {expected} like {example!r}; fix the value")

    if isinstance(example, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise fail("true or false")
    if isinstance(example, (int, float)):
        kind = type(example)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and (kind is float or isinstance(value, int)):  # an int never takes a float
            return kind(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return kind(value)
            except ValueError:
                pass
        raise fail("an integer" if kind is int else "a number")
    if isinstance(example, str):
        if isinstance(value, str):
            return value
        raise fail("a string (quote it)")
    if isinstance(example, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise fail("a list")
        if example:
            value = [_coerce(f"{key}[{i}]", v, example[0], source) for i, v in enumerate(value)]
        elif any(isinstance(v, (dict, CN)) for v in value):
            raise fail("a list of plain values")
        return type(example)(value)
    raise fail(type(example).__name__)


def _example(cfg: CN, key: str, source: str) -> Any:
    """A value of ``key``'s type (a section for a section); an error naming the closest keys if unknown."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, CN) or part not in node:
            raise ConfigError(f"unknown config key {key} (from {source}); {_closest(key, flat_keys(cfg))}")
        node = node[part]
    return _NONE_KEYS.get(key, node)


def _set(cfg: CN, key: str, value: Any, source: str) -> None:
    """Set dotted ``key`` of ``cfg`` to ``value`` after checking that the key exists and the type fits."""
    example = _example(cfg, key, source)
    if isinstance(example, CN):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} (from {source}) is a section, not a value; set its keys, "
                              f"e.g. {flat_keys(example, key + '.')[0]}")
        for name, sub in value.items():
            _set(cfg, f"{key}.{name}", sub, source)
        return
    parent, _, name = key.rpartition(".")
    restore_default = key in _NONE_KEYS and value in (None, "null")
    (_get(cfg, parent) if parent else cfg)[name] = None if restore_default else _coerce(key, value, example, source)


def _read_yaml(path: str, chain: Tuple[str, ...] = ()) -> List[Tuple[str, Dict[str, Any]]]:
    """``[(file, mapping), ...]`` for ``path`` and its ``BASE`` files, bases first.

    Args:
        path: YAML file; ``BASE`` entries are relative to it.
        chain: Files already being read, to detect cycles.
    """
    path = os.path.abspath(path)
    if path in chain:
        raise ConfigError(f"BASE cycle: {' -> '.join(chain + (path,))}; remove one of the BASE entries")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML to --cfg or BASE")
    with open(path, "r", encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML ({e}); fix its syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} holds a {type(data).__name__}, not a mapping of keys; "
                          "write it as KEY: value lines")
    bases = data.pop("BASE", [])
    bases = [bases] if isinstance(bases, str) else bases
    layers: List[Tuple[str, Dict[str, Any]]] = []
    for base in bases or []:
        if base:
            layers.extend(_read_yaml(os.path.join(os.path.dirname(path), base), chain + (path,)))
    layers.append((path, data))
    return layers


def _merge_opts(cfg: CN, opts: Sequence[str]) -> None:
    if len(opts) % 2:
        raise ConfigError(f"--opts needs KEY VALUE pairs, got {len(opts)} items ending with {opts[-1]!r}; "
                          "add the missing value")
    for key, raw in zip(opts[0::2], opts[1::2]):
        # A string key takes the text as typed (TAG 001); others read it as a Python literal (3, [1, 2]).
        value = raw if isinstance(_example(cfg, key, "--opts"), str) else CN._decode_cfg_value(raw)
        _set(cfg, key, value, "--opts")


def scale_learning_rates(cfg: CN, world_size: int) -> None:
    """Fill ``TRAIN.SCALED_*_LR``: the entered LRs x total batch / ``TRAIN.LR_REFERENCE_BATCH``.

    The total batch counts every process and every accumulation step. The entered values stay
    in ``TRAIN.BASE_LR`` etc., so both are visible in ``config.yaml``.

    Args:
        cfg: A mutable, merged config.
        world_size: Number of training processes.
    """
    total_batch = cfg.DATA.BATCH_SIZE * world_size * cfg.TRAIN.ACCUMULATION_STEPS
    factor = total_batch / cfg.TRAIN.LR_REFERENCE_BATCH if cfg.TRAIN.LR_REFERENCE_BATCH else 1.0
    for entered, scaled in _SCALED_KEYS:
        value = cfg.TRAIN[entered] * factor
        given = cfg.TRAIN[scaled]
        if given and abs(given - value) > 1e-12 * max(abs(value), 1.0):
            logger.warning("TRAIN.%s=%g is derived from TRAIN.%s and the total batch %d; using %g instead",
                           scaled, given, entered, total_batch, value)
        cfg.TRAIN[scaled] = value


def load_config(cfg_file: str = "", opts: Sequence[str] = (), flags: Optional[Dict[str, Any]] = None,
                world_size: int = 1) -> CN:
    """Build the frozen config of a run.

    Args:
        cfg_file: YAML file (may list ``BASE`` files, merged first); "" for the defaults only.
        opts: ``["KEY", "VALUE", ...]`` pairs applied after the YAML.
        flags: ``{config key: value}`` from named command-line flags, applied last.
        world_size: Number of processes, for the LR scaling.

    Raises:
        ConfigError: for an unknown key, a wrong type or a value that breaks a rule.
    """
    cfg = get_defaults()
    if cfg_file:
        for path, data in _read_yaml(cfg_file):
            for key, value in data.items():
                _set(cfg, key, value, path)
    _merge_opts(cfg, list(opts))
    for key, value in (flags or {}).items():
        _set(cfg, key, value, f"the command-line flag for {key}")
    validate(cfg)
    scale_learning_rates(cfg, world_size)
    cfg.freeze()
    return cfg


def build_arg_parser() -> argparse.ArgumentParser:
    """The command line of ``main.py`` (Swin-compatible flag names)."""
    parser = argparse.ArgumentParser(
        "CrossFormer training and evaluation", allow_abbrev=False,
        description="Precedence: config.py defaults < --cfg YAML (BASE first) < --opts < the named flags given.")
    parser.add_argument("--cfg", required=True, metavar="FILE", help="YAML config file")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                        help="override config keys, e.g. --opts TRAIN.EPOCHS 10 DATA.IMG_SIZE 64")
    # Every named flag defaults to None: one the user does not type changes nothing.
    parser.add_argument("--batch-size", type=int, help="per-process batch size (DATA.BATCH_SIZE)")
    parser.add_argument("--data-path", type=str, help="dataset root (DATA.DATA_PATH)")
    parser.add_argument("--output", type=str, help="root of the run directories (OUTPUT)")
    parser.add_argument("--tag", type=str, help="run name under OUTPUT/MODEL.NAME (TAG)")
    parser.add_argument("--resume", type=str, help="checkpoint to resume the full training state from")
    parser.add_argument("--pretrained", type=str, help="checkpoint to initialise the weights from")
    parser.add_argument("--use-ema", action="store_const", const="ema",
                        help="take the EMA weights of the --pretrained checkpoint (MODEL.PRETRAINED_WEIGHTS ema)")
    parser.add_argument("--eval", action="store_const", const=True, help="evaluate and exit")
    parser.add_argument("--throughput", action="store_const", const=True,
                        help="measure inference and training images/s and exit")
    parser.add_argument("--accumulation-steps", type=int, help="gradient accumulation steps")
    parser.add_argument("--use-checkpoint", action="store_const", const=True,
                        help="gradient checkpointing to save memory (TRAIN.USE_CHECKPOINT)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks of errors")
    # torch.distributed.launch (Swin's command) passes the local rank as a flag; the rank is read
    # from the environment (LOCAL_RANK) as under torchrun, so the value is accepted and not used.
    parser.add_argument("--local-rank", "--local_rank", type=int, dest="local_rank", help=argparse.SUPPRESS)
    return parser


def parse_option(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line; unknown flags are an error (never silently ignored).

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).
    """
    return build_arg_parser().parse_args(argv)


def get_config(args: argparse.Namespace, world_size: int = 1) -> CN:
    """The run's config from parsed arguments.

    Args:
        args: From :func:`parse_option`.
        world_size: Number of processes, for the LR scaling.
    """
    flags = {key: getattr(args, name) for name, key in _FLAG_KEYS.items() if getattr(args, name) is not None}
    return load_config(args.cfg, args.opts, flags, world_size)


def config_to_dict(cfg: CN) -> Dict[str, Any]:
    """The config as plain nested dicts / lists / scalars (for checkpoints and YAML)."""
    out: Dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, CN):
            out[key] = config_to_dict(value)
        elif isinstance(value, tuple):
            out[key] = list(value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def dump_config(cfg: CN, path: str) -> None:
    """Write the resolved config as YAML that ``--cfg`` accepts again.

    Args:
        cfg: The config.
        path: Output file.
    """
    from utils.file_io import atomic_write_text

    atomic_write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=True), path)
