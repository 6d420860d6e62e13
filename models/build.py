"""The model a config describes, and its initialisation from a file of weights (``--pretrained``)."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Sequence

from torch import nn
from yacs.config import CfgNode

from utils.checkpoint import ema_weights
from utils.file_io import load_file

from .crossformer import checkpoint_filter_fn
from .stored import ARCH_KEYS, read_stored_info
from .registry import create_model

logger = logging.getLogger(__name__)


def build_model(config: CfgNode) -> nn.Module:
    """The configured variant with the ``MODEL.CROSSFORMER`` overrides (None keeps the variant's value).

    Args:
        config: Reads ``MODEL.*`` and ``TRAIN.USE_CHECKPOINT``.
    """
    arch = config.MODEL.CROSSFORMER
    overrides = {name: arch[key] for name, key in ARCH_KEYS.items() if arch[key] is not None}
    return create_model(config.MODEL.NAME, num_classes=config.MODEL.NUM_CLASSES,
                        drop_rate=config.MODEL.DROP_RATE, drop_path_rate=config.MODEL.DROP_PATH_RATE,
                        use_checkpoint=config.TRAIN.USE_CHECKPOINT, **overrides)


def load_pretrained(model: nn.Module, path: str, weights: str = "model") -> Optional[Dict[str, Any]]:
    """Initialise ``model`` from one of our checkpoints, an official one or a bare state dict.

    The file's format (``model`` / ``state_dict`` / bare, DDP's ``module.`` prefix, a head of
    another number of classes, which keeps its fresh initialisation) is
    :func:`~models.crossformer.checkpoint_filter_fn`'s business; any other shape mismatch is an error.

    Args:
        model: The unwrapped model.
        path: Checkpoint file, exported weights or a Hub folder.
        weights: ``"model"`` or ``"ema"`` (the EMA weights a training checkpoint of ours holds).

    Returns:
        The config the file was trained with (a training checkpoint of ours), else None.
    """
    # A Hub folder (deploy.export --format hf) holds its weights in timm's file name.
    checkpoint = load_file(os.path.join(path, "model.safetensors") if os.path.isdir(path) else path)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict; pass a checkpoint "
                         "of this framework or an official CrossFormer release")
    if weights == "ema":
        ema = ema_weights(checkpoint)
        if ema is None:
            raise ValueError(f"{path} holds no EMA weights (it was not trained with TRAIN.EMA.ENABLE True, or is "
                             "not a training checkpoint of this framework); drop --use-ema to load its weights")
        checkpoint = {"model": ema, "config": checkpoint.get("config")}
    try:
        state = checkpoint_filter_fn(checkpoint, model)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    own = model.state_dict()
    for key, value in state.items():
        if key in own and value.shape != own[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)} but the model expects "
                             f"{tuple(own[key].shape)}; check MODEL.NAME and MODEL.CROSSFORMER.*")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing:
        logger.warning("%s: %d model tensors were not in the checkpoint and keep their initialisation: %s",
                       path, len(missing), ", ".join(missing[:10]))
    if result.unexpected_keys:
        logger.warning("%s: %d checkpoint tensors are not used by the model: %s", path,
                       len(result.unexpected_keys), ", ".join(result.unexpected_keys[:10]))
    logger.info("loaded the %s of %s", "EMA weights" if weights == "ema" else "weights", path)
    saved = checkpoint.get("config")
    return saved if isinstance(saved, dict) else None


def keep_head_for_classes(model: nn.Module, path: str, class_names: Optional[Sequence[str]]) -> bool:
    """Keep the head ``load_pretrained`` took from ``path`` only if it predicts the data's classes.

    A head of another class count is already fresh; one of the same count is replaced by a fresh
    one (with a WARNING naming the first class that differs) when both the file and the data name
    their classes and the names differ, e.g. the toy shapes' head on ten flower species.

    Args:
        model: The model ``load_pretrained`` initialised from ``path``.
        path: The ``--pretrained`` file.
        class_names: The data's class names in label order, or None (generated data).

    Returns:
        Whether the model's head is the file's.
    """
    stored = read_stored_info(path)[1]
    if not stored or model.num_classes != len(stored):
        return False
    if not class_names or list(stored) == list(class_names):
        return True
    index = next(i for i, (a, b) in enumerate(zip(stored, class_names)) if a != b)
    logger.warning("the classifier head of %s is replaced by a fresh one: it predicts other classes than the data's "
                   "(class %d is %r in the file, %r in the data)", path, index, stored[index], class_names[index])
    model.reset_classifier(model.num_classes)
    return False
