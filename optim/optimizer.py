"""AdamW over two parameter groups (with and without weight decay), or per-depth groups with
layer-wise LR decay (``TRAIN.LAYER_DECAY`` < 1, timm's ``param_groups_layer_decay``)."""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn
from yacs.config import CfgNode

logger = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float, skip: Iterable[str] = ()) -> List[Dict[str, Any]]:
    """``[decay, no_decay]``: timm's split (no decay for 1-D tensors, ``.bias`` and ``skip``).

    timm returns the no-decay group first, leaves out empty groups and, for a decay of 0, does
    not split at all; checkpoints hold the optimizer state in this fixed two-group order, so
    the split is taken from timm and laid out here.

    Args:
        model: The (unwrapped) model.
        weight_decay: Decay of the first group.
        skip: Full names of further parameters without decay, e.g. ``model.no_weight_decay()``.
    """
    split = param_groups_weight_decay(model, weight_decay=1.0, no_weight_decay_list=list(skip))
    params = {group["weight_decay"]: group["params"] for group in split}  # 1.0: decayed, 0.0: not
    return [
        {"params": params.get(1.0, []), "weight_decay": weight_decay},
        {"params": params.get(0.0, []), "weight_decay": 0.0},
    ]


def build_optimizer(config: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW at ``TRAIN.SCALED_BASE_LR`` with betas / eps / weight decay from the config.

    torch's fused kernel (one call for all parameters) on CUDA and on a CPU, where it takes a third of
    the foreach implementation's time on the demo's model (AVX2, one thread); foreach elsewhere.

    Args:
        config: Reads ``TRAIN.OPTIMIZER.BETAS`` / ``EPS``, ``TRAIN.WEIGHT_DECAY`` and ``TRAIN.SCALED_BASE_LR``;
            ``TRAIN.OPTIMIZER.NAME`` is ``adamw``, the one value ``config.validate()`` allows.
        model: The unwrapped model (not DDP), whose ``no_weight_decay()`` is honoured.
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    layer_decay = config.TRAIN.LAYER_DECAY
    if layer_decay < 1:
        # Each group carries an ``lr_scale`` that timm's scheduler multiplies into its LR.
        groups = param_groups_layer_decay(model, config.TRAIN.WEIGHT_DECAY, no_weight_decay_list=list(skip),
                                          layer_decay=layer_decay)
    else:
        groups = param_groups(model, config.TRAIN.WEIGHT_DECAY, skip)
    fused = next(model.parameters()).device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(
        groups,
        lr=config.TRAIN.SCALED_BASE_LR,
        betas=tuple(config.TRAIN.OPTIMIZER.BETAS),
        eps=config.TRAIN.OPTIMIZER.EPS,
        weight_decay=config.TRAIN.WEIGHT_DECAY,
        fused=True if fused else None,
        foreach=None if fused else True,
    )
    if layer_decay < 1:
        scales = sorted({group["lr_scale"] for group in groups})
        logger.info("AdamW with layer-wise LR decay %g: %d depths, LR scales %.3g .. %.3g, weight decay %g",
                    layer_decay, len(scales), scales[0], scales[-1], config.TRAIN.WEIGHT_DECAY)
    else:
        logger.info("AdamW: %d tensors with weight decay %g, %d without",
                    len(groups[0]["params"]), config.TRAIN.WEIGHT_DECAY, len(groups[1]["params"]))
    return optimizer
