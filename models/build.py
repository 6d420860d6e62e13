"""The model a config describes, and its initialisation from a file of weights (``--pretrained``)."""
from __future__ import annotations

import logging

from torch import nn
from yacs.config import CfgNode

from utils.file_io import load_file

from .crossformer import checkpoint_filter_fn
from .registry import create_model

logger = logging.getLogger(__name__)


def build_model(config: CfgNode) -> nn.Module:
    """The configured variant with the ``MODEL.CROSSFORMER`` overrides (None keeps the variant's value).

    Args:
        config: Reads ``MODEL.*`` and ``TRAIN.USE_CHECKPOINT``.
    """
    arch = config.MODEL.CROSSFORMER
    given = {"embed_dim": arch.EMBED_DIM, "depths": arch.DEPTHS, "num_heads": arch.NUM_HEADS,
             "group_size": arch.GROUP_SIZE, "crs_interval": arch.CRS_INTERVAL}
    overrides = {name: value for name, value in given.items() if value is not None}
    return create_model(config.MODEL.NAME, num_classes=config.MODEL.NUM_CLASSES,
                        drop_rate=config.MODEL.DROP_RATE, drop_path_rate=config.MODEL.DROP_PATH_RATE,
                        use_checkpoint=config.TRAIN.USE_CHECKPOINT, **overrides)


def load_pretrained(model: nn.Module, path: str) -> None:
    """Initialise ``model`` from one of our checkpoints, an official one or a bare state dict.

    The file's format (``model`` / ``state_dict`` / bare, DDP's ``module.`` prefix, a head of
    another number of classes, which keeps its fresh initialisation) is
    :func:`~models.crossformer.checkpoint_filter_fn`'s business; any other shape mismatch is an error.

    Args:
        model: The unwrapped model.
        path: Checkpoint file.
    """
    checkpoint = load_file(path)
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
