"""The model a config describes."""
from __future__ import annotations

from torch import nn
from yacs.config import CfgNode

from .registry import create_model


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
