"""Configuration: every key declared once, with the defaults of the CrossFormer / CrossFormer++ recipe.

Precedence (lowest to highest): these defaults < YAML file (with ``BASE`` inheritance)
< ``--opts KEY VALUE ...`` < named command-line flags that the user actually typed.

:data:`KEYS` is the one table of keys: each :class:`Key` holds its default (whose type is the key's
type), what it means, its allowed values, the named flag that sets it, its value rule and what a
change means when a run resumes. The yacs defaults (:func:`get_defaults`), the checks of
:func:`validate`, the command line's flags and the resume policy (``training/resume.py``) are derived from it.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import enum
import functools
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml
from yacs.config import CfgNode as CN

logger = logging.getLogger(__name__)

# Stages of every registered variant: the length of each per-stage MODEL.CROSSFORMER list.
NUM_STAGES = 4
# The models' total downsampling (models.crossformer.SIZE_DIVISOR; a test keeps the two equal).
IMG_SIZE_MULTIPLE = 32


class OnResume(enum.Enum):
    """What a key's changed value means when a run resumes (applied by ``training/resume.py``)."""

    IDENTITY = "identity"  # what makes a run this run: refused under auto-resume (another experiment)
    RECIPE = "recipe"  # what the run computes: refused unless --resume-changed, then it takes effect
    SCHEDULE = "schedule"  # a recipe key of the LR schedule: as RECIPE, and the schedule is rebuilt at the step
    LENGTH = "length"  # TRAIN.EPOCHS: extends or shortens the run; the schedule is rebuilt at the current step
    OPTIMIZER = "optimizer"  # refused: the optimizer's saved state carries the old value
    RUNTIME = "runtime"  # how the run executes, not what it computes: takes effect, logged
    NOT_COMPARED = "not compared"  # set per command, derived from other keys, or reported elsewhere (batch keys)


Rule = Tuple[Callable[[Any, CN], bool], str]  # (holds(value, config), the rule in words)

_UNSET = object()


@dataclass(frozen=True)
class Key:
    """One config key.

    Args:
        name: Dotted name, e.g. ``TRAIN.EMA.DECAY``.
        default: The default; its type is the key's type (see ``example`` for a default of None).
        doc: What the key means (shown by ``--help`` for flags; the documentation of the key).
        choices: The allowed values of a string key that selects an implementation.
        example: For a key whose default None means "decided when the run starts": a value of its
            type; YAML ``null`` (or ``None``) restores the default.
        flag: ``(flag, argparse keyword arguments)`` of the named command-line flag that sets it.
        rule: ``(holds(value, config), rule)`` beyond the type and the choices.
        resume: What a changed value means on resume.
    """

    name: str
    default: Any
    doc: str = ""
    choices: Tuple[str, ...] = ()
    example: Any = _UNSET
    flag: Optional[Tuple[str, Dict[str, Any]]] = None
    rule: Optional[Rule] = None
    resume: OnResume = OnResume.RECIPE

    @property
    def none_allowed(self) -> bool:
        return self.example is not _UNSET


def _at_least(lower: float, note: str = "") -> Rule:
    return (lambda value, cfg: value >= lower), f"must be >= {lower:g}{note}"


def _range_ok(values: Sequence[float], upper: float) -> bool:
    """``values`` is ``[lo, hi]`` with ``0 < lo <= hi <= upper``."""
    return len(values) == 2 and 0 < values[0] <= values[1] <= upper


_PER_STAGE: Rule = ((lambda values, cfg: values is None or (len(values) == NUM_STAGES and all(v >= 1 for v in values))),
                    f"must be null (the variant's value) or {NUM_STAGES} integers >= 1, one per stage")
_FRACTION: Rule = ((lambda value, cfg: 0 <= value < 1), "must be in [0, 1)")
_FREEZE_STAGES = tuple(f"stages-{k}" for k in range(1, NUM_STAGES + 1))
_I, _S, _N, _O, _R = OnResume.IDENTITY, OnResume.SCHEDULE, OnResume.NOT_COMPARED, OnResume.OPTIMIZER, OnResume.RUNTIME


def _flag(name: str, help_text: str, **kwargs: Any) -> Tuple[str, Dict[str, Any]]:
    return name, {"help": help_text, **kwargs}


