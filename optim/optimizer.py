"""AdamW over two parameter groups: with and without weight decay."""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, Set

import torch
from torch import nn
from yacs.config import CfgNode

logger = logging.getLogger(__name__)


def _takes_no_decay(name: str, param: torch.Tensor, skip: Set[str]) -> bool:
    """1-D tensors (norms, biases, scales), any ``.bias``, and the model's own no-decay names."""
    return param.ndim <= 1 or name.endswith(".bias") or name in skip or any(name.endswith("." + s) for s in skip)


def param_groups(model: nn.Module, weight_decay: float, skip: Iterable[str] = ()) -> List[Dict[str, Any]]:
    """Split trainable parameters into a decayed and a non-decayed group.

    Args:
        model: The (unwrapped) model.
        weight_decay: Decay of the first group.
        skip: Extra parameter names without decay, e.g. ``model.no_weight_decay()``.
    """
    skip = set(skip)
    decay, no_decay, used = [], [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if _takes_no_decay(name, param, skip):
            no_decay.append(param)
            used.update(s for s in skip if name == s or name.endswith("." + s))
        else:
            decay.append(param)
    unmatched = skip - used
    if unmatched:
        logger.warning("no_weight_decay names that match no parameter: %s", ", ".join(sorted(unmatched)))
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(config: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW at ``TRAIN.SCALED_BASE_LR`` with betas / eps / weight decay from the config.

    Fused kernels on CUDA, the foreach implementation elsewhere.

    Args:
        config: Reads ``TRAIN.OPTIMIZER.BETAS`` / ``EPS``, ``TRAIN.WEIGHT_DECAY`` and ``TRAIN.SCALED_BASE_LR``;
            ``TRAIN.OPTIMIZER.NAME`` is ``adamw``, the one value ``config.validate()`` allows.
        model: The unwrapped model (not DDP), whose ``no_weight_decay()`` is honoured.
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups = param_groups(model, config.TRAIN.WEIGHT_DECAY, skip)
    on_cuda = next(model.parameters()).is_cuda
    optimizer = torch.optim.AdamW(
        groups,
        lr=config.TRAIN.SCALED_BASE_LR,
        betas=tuple(config.TRAIN.OPTIMIZER.BETAS),
        eps=config.TRAIN.OPTIMIZER.EPS,
        weight_decay=config.TRAIN.WEIGHT_DECAY,
        fused=True if on_cuda else None,
        foreach=None if on_cuda else True,
    )
    logger.info("AdamW: %d tensors with weight decay %g, %d without",
                len(groups[0]["params"]), config.TRAIN.WEIGHT_DECAY, len(groups[1]["params"]))
    return optimizer
