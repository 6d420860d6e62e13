"""The model a config describes."""
from __future__ import annotations

from torch import nn
from yacs.config import CfgNode

from .registry import create_model


def build_model(config: CfgNode) -> nn.Module:
    """The configured variant with the ``MODEL.CROSSFORMER`` overrides (0 / [] keep the variant's).

    Args:
        config: Reads ``MODEL.*`` and ``TRAIN.USE_CHECKPOINT``.
    """
    arch = config.MODEL.CROSSFORMER
    given = {"embed_dim": arch.EMBED_DIM, "depths": list(arch.DEPTHS), "num_heads": list(arch.NUM_HEADS),
             "group_size": list(arch.GROUP_SIZE), "crs_interval": list(arch.CRS_INTERVAL)}
    overrides = {name: value for name, value in given.items() if value}  # 0 / [] keep the variant's value
    return create_model(config.MODEL.NAME, num_classes=config.MODEL.NUM_CLASSES,
                               drop_rate=config.MODEL.DROP_RATE, drop_path_rate=config.MODEL.DROP_PATH_RATE,
                               use_checkpoint=config.TRAIN.USE_CHECKPOINT, **overrides)