KEYS: Tuple[Key, ...] = (
    Key("BASE", [""], "YAML files merged first (paths relative to the including file).", resume=_N),
    # --- Data -------------------------------------------------------------------------------
    Key("DATA.BATCH_SIZE", 128, "Per-process batch size.", rule=_at_least(1), resume=_N,
        flag=_flag("--batch-size", "per-process batch size (DATA.BATCH_SIZE)", type=int)),
    Key("DATA.DATA_PATH", "", "Dataset root (train/ and val/).", resume=_I,
        flag=_flag("--data-path", "dataset root (DATA.DATA_PATH)", type=str)),
    Key("DATA.DATASET", "imagenet", '"imagenet" (folder layout), "toy" (built-in generated JPEGs), "synthetic" '
        "(random tensors).", choices=("imagenet", "toy", "synthetic"), resume=_I),
    Key("DATA.LOADER", "dali", "The loader: DALI or PyTorch's DataLoader with timm's transforms.",
        choices=("dali", "pytorch"), resume=_R),
    Key("DATA.FORMAT", "folder", 'How an imagenet DATA_PATH stores its images: "folder" (train/<class>/<image>, '
        'val/...), "shards" (train/ and val/ of tar shards with an index.json, written by python -m '
        'data.make_shards) or "multilabel" (flat train/ and val/ image folders with train.csv and val.csv beside '
        'them: rows "file,labels", the labels class names separated by spaces; needs TRAIN.LOSS bce and reports '
        "mAP).", choices=("folder", "shards", "multilabel")),
    Key("DATA.VAL_LAYOUT", "names", 'How DATA_PATH/val\'s class folders give labels (folder format): "names" (sorted '
        "by name, as train's and torchvision's ImageFolder) or \"indices\" (named 0..N-1 by class index, "
        "ImageNet-V2's layout: the label is the folder's integer value, never its place in string order; the class "
        "names come from train/).", choices=("names", "indices")),
    Key("DATA.REAL_LABELS", "", "ImageNet-ReaL's real.json (the correct classes of each original val image): --eval "
        'and the end of training report ReaL top-1 next to the original ("" = off).',
        rule=((lambda path, cfg: not path or os.path.isfile(path)),
              "is not a file; pass the path of ImageNet-ReaL's real.json"), resume=_R),
    Key("DATA.SHUFFLE_BUFFER", 4096, "Shards: places of each rank's shuffle buffer; a sample is drawn from the next "
        "SHUFFLE_BUFFER samples of the rank's shard stream (the buffer holds sample numbers, not images).",
        rule=_at_least(1, " (1: no shuffling within a shard stream)")),
    Key("DATA.REPEATED_AUG", 1, "Repeated augmentation (DeiT's RASampler): each sampled training image k times per "
        "epoch, each copy with its own augmentation; the images per process and epoch do not change, so an epoch "
        "sees about 1/k of the set, k times each (1 = off). Folder: the copies go to k consecutive ranks (different "
        "ranks when the world size is >= k). Shards: the copies stay on one rank, within its own shard stream, "
        "spread apart by its shuffle buffer (DATA.SHUFFLE_BUFFER), so no rank reads another's shards. No effect on "
        "synthetic data.", resume=_I,
        rule=_at_least(1, " (1: off; k: each sampled image k times per epoch)")),
    Key("DATA.IMG_SIZE", 224, "Training and evaluation image size.", resume=_I,
        rule=((lambda value, cfg: value >= IMG_SIZE_MULTIPLE and value % IMG_SIZE_MULTIPLE == 0),
              f"must be a multiple of {IMG_SIZE_MULTIPLE} (the four stages downsample by {IMG_SIZE_MULTIPLE} in "
              "total), e.g. 224")),
    Key("DATA.INTERPOLATION", "bicubic", "Interpolation of random-resized-crop and the eval resize.",
        choices=("bicubic", "bilinear")),
    Key("DATA.PIN_MEMORY", True, "Pinned host memory for the PyTorch loader's batches.", resume=_R),
    Key("DATA.NUM_WORKERS", None, "Loader workers per process: PyTorch DataLoader worker processes; for DALI, its "
        "CPU threads (and 4 file-reading threads each). None (YAML null): the CPU cores available to this process "
        "divided by the processes on this node (LOCAL_WORLD_SIZE), at most 8; the log says what was chosen.",
        example=8, resume=_R,
        rule=((lambda value, cfg: value is None or value >= 0),
              "must be >= 0 (0 = load in the training process) or null (one per core, at most 8)")),
    Key("DATA.TOY_ROOT", "", 'Where the toy dataset is generated on first use ("" = ~/.cache/crossformer/toy).',
        resume=_R),
    Key("DATA.FILE_LIST_CACHE", True, "Keep the scanned file list of each split in $XDG_CACHE_HOME/crossformer/"
        "filelists (~/.cache/...) and reuse it while the class directories are unchanged: a restart does not list "
        "1.28 M files again.", resume=_R),
    Key("DATA.SYNTHETIC_TRAIN_SIZE", 1281167, "Virtual training set size (all ranks together) of the synthetic "
        "dataset.", rule=_at_least(1)),
    Key("DATA.SYNTHETIC_VAL_SIZE", 50000, "Virtual validation set size of the synthetic dataset.", rule=_at_least(1)),
    # --- Model ------------------------------------------------------------------------------
    Key("MODEL.NAME", "crossformerpp_b", "A registered variant, see models.list_models().", resume=_I),
    Key("MODEL.NUM_CLASSES", 1000, "Classes of the head.", rule=_at_least(1), resume=_I),
    Key("MODEL.DROP_RATE", 0.0, "Dropout before the head.", rule=_FRACTION),
    Key("MODEL.DROP_PATH_RATE", 0.3, "Stochastic depth rate of the last block (linear in depth).", rule=_FRACTION),
    Key("MODEL.LABEL_SMOOTHING", 0.1, "Label smoothing of the loss (with mixup / cutmix applied to the mixed "
        "targets; for multi-label targets each label moves towards 0.5, timm's convention).", rule=_FRACTION),
    Key("MODEL.PRETRAINED", "", 'Weights-only initialisation from one of our checkpoints or an official one (a dict '
        'with "model"); the head is re-initialised when its number of classes differs.', resume=_N,
        flag=_flag("--pretrained", "checkpoint to initialise the weights from", type=str)),
    Key("MODEL.PRETRAINED_WEIGHTS", "model", 'Which weights of a training checkpoint --pretrained loads: "model" (the '
        'trained weights) or "ema" (their exponential moving average, as in ema_best.pth).',
        choices=("model", "ema"), resume=_N,
        flag=_flag("--use-ema", "take the EMA weights of the --pretrained checkpoint (MODEL.PRETRAINED_WEIGHTS ema)",
                   action="store_const", const="ema")),
    Key("MODEL.RESUME", "", "A checkpoint to resume the whole training state from (overrides auto-resume).",
        resume=_N, flag=_flag("--resume", "checkpoint to resume the full training state from", type=str)),
    # Knowledge distillation (training/distill.py): the student's one head learns from the labels and a teacher.
    Key("MODEL.DISTILL.TYPE", "none", '"none"; "soft": KL divergence to the teacher\'s softened outputs at '
        'temperature TAU; "hard": cross-entropy to the teacher\'s argmax (DeiT\'s). The loss is (1 - ALPHA) * '
        "TRAIN.LOSS + ALPHA * the distillation term.", choices=("none", "soft", "hard"), resume=_I),
    Key("MODEL.DISTILL.TEACHER", "", 'The teacher as a timm model name (e.g. "regnety_160", or one of our variants) '
        'built with MODEL.NUM_CLASSES classes; "" builds it from the config stored in TEACHER_WEIGHTS (one of our '
        "checkpoints or exported weights).", resume=_I),
    Key("MODEL.DISTILL.TEACHER_WEIGHTS", "", "The teacher's weights: a timm / bare state dict, or one of our "
        "checkpoints or exported weights. The checkpoint records the file's SHA-256: a resume with another teacher "
        "is refused, a moved file is not. --eval and --throughput do not read it.",
        rule=((lambda path, cfg: cfg.MODEL.DISTILL.TYPE == "none" or cfg.EVAL_MODE or cfg.THROUGHPUT_MODE
               or os.path.isfile(path)),
              "is not a file, and MODEL.DISTILL.TYPE={cfg.MODEL.DISTILL.TYPE!r} needs the teacher's weights; pass "
              "the path of the teacher's weights file"),
        resume=_N),  # the teacher's identity (its bytes, not its path) is compared: training/distill.py
    Key("MODEL.DISTILL.TEACHER_EMA", False, "Take the EMA weights of the teacher's file (ours: \"model_ema\", "
        'older files "ema"; timm\'s: "state_dict_ema").', resume=_I),
    Key("MODEL.DISTILL.TEACHER_IMG_SIZE", None, "The teacher's input size: the student's batch is resized to it on "
        "the device (bicubic). None: the timm model's pretrained input size, or the IMG_SIZE stored with our "
        "checkpoint.", example=224, resume=_I,
        rule=((lambda value, cfg: value is None or value >= 1), "must be null (the teacher's own size) or >= 1")),
    Key("MODEL.DISTILL.ALPHA", 0.5, "Weight of the distillation term (DeiT: 0.5).",
        rule=((lambda value, cfg: 0 <= value <= 1), "must be in [0, 1]")),
    Key("MODEL.DISTILL.TAU", 1.0, "Temperature of soft distillation (DeiT: 1.0).",
        rule=((lambda value, cfg: value > 0), "must be > 0")),
    # Architecture overrides for custom (e.g. tiny) models; None (YAML null) keeps the variant's value.
    Key("MODEL.CROSSFORMER.EMBED_DIM", None, "Stage-1 width.", example=64, resume=_I,
        rule=((lambda value, cfg: value is None or value >= 1), "must be null (the variant's value) or >= 1")),
    Key("MODEL.CROSSFORMER.DEPTHS", None, "Blocks per stage.", example=[2, 2, 18, 2], rule=_PER_STAGE, resume=_I),
    Key("MODEL.CROSSFORMER.NUM_HEADS", None, "Attention heads per stage.", example=[2, 4, 8, 16], rule=_PER_STAGE,
        resume=_I),
    Key("MODEL.CROSSFORMER.GROUP_SIZE", None, "Attention group size per stage.", example=[4, 4, 14, 7],
        rule=_PER_STAGE, resume=_I),
    Key("MODEL.CROSSFORMER.CRS_INTERVAL", None, "Long-distance attention interval per stage.", example=[4, 2, 1, 1],
        rule=_PER_STAGE, resume=_I),
    # --- Training ---------------------------------------------------------------------------
    Key("TRAIN.EPOCHS", 300, "Epochs of the run (numbered 0 .. EPOCHS - 1 in logs, checkpoints and metrics.jsonl).",
        rule=_at_least(1), resume=OnResume.LENGTH),
    Key("TRAIN.WARMUP_EPOCHS", 20, "Linear LR warmup epochs. A warmup that does not end before the last epoch is "
        "shortened to TRAIN.EPOCHS - 1 epochs (0 for a 1-epoch run), with one notice: a quick TRAIN.EPOCHS 2 of a "
        "recipe with a 5-epoch warmup runs.", resume=_S, rule=_at_least(0)),
    Key("TRAIN.WEIGHT_DECAY", 0.05, "Weight decay, not on norms, biases, position biases or frozen parameters: "
        "decoupled for adamw and lion (w -= LR x decay x w), inside the trust-ratio update for lamb, L2 added to the "
        "gradient for sgd.", rule=_at_least(0), resume=_O),
    Key("TRAIN.FREEZE", "none", 'Parameters that do not train: "none"; "stages-K" (K = 1..4: the patch embedding '
        'and stages 1..K with their patch merges); "all-but-head" (a linear probe: only the classifier head trains). '
        "Frozen parameters have no gradient and are not given to the optimizer (no state, no weight decay); frozen "
        "modules run in eval mode while training (no drop path or dropout; BatchNorm would become timm's "
        "FrozenBatchNorm2d). Applied after --pretrained loads.", resume=_O,
        rule=((lambda value, cfg: value in ("none", "all-but-head") or value in _FREEZE_STAGES),
              f"must be none, stages-K with K in 1..{NUM_STAGES} (the patch embedding and stages 1..K frozen) or "
              "all-but-head (a linear probe)")),
    Key("TRAIN.LAYER_DECAY", 1.0, "Layer-wise LR decay (BEiT, timm's param_groups_layer_decay): parameters at depth "
        "d of D (stem, blocks and patch merges in order, the final norm with the last block, the head at D) train "
        "at LR x LAYER_DECAY ** (D - d). 1.0 = off (pre-training); fine-tuning recipes use 0.65-0.9.",
        rule=((lambda value, cfg: 0 < value <= 1), "must be in (0, 1] (1 = no layer-wise decay)"), resume=_O),
    Key("TRAIN.BASE_LR", 5e-4, "Peak LR for a total batch of TRAIN.LR_REFERENCE_BATCH (scaled linearly).",
        rule=((lambda value, cfg: value > 0), "must be > 0"), resume=_S),
    Key("TRAIN.WARMUP_LR", 5e-7, "LR at the start of the warmup (scaled like BASE_LR).", resume=_S,
        rule=((lambda value, cfg: 0 <= value <= cfg.TRAIN.BASE_LR), "must be in [0, TRAIN.BASE_LR]")),
    Key("TRAIN.MIN_LR", 5e-6, "LR at the end of the cosine (scaled like BASE_LR).", resume=_S,
        rule=((lambda value, cfg: 0 <= value <= cfg.TRAIN.BASE_LR), "must be in [0, TRAIN.BASE_LR]")),
    Key("TRAIN.LR_REFERENCE_BATCH", 512, "The LRs above are for this total batch (per-process batch x processes x "
        "accumulation steps) and are scaled linearly with the real one; 0 disables the scaling.",
        rule=_at_least(0, " (0 = no LR scaling)"), resume=_S),
    Key("TRAIN.SCALED_BASE_LR", 0.0, "Derived by load_config(): the scaled base LR the optimizer uses.", resume=_N),
    Key("TRAIN.SCALED_WARMUP_LR", 0.0, "Derived by load_config(): the scaled warmup LR.", resume=_N),
    Key("TRAIN.SCALED_MIN_LR", 0.0, "Derived by load_config(): the scaled minimum LR.", resume=_N),
    Key("TRAIN.LR_SCHEDULER.WARMUP_PREFIX", False, "False (the official recipe): the cosine runs over all steps and "
        "the warmup line is laid over its start (timm's CosineLRScheduler with t_initial = all steps). True: the "
        "cosine starts at the end of the warmup and spans the remaining steps (a higher mean LR, about 7 % for 20 "
        "of 300 epochs).", resume=_S),
    Key("TRAIN.LOSS", "ce", 'The training loss: "ce" (cross-entropy: soft-target CE on mixup / cutmix targets, '
        'else label-smoothed CE), "soft-ce" (soft-target CE always, on one-hot targets with label smoothing when '
        'nothing mixes) or "bce" (timm\'s BinaryCrossEntropy per class, DeiT III; the only loss of multi-label '
        "data).", choices=("ce", "soft-ce", "bce"), resume=_I,
        rule=((lambda loss, cfg: loss == "bce" or cfg.DATA.FORMAT != "multilabel"),
              "does not fit DATA.FORMAT multilabel (independent classes, several per image); use --opts TRAIN.LOSS "
              "bce")),
    Key("TRAIN.BCE_TARGET_THRESH", None, "With TRAIN.LOSS bce: a (mixed or smoothed) target above this value "
        "becomes 1, every other 0 (DeiT III's 0.0 without label smoothing, timm's --bce-target-thresh); at least the "
        "smallest smoothed target (MODEL.LABEL_SMOOTHING / MODEL.NUM_CLASSES, or LABEL_SMOOTHING / 2 for multi-label "
        "data). None (YAML null) keeps the soft targets.", example=0.0, resume=_I,
        rule=((lambda thresh, cfg: thresh is None or (
            0 <= thresh < 1 and cfg.TRAIN.LOSS == "bce"
            and (cfg.AUG.MIXUP > 0 or cfg.AUG.CUTMIX > 0 or cfg.MODEL.LABEL_SMOOTHING > 0))),
              "must be null unless TRAIN.LOSS is bce and the targets are soft (AUG.MIXUP or AUG.CUTMIX > 0, or "
              "MODEL.LABEL_SMOOTHING > 0), and then in [0, 1): on hard 0/1 targets a threshold changes nothing; "
              "set it to null")),
    Key("TRAIN.CLIP_GRAD", 5.0, "Max global gradient norm; 0 disables clipping (the norm is still logged).",
        rule=_at_least(0, " (0 = no clipping)")),
    Key("TRAIN.AUTO_RESUME", True, "Resume from the newest complete checkpoint of the run directory when there is "
        "one.", resume=_R),
    Key("TRAIN.RESUME_CHANGED", False, "Continue a run although recipe keys differ from its checkpoint's: the changes "
        "take effect from the position resumed, and the run's records keep them as a history (config.yaml's header, "
        "provenance.json, the checkpoints, the next metrics.jsonl row, TensorBoard). A per-command switch: config.yaml "
        "stores it as false.", resume=_N,
        flag=_flag("--resume-changed", "continue this run with the changed settings (TRAIN.RESUME_CHANGED)",
                   action="store_const", const=True)),
    Key("TRAIN.ACCUMULATION_STEPS", 1, "Micro-batches per optimizer step.", rule=_at_least(1), resume=_N,
        flag=_flag("--accumulation-steps", "gradient accumulation steps", type=int)),
    Key("TRAIN.USE_CHECKPOINT", False, "Gradient checkpointing of every stage (saves memory, costs a forward).",
        flag=_flag("--use-checkpoint", "gradient checkpointing to save memory (TRAIN.USE_CHECKPOINT)",
                   action="store_const", const=True), resume=_R),
    Key("TRAIN.AMP", "bf16", '"bf16", "fp16" or "none". On a GPU without native bf16 (before Ampere: V100, T4) bf16 '
        "falls back to fp16 with a loss scaler, with a one-line notice.", choices=("bf16", "fp16", "none")),
    Key("TRAIN.FORCE_BF16", False, "Keep bf16 (TRAIN.AMP, TEST.AMP) where the device only emulates it: a CPU "
        "without native bf16 (AVX2 only) otherwise runs float32, a GPU before Ampere fp16; each with a one-line "
        "notice.", resume=_R),
    Key("TRAIN.COMPILE", False, "torch.compile the model; when distributed the DDP-wrapped model, so DDP's gradient "
        "buckets overlap the backward pass. Evaluation compiles the unwrapped model separately.", resume=_R),
    Key("TRAIN.COMPILE_BACKEND", "inductor", 'The torch.compile backend: "inductor" (generated kernels), "aot_eager" '
        'or "eager" (graph capture only, eager kernels: for debugging a compile problem).',
        choices=("inductor", "aot_eager", "eager"), resume=_R),
    Key("TRAIN.TF32", True, "Let float32 matmuls and convolutions on NVIDIA GPUs (Ampere and newer) use TF32 tensor "
        "cores: a 10-bit mantissa in the products, fp32 accumulation. Speeds up float32 work (TRAIN.AMP none, the "
        "parts autocast keeps in float32); False keeps full IEEE float32.", resume=_R),
    Key("TRAIN.STOP_AFTER_STEPS", 0, "Save last.pth and stop after this many optimizer steps in total (0 = off), "
        "e.g. to rehearse a preemption.", rule=_at_least(0, " (0 = off)"), resume=_R),
    Key("TRAIN.MAX_NONFINITE_STEPS", 20, "A step whose gradient norm is not finite is skipped (no update) and "
        "counted; after this many in a row the run writes nonfinite_stepN.pth and stops with exit code 3 "
        "(docs/reliability.md).", rule=_at_least(1), resume=_R),
    Key("TRAIN.DEBUG_NONFINITE_STEPS", [], "Testing aid: rank 0's loss is replaced by NaN at these global optimizer "
        "steps (1-based); [] = off.",
        rule=((lambda steps, cfg: all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in steps)),
              "must be a list of global steps >= 1"), resume=_R),
    Key("TRAIN.OPTIMIZER.NAME", "adamw", 'The optimizer, over the weight-decay (and layer-decay) groups: "adamw" '
        "(torch's, fused kernel on CUDA and CPU), \"lamb\" (timm's Lamb: no clipping of its own, TRAIN.CLIP_GRAD is "
        "the one clip; no trust-ratio clipping; parameters without weight decay take no trust ratio), \"lion\" "
        "(timm's Lion: sign updates, usually an LR 3-10x lower and a weight decay 3-10x higher than AdamW's) or "
        "\"sgd\" (torch's, with TRAIN.OPTIMIZER.MOMENTUM / NESTEROV). The non-fused ones run torch's multi-tensor "
        "(foreach) kernels.",
        choices=("adamw", "lamb", "lion", "sgd"), resume=_O),
    Key("TRAIN.OPTIMIZER.EPS", None, "Epsilon of adamw and lamb (lion and sgd have none). None (YAML null): the "
        "optimizer's own default, filled in by load_config(): adamw 1e-8, lamb 1e-6.", example=1e-8, resume=_O,
        rule=((lambda value, cfg: value is None or value > 0), "must be > 0 or null (the optimizer's default)")),
    Key("TRAIN.OPTIMIZER.BETAS", None, "Betas of adamw, lamb and lion (sgd reads TRAIN.OPTIMIZER.MOMENTUM). None "
        "(YAML null): the optimizer's own default, filled in by load_config(): adamw and lamb (0.9, 0.999), lion "
        "(0.9, 0.99).", example=(0.9, 0.999), resume=_O,
        rule=((lambda betas, cfg: betas is None or (len(betas) == 2 and all(0 <= b < 1 for b in betas))),
              "must be two numbers in [0, 1) or null (the optimizer's default)")),
    Key("TRAIN.OPTIMIZER.MOMENTUM", 0.9, "sgd's momentum (0 = plain SGD).", rule=_FRACTION, resume=_O),
    Key("TRAIN.OPTIMIZER.NESTEROV", False, "sgd: Nesterov momentum (timm's --opt sgd is Nesterov; torch's default, "
        "and MAE's / torchvision's recipes, are not).", resume=_O,
        rule=((lambda value, cfg: not value or cfg.TRAIN.OPTIMIZER.MOMENTUM > 0),
              "needs TRAIN.OPTIMIZER.MOMENTUM > 0 (Nesterov momentum without momentum is plain SGD)")),
    Key("TRAIN.EMA.ENABLE", False, "Keep an exponential moving average of the weights (validated and saved too)."),
    Key("TRAIN.EMA.DECAY", 0.9998, "The EMA's decay per optimizer step.", rule=_FRACTION),
    # --- Distributed ------------------------------------------------------------------------
    Key("DIST.TIMEOUT_S", 600, "Seconds a collective may wait for the other ranks before the process fails (a dead or "
        "hung rank); must exceed the longest checkpoint write and the slowest rank's lag.",
        rule=_at_least(1, " (seconds)"), resume=_R),
    # --- Augmentation (timm conventions) ----------------------------------------------------
    Key("AUG.COLOR_JITTER", 0.4, "Colour jitter strength (without RandAugment)."),
    Key("AUG.AUTO_AUGMENT", "rand-m9-mstd0.5-inc1", 'RandAugment policy string; "" disables it.'),
    Key("AUG.REPROB", 0.25, "Random erasing probability."),
    Key("AUG.REMODE", "pixel", "Random erasing fill mode."),
    Key("AUG.RECOUNT", 1, "Random erasing count."),
    Key("AUG.SCALE", [0.08, 1.0], "Random-resized-crop area fraction range (both loaders; timm / Inception default).",
        rule=((lambda values, cfg: _range_ok(values, 1.0)),
              "must be [lo, hi] with 0 < lo <= hi <= 1 (fractions of the image area), e.g. [0.08, 1.0]")),
    Key("AUG.RATIO", [3.0 / 4.0, 4.0 / 3.0], "Random-resized-crop aspect-ratio range.",
        rule=((lambda values, cfg: _range_ok(values, float("inf"))),
              "must be [lo, hi] with 0 < lo <= hi (width / height), e.g. [0.75, 1.333]")),
    Key("AUG.MIXUP", 0.8, "Mixup alpha (0 = off)."),
    Key("AUG.CUTMIX", 1.0, "CutMix alpha (0 = off)."),
    Key("AUG.MIXUP_PROB", 1.0, "Probability of mixing a batch."),
    Key("AUG.MIXUP_SWITCH_PROB", 0.5, "Probability of CutMix instead of mixup when both are on."),
    Key("AUG.MIXUP_MODE", "batch", "timm Mixup's mode: batch, pair or elem."),
    # --- Testing ----------------------------------------------------------------------------
    Key("TEST.CROP_PCT", 0.875, "Eval: resize the shorter side to IMG_SIZE / CROP_PCT, then center-crop IMG_SIZE "
        "(224 -> 256)."),
    Key("TEST.AMP", "train", 'Precision of validation and --eval: "train" (as TRAIN.AMP), "bf16", "fp16" or "none" '
        "(float32).", choices=("train", "bf16", "fp16", "none"), resume=_R),
    # --- Misc -------------------------------------------------------------------------------
    Key("OUTPUT", "output", "Root of the run directories (OUTPUT/MODEL.NAME/TAG).", resume=_N,
        flag=_flag("--output", "root of the run directories (OUTPUT)", type=str)),
    Key("TAG", "default", "Run name under OUTPUT/MODEL.NAME.", resume=_N,
        flag=_flag("--tag", "run name under OUTPUT/MODEL.NAME (TAG)", type=str)),
    Key("SAVE_FREQ", 1, "Checkpoint every SAVE_FREQ epochs.", rule=_at_least(1), resume=_R),
    Key("SAVE_STEPS", 0, "Save last.pth every SAVE_STEPS optimizer steps (0 = off).", rule=_at_least(0, " (0 = off)"),
        resume=_R),
    Key("SAVE_KEEP", 3, "Number of per-epoch checkpoints kept.", rule=_at_least(0), resume=_R),
    Key("PRINT_FREQ", 10, "Log a progress line every PRINT_FREQ optimizer steps.", rule=_at_least(1), resume=_R),
    Key("SEED", 0, "Seed of the weights, the data order and the augmentation."),
    Key("EVAL_MODE", False, "Evaluate and exit.", resume=_N,
        flag=_flag("--eval", "evaluate and exit", action="store_const", const=True)),
    Key("THROUGHPUT_MODE", False, "Measure inference and training images/s and exit.", resume=_N,
        flag=_flag("--throughput", "measure inference and training images/s and exit", action="store_const",
                   const=True)),
    Key("THROUGHPUT.WARMUP_ITERS", 10, "--throughput: untimed iterations first.", rule=_at_least(0), resume=_R),
    Key("THROUGHPUT.ITERS", 30, "--throughput: timed iterations.", rule=_at_least(1), resume=_R),
)
_KEY_BY_NAME: Dict[str, Key] = {key.name: key for key in KEYS}


