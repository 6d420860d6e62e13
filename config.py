"""Configuration: yacs defaults reproducing the CrossFormer / CrossFormer++ ImageNet recipe.

Precedence (lowest to highest): these defaults < YAML file (with ``BASE`` inheritance)
< ``--opts KEY VALUE ...`` < named command-line flags that the user actually typed.
"""
from yacs.config import CfgNode as CN

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
_C.DATA.IMG_SIZE = 224
# Interpolation for random-resized-crop and eval resize: "bicubic", "bilinear".
_C.DATA.INTERPOLATION = "bicubic"
_C.DATA.PIN_MEMORY = True
_C.DATA.NUM_WORKERS = 8
# Where the toy dataset is generated on first use ("" = ~/.cache/crossformer/toy).
_C.DATA.TOY_ROOT = ""

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
# Architecture overrides for custom (e.g. tiny) models; 0 / [] keep the variant's value.
_C.MODEL.CROSSFORMER = CN()
_C.MODEL.CROSSFORMER.EMBED_DIM = 0
_C.MODEL.CROSSFORMER.DEPTHS = []
_C.MODEL.CROSSFORMER.NUM_HEADS = []
_C.MODEL.CROSSFORMER.GROUP_SIZE = []
_C.MODEL.CROSSFORMER.CRS_INTERVAL = []

# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------
_C.TRAIN = CN()
_C.TRAIN.EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.WEIGHT_DECAY = 0.05
# Learning rates are given for a total batch of 512 and scaled linearly.
_C.TRAIN.BASE_LR = 5e-4
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 5e-6
_C.TRAIN.CLIP_GRAD = 5.0
_C.TRAIN.AUTO_RESUME = True
_C.TRAIN.ACCUMULATION_STEPS = 1
_C.TRAIN.USE_CHECKPOINT = False
# "bf16", "fp16" or "none".
_C.TRAIN.AMP = "bf16"
_C.TRAIN.COMPILE = False

_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = "adamw"
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)

_C.TRAIN.EMA = CN()
_C.TRAIN.EMA.ENABLE = False
_C.TRAIN.EMA.DECAY = 0.9998

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
_C.PRINT_FREQ = 10
_C.SEED = 0
