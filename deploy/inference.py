"""A trained model ready to use: its weights, the config that describes it and its class names.

``predict`` and the ONNX export start here: the weights come from a training checkpoint
(``model`` or its EMA) or an exported weights file; the architecture and the eval transform from
``--cfg`` or, without it, from the config stored in the file; the class names from the file.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Sequence

from torch import nn
from yacs.config import CfgNode

logger = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """A model in eval mode with what it needs to be used.

    Args:
        model: The network, on the CPU, in eval mode.
        config: Its config (``MODEL.*``, and ``DATA.IMG_SIZE``, ``DATA.INTERPOLATION``,
            ``TEST.CROP_PCT`` for the eval transform).
        class_names: One name per output, in label order (the class index as text when the file
            stores none).
    """

    model: nn.Module
    config: CfgNode
    class_names: List[str]


def load_trained_model(weights_path: str, cfg_file: str = "", opts: Sequence[str] = (),
                       ema: bool = False) -> TrainedModel:
    """Build the model a file's weights belong to and load them.

    Args:
        weights_path: A training checkpoint, or weights from ``python -m deploy.export``.
        cfg_file: The config YAML; "" takes the config stored in the file.
        opts: ``--opts KEY VALUE`` pairs applied to ``cfg_file``.
        ema: Load the EMA weights of a training checkpoint.

    Raises:
        ValueError: no config given and none stored, or weights that do not fit the config.
    """
    from config import load_config
    from models import build_model, load_pretrained

    from models.stored import read_stored_info

    stored_config, class_names = read_stored_info(weights_path)
    if cfg_file:
        config = load_config(cfg_file, opts, {"EVAL_MODE": True})  # a model in use: it evaluates, never trains
    elif stored_config:
        if opts:
            raise ValueError("--opts changes the keys of --cfg; pass --cfg CONFIG with it (the run's config.yaml)")
        config = CfgNode(stored_config)  # as it was validated for the run that wrote it
    else:
        raise ValueError(f"{weights_path} stores no config (an official release, or weights exported by an older "
                         "version); pass --cfg CONFIG to describe the model")
    model = build_model(config)
    load_pretrained(model, weights_path, "ema" if ema else "model")
    model.eval()
    num_classes = config.MODEL.NUM_CLASSES
    if class_names is not None and len(class_names) != num_classes:
        logger.warning("%s names %d classes but the model has %d outputs: classes are named by their index",
                       weights_path, len(class_names), num_classes)
        class_names = None
    if class_names is None:
        class_names = [str(label) for label in range(num_classes)]
    return TrainedModel(model=model, config=config, class_names=list(class_names))


def eval_transform_description(config: CfgNode) -> str:
    """The eval transform of ``config`` in words (logged, and stored in the ONNX metadata)."""
    size = config.DATA.IMG_SIZE
    return (f"resize the shorter side to {int(size / config.TEST.CROP_PCT)} ({config.DATA.INTERPOLATION}), "
            f"center crop {size}x{size}, RGB, scale to 0..1, normalise with timm's ImageNet mean / std")

