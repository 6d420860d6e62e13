"""The optimizer (AdamW, LAMB, Lion or SGD) over two parameter groups (with and without weight decay),
or per-depth groups with layer-wise LR decay (``TRAIN.LAYER_DECAY`` < 1, timm's
``param_groups_layer_decay``). Parameters that do not require a gradient (``TRAIN.FREEZE``) are in
no group."""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List

import torch
from timm.optim import Lamb, Lion, param_groups_layer_decay, param_groups_weight_decay
from torch import nn
from yacs.config import CfgNode

logger = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float, skip: Iterable[str] = ()) -> List[Dict[str, Any]]:
    """``[decay, no_decay]``: timm's split (no decay for 1-D tensors, ``.bias`` and ``skip``).

    Parameters that do not require a gradient are left out (timm skips them). timm returns the
    no-decay group first, leaves out empty groups and, for a decay of 0, does not split at all;
    checkpoints hold the optimizer state in this fixed two-group order, so the split is taken from
    timm and laid out here.

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


def build_param_groups(config: CfgNode, model: nn.Module) -> List[Dict[str, Any]]:
    """The optimizer's groups: per depth with ``lr_scale`` (``TRAIN.LAYER_DECAY`` < 1) or ``[decay, no_decay]``.

    Args:
        config: Reads ``TRAIN.LAYER_DECAY`` and ``TRAIN.WEIGHT_DECAY``.
        model: The unwrapped model, whose ``no_weight_decay()`` is honoured.
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    if config.TRAIN.LAYER_DECAY < 1:
        # Each group carries an ``lr_scale`` that timm's scheduler multiplies into its LR.
        return param_groups_layer_decay(model, config.TRAIN.WEIGHT_DECAY, no_weight_decay_list=list(skip),
                                        layer_decay=config.TRAIN.LAYER_DECAY)
    return param_groups(model, config.TRAIN.WEIGHT_DECAY, skip)


def optimizer_settings(config: CfgNode) -> Dict[str, Any]:
    """The hyperparameters of ``TRAIN.OPTIMIZER.NAME`` beyond LR and weight decay, as its class takes them.

    Args:
        config: Reads ``TRAIN.OPTIMIZER.*`` (``BETAS`` / ``EPS`` filled by ``config.load_config``; left None,
            the class's defaults apply, the same values).
    """
    name = config.TRAIN.OPTIMIZER.NAME
    if name == "sgd":
        return {"momentum": config.TRAIN.OPTIMIZER.MOMENTUM, "nesterov": config.TRAIN.OPTIMIZER.NESTEROV}
    # None (a config not made by load_config, e.g. get_defaults()): the class's own default.
    betas, eps = config.TRAIN.OPTIMIZER.BETAS, config.TRAIN.OPTIMIZER.EPS
    settings: Dict[str, Any] = {} if betas is None else {"betas": tuple(betas)}
    if name in ("adamw", "lamb") and eps is not None:
        settings["eps"] = eps
    return settings


def build_optimizer(config: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """``TRAIN.OPTIMIZER.NAME`` at ``TRAIN.SCALED_BASE_LR`` over :func:`build_param_groups`.

    Kernels: AdamW runs torch's fused kernel on CUDA and on a CPU (there a third of the foreach
    implementation's time on the demo's model, AVX2, one thread), foreach elsewhere; a fused
    optimizer skips a non-finite step on the device (``engine.step_if_finite``). SGD runs foreach,
    never fused: torch's fused SGD, given a skipped first step (``found_inf``, as fp16's GradScaler
    and ``step_if_finite`` pass it), leaves its momentum buffers uninitialised (``empty_like``) and
    the next step reads them. timm's Lamb and Lion run their foreach paths. The non-fused ones skip a
    non-finite step through the host flag. Lamb is built without its own gradient clipping
    (``max_grad_norm=None``): ``TRAIN.CLIP_GRAD`` already clipped the gradients it sees.

    Args:
        config: Reads ``TRAIN.OPTIMIZER.*``, ``TRAIN.WEIGHT_DECAY``, ``TRAIN.LAYER_DECAY`` and
            ``TRAIN.SCALED_BASE_LR``.
        model: The unwrapped model (not DDP); its parameters that require a gradient are optimized
            (``models.freeze`` has made sure there is one).
    """
    name = config.TRAIN.OPTIMIZER.NAME
    groups = build_param_groups(config, model)
    params = [p for group in groups for p in group["params"]]
    lr, weight_decay = config.TRAIN.SCALED_BASE_LR, config.TRAIN.WEIGHT_DECAY
    settings = optimizer_settings(config)
    if name == "adamw":
        fused = params[0].device.type in ("cuda", "cpu")
        kernel = {"fused": True} if fused else {"foreach": True}
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **settings,
                                                             **kernel)
    elif name == "sgd":
        kernel = {"foreach": True}
        optimizer = torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay, **settings, **kernel)
    elif name == "lamb":
        kernel = {"foreach": True}
        optimizer = Lamb(groups, lr=lr, weight_decay=weight_decay, max_grad_norm=None, **settings, **kernel)
    else:  # lion: config.validate() allows no other value
        kernel = {"foreach": True}
        optimizer = Lion(groups, lr=lr, weight_decay=weight_decay, **settings, **kernel)
    described = ", ".join(f"{key} {value}" for key, value in {**settings, **kernel}.items())
    trainable = sum(p.numel() for p in params)
    log = logger.debug if config.EVAL_MODE else logger.info  # --eval holds an optimizer it never steps
    if config.TRAIN.LAYER_DECAY < 1:
        scales = sorted({group["lr_scale"] for group in groups})
        log("%s (%s) with layer-wise LR decay %g: %d depths, LR scales %.3g .. %.3g, weight decay %g; "
                    "%d tensors (%d parameters)", name, described, config.TRAIN.LAYER_DECAY, len(scales), scales[0],
                    scales[-1], weight_decay, len(params), trainable)
    else:
        log("%s (%s): %d tensors with weight decay %g, %d without (%d parameters)", name, described,
                    len(groups[0]["params"]), weight_decay, len(groups[1]["params"]), trainable)
    return optimizer
