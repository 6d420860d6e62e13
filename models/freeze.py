"""``TRAIN.FREEZE``: which parameters of a model do not train (a partial fine-tune, a linear probe).

A frozen module is a fixed feature extractor: its parameters take no gradient (so the optimizer,
built afterwards from the parameters that require one, holds neither state nor weight decay for
them), its BatchNorm layers become timm's ``FrozenBatchNorm2d`` (fixed running statistics; the
CrossFormers have LayerNorms only, whose affine parameters are simply frozen), and it stays in
eval mode when the model is put in training mode, so it applies no drop path or dropout.
"""
from __future__ import annotations

import logging
import types
from typing import Any, Dict, List

from timm.utils.model import freeze as timm_freeze
from torch import nn

logger = logging.getLogger(__name__)

# The stem: the patch embedding and the dropout on its output (frozen with the first stage).
STEM = ("patch_embed", "pos_drop")


def frozen_module_names(model: nn.Module, spec: str) -> List[str]:
    """The top-level modules that ``spec`` freezes, in the model's order.

    Args:
        model: A CrossFormer (``patch_embed``, ``pos_drop``, ``layers``, ``norm``, ``head``).
        spec: ``"none"``, ``"stages-K"`` (the stem and stages 1..K, each with its closing patch
            merge) or ``"all-but-head"`` (everything but ``get_classifier()``).
    """
    if spec == "none":
        return []
    if spec == "all-but-head":
        head = model.get_classifier()
        return [name for name, child in model.named_children() if child is not head]
    count = int(spec.split("-", 1)[1]) if spec.startswith("stages-") and spec[7:].isdigit() else 0
    if not 1 <= count <= len(model.layers):
        raise ValueError(f"TRAIN.FREEZE={spec!r} is not a freeze spec of this model; use none, stages-K with K in "
                         f"1..{len(model.layers)} or all-but-head")
    return [*STEM, *(f"layers.{i}" for i in range(count))]


def _train_frozen(self: nn.Module, mode: bool = True) -> nn.Module:
    """``nn.Module.train`` of a frozen module: eval mode whatever ``mode`` asks for.

    ``model.train()`` (every epoch, also through DDP and ``torch.compile``'s wrapper) reaches
    each child through its ``train`` method, so the frozen module and all below it stay in eval.
    """
    return nn.Module.train(self, False)


def summary(model: nn.Module, spec: str) -> Dict[str, Any]:
    """What is frozen, as a checkpoint records it: the spec, the frozen and trainable parameter
    counts and the frozen top-level modules.

    Args:
        model: The model, after :func:`freeze`.
        spec: The ``TRAIN.FREEZE`` value it was frozen with.
    """
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"spec": spec, "parameters": frozen, "trainable": trainable,
            "modules": frozen_module_names(model, spec)}


def freeze(model: nn.Module, spec: str) -> Dict[str, Any]:
    """Freeze the modules ``spec`` names (in place); returns :func:`summary`.

    Call it after pretrained weights are loaded and before the optimizer is built and the model
    is wrapped (DDP registers only the parameters that require a gradient).

    Args:
        model: The unwrapped model.
        spec: A validated ``TRAIN.FREEZE`` value.

    Raises:
        ValueError: when no parameter is left to train (e.g. ``all-but-head`` on a model without a head).
    """
    names = frozen_module_names(model, spec)
    if names:
        timm_freeze(model, names)  # requires_grad False; BatchNorm -> FrozenBatchNorm2d
        for name in names:
            module = model.get_submodule(name)
            module.train = types.MethodType(_train_frozen, module)
            module.train(model.training)
    described = summary(model, spec)
    if names and described["trainable"] == 0:
        raise ValueError(f"TRAIN.FREEZE={spec!r} leaves no parameter to train (the model's head has "
                         f"{getattr(model, 'num_classes', '?')} classes); set MODEL.NUM_CLASSES >= 1 or freeze less")
    if names:
        logger.info("TRAIN.FREEZE %s: %d parameters frozen (%s, in eval mode while training), %d trainable", spec,
                    described["parameters"], ", ".join(names), described["trainable"])
    return described