def _build_defaults() -> CN:
    root = CN()
    for key in KEYS:
        node = root
        *sections, leaf = key.name.split(".")
        for section in sections:
            if section not in node:
                node[section] = CN()
            node = node[section]
        node[leaf] = copy.deepcopy(key.default)
    return root


_C = _build_defaults()


def keys_on_resume(meaning: OnResume) -> Tuple[str, ...]:
    """The keys whose change on resume means ``meaning``."""
    return tuple(key.name for key in KEYS if key.resume is meaning)


def registered_models() -> List[str]:
    """The CrossFormer variants in timm's registry.

    Imports ``models`` (which registers them) here, not with this module: the command line's
    parser and ``--help`` need neither torch nor timm.
    """
    import timm

    import models  # noqa: F401 - registers the variants

    return timm.list_models(module="crossformer")


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


def validate(cfg: CN) -> None:
    """Check every key's allowed values and value rule, then the rules between keys.

    Rules that need more than the config (the dataset's class count, the world size) are checked
    where that is known: ``data/build.py``, ``data/folder.py``.

    Args:
        cfg: A fully merged config.

    Raises:
        ConfigError: naming the key, the rule and a fix.
    """
    for key in KEYS:
        value = _get(cfg, key.name)
        if key.choices and value not in key.choices:
            close = difflib.get_close_matches(str(value), key.choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key.name}={value!r} is not supported{hint}; use one of {', '.join(key.choices)}")
        if key.rule is not None and not key.rule[0](value, cfg):
            raise ConfigError(f"{key.name}={value!r} {key.rule[1].format(cfg=cfg)}; change it in the YAML or with "
                              f"--opts {key.name} VALUE")
    if cfg.DATA.DATA_PATH and cfg.DATA.DATASET != "imagenet":
        raise ConfigError(f"DATA.DATA_PATH={cfg.DATA.DATA_PATH!r} was given but DATA.DATASET={cfg.DATA.DATASET!r} "
                          "reads no folder; add --opts DATA.DATASET imagenet to train on the folder, or drop "
                          "--data-path")
    if cfg.DATA.FORMAT != "folder" and cfg.DATA.DATASET != "imagenet":
        raise ConfigError(f"DATA.FORMAT={cfg.DATA.FORMAT!r} reads DATA_PATH but DATA.DATASET={cfg.DATA.DATASET!r} "
                          "reads none; add --opts DATA.DATASET imagenet and --data-path PATH, or drop DATA.FORMAT")
    if (cfg.DATA.VAL_LAYOUT != "names" or cfg.DATA.REAL_LABELS) and (cfg.DATA.DATASET, cfg.DATA.FORMAT) != (
            "imagenet", "folder"):
        raise ConfigError(f"DATA.VAL_LAYOUT={cfg.DATA.VAL_LAYOUT!r} / DATA.REAL_LABELS={cfg.DATA.REAL_LABELS!r} "
                          "apply to an image folder (DATA.DATASET imagenet, DATA.FORMAT folder); drop them or "
                          "evaluate a folder")
    thresh, smoothing = cfg.TRAIN.BCE_TARGET_THRESH, cfg.MODEL.LABEL_SMOOTHING
    # A smoothed target is never below this floor (timm's off value; multi-label labels move towards 0.5).
    floor = smoothing * 0.5 if cfg.DATA.FORMAT == "multilabel" else smoothing / cfg.MODEL.NUM_CLASSES
    if thresh is not None and smoothing > 0 and floor > thresh:
        raise ConfigError(f"TRAIN.BCE_TARGET_THRESH={thresh!r} is below {floor:g}, the smallest target that "
                          f"MODEL.LABEL_SMOOTHING={smoothing!r} leaves: every target would become 1; raise the "
                          "threshold, or set MODEL.LABEL_SMOOTHING 0 (DeiT III's threshold 0.0 has no smoothing)")
    if cfg.MODEL.RESUME and cfg.MODEL.PRETRAINED:
        raise ConfigError("--resume and --pretrained were both given: --resume restores the whole training "
                          "state (weights included), --pretrained only initialises the weights; pass one")
    names = registered_models()
    if cfg.MODEL.NAME not in names:
        close = difflib.get_close_matches(cfg.MODEL.NAME, names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"MODEL.NAME={cfg.MODEL.NAME!r} is not a registered model{hint}; "
                          f"use one of {', '.join(names)}")


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
        example: A value of the key's type (its current value, or its declared ``example``).
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
    declared = _KEY_BY_NAME.get(key)
    return declared.example if declared is not None and declared.none_allowed else node


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
    restore_default = _KEY_BY_NAME[key].none_allowed and value in (None, "null")
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
    # A run's config.yaml holds the values of its own total batch: only a run that trains is told of a change.
    trains = not (cfg.EVAL_MODE or cfg.THROUGHPUT_MODE)
    for entered, scaled in (("BASE_LR", "SCALED_BASE_LR"), ("WARMUP_LR", "SCALED_WARMUP_LR"),
                            ("MIN_LR", "SCALED_MIN_LR")):
        value = cfg.TRAIN[entered] * factor
        given = cfg.TRAIN[scaled]
        if trains and given and abs(given - value) > 1e-12 * max(abs(value), 1.0):
            logger.warning("TRAIN.%s=%g is derived from TRAIN.%s and the total batch %d; using %g instead",
                           scaled, given, entered, total_batch, value)
        cfg.TRAIN[scaled] = value


# Each optimizer's own betas and epsilon (torch.optim.AdamW, timm.optim.Lamb / Lion), for TRAIN.OPTIMIZER.BETAS /
# EPS left null; sgd reads neither. Filled into the config, not left to the class, so that config.yaml and the
# resume comparison see the values that run. tests/test_optim.py checks them against the classes' signatures.
OPTIMIZER_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "adamw": {"BETAS": (0.9, 0.999), "EPS": 1e-8},
    "lamb": {"BETAS": (0.9, 0.999), "EPS": 1e-6},
    "lion": {"BETAS": (0.9, 0.99)},
    "sgd": {},
}


def fill_optimizer_defaults(cfg: CN) -> None:
    """Set ``TRAIN.OPTIMIZER.BETAS`` / ``EPS`` left None to the chosen optimizer's own default.

    Args:
        cfg: A mutable, validated config.
    """
    section = cfg.TRAIN.OPTIMIZER
    for name, value in OPTIMIZER_DEFAULTS[section.NAME].items():
        if section[name] is None:
            section[name] = value


def adopt_pretrained_architecture(cfg: CN) -> None:
    """``--pretrained`` of a file that stores its training config: the model is the file's.

    The architecture (``MODEL.NAME`` and ``MODEL.CROSSFORMER.*``) comes from the file, the recipe
    from the config, so a checkpoint or export of any width fine-tunes with the config of its
    variant; ``config.yaml`` and the run's checkpoints record the widths built. A config that names
    another variant, or sets a width the file contradicts, is one error naming both.

    Args:
        cfg: A mutable, validated config.
    """
    path = cfg.MODEL.PRETRAINED
    if not path or not os.path.exists(path):
        return  # no file: loading it reports that
    from models.stored import ARCH_KEYS, read_stored_info, stored_architecture

    try:
        stored, _ = read_stored_info(path)
    except (OSError, ValueError):
        return  # unreadable: loading it reports why
    if not stored:
        return  # an official release or a bare state dict: the config describes the model
    name, stored_args = stored_architecture(stored)
    widths = cfg.MODEL.CROSSFORMER
    file_keys = {ARCH_KEYS[arg]: value for arg, value in stored_args.items()}
    described = f"{name} ({', '.join(f'{key} {value}' for key, value in file_keys.items()) or 'its own widths'})"
    if name != cfg.MODEL.NAME:
        raise ConfigError(f"--pretrained {path} holds a {described}, but MODEL.NAME={cfg.MODEL.NAME!r}; add --opts "
                          f"MODEL.NAME {name} (the widths come from the file), or pass weights of a {cfg.MODEL.NAME}")
    for key in ARCH_KEYS.values():
        value = widths[key]
        if value is not None and _as_list(value) != _as_list(file_keys.get(key)):
            raise ConfigError(f"--pretrained {path} holds a {described}, but MODEL.CROSSFORMER.{key}={value!r}; drop "
                              f"MODEL.CROSSFORMER.{key} from the config (the file's architecture is built), or pass "
                              "weights of that architecture")
    for key, value in file_keys.items():
        widths[key] = value
    if file_keys:
        logger.info("the model is the architecture of --pretrained %s: %s", path, described)


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


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
    flags = dict(flags or {})
    # A typed --resume replaces the --pretrained file of the YAML (a run's config.yaml records the weights it started
    # from), and a typed --pretrained the YAML's --resume: the weights named on the command line are the ones loaded.
    for typed, stored in (("MODEL.RESUME", "MODEL.PRETRAINED"), ("MODEL.PRETRAINED", "MODEL.RESUME")):
        if flags.get(typed) and stored not in flags:
            flags[stored] = ""
    for key, value in flags.items():
        _set(cfg, key, value, f"the command-line flag for {key}")
    validate(cfg)
    adopt_pretrained_architecture(cfg)
    scale_learning_rates(cfg, world_size)
    fill_optimizer_defaults(cfg)
    cfg.freeze()
    return cfg


def _flag_dest(key: Key) -> str:
    """The argparse attribute of ``key``'s flag: ``--batch-size`` -> ``batch_size``."""
    return key.flag[0].lstrip("-").replace("-", "_")


def build_arg_parser() -> argparse.ArgumentParser:
    """The command line of ``main.py`` (Swin-compatible flag names)."""
    parser = argparse.ArgumentParser(
        "CrossFormer training and evaluation", allow_abbrev=False,
        description="Precedence: config.py defaults < --cfg YAML (BASE first) < --opts < the named flags given.")
    parser.add_argument("--cfg", required=True, metavar="FILE", help="YAML config file")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                        help="override config keys, e.g. --opts TRAIN.EPOCHS 10 DATA.IMG_SIZE 64")
    # Every named flag defaults to None: one the user does not type changes nothing.
    for key in KEYS:
        if key.flag is not None:
            name, kwargs = key.flag
            parser.add_argument(name, dest=_flag_dest(key), **kwargs)
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
    flags = {key.name: getattr(args, _flag_dest(key)) for key in KEYS
             if key.flag is not None and getattr(args, _flag_dest(key)) is not None}
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


def dump_config(cfg: CN, path: str, header: Sequence[str] = ()) -> None:
    """Write the resolved config as YAML that ``--cfg`` accepts again.

    ``TRAIN.RESUME_CHANGED`` is written as false: it is one command's switch, and a later command
    started from the file must not inherit it.

    Args:
        cfg: The config.
        path: Output file.
        header: Lines written first as YAML comments (e.g. the run's history of changed settings).
    """
    from utils.file_io import atomic_write_text

    plain = config_to_dict(cfg)
    plain["TRAIN"]["RESUME_CHANGED"] = False
    comments = "".join(f"# {line}\n" for line in header)
    atomic_write_text(comments + yaml.safe_dump(plain, sort_keys=True), path)
