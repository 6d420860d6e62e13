"""The training loss (``TRAIN.LOSS``): one module called as ``criterion(outputs, targets)``.

``build_criterion`` is the only place a loss is chosen. Its targets are what a training batch
carries after mixup: ``(B,)`` int64 labels when nothing mixes, ``(B, C)`` float targets from
timm's ``Mixup`` (already smoothed) or from a multi-label dataset (multi-hot, not smoothed).
Label smoothing is applied once: by ``Mixup`` when it runs, else by the loss.
"""
from __future__ import annotations

import torch
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from yacs.config import CfgNode


class SmoothedSoftTargetCrossEntropy(nn.Module):
    """Soft-target cross-entropy that turns ``(B,)`` labels into smoothed one-hot targets first.

    The one-hot targets are timm ``Mixup``'s (``1 - smoothing + smoothing / C`` on the label,
    ``smoothing / C`` elsewhere), so the loss of a batch does not depend on whether it was mixed.
    ``(B, C)`` targets are used as they are.

    Args:
        smoothing: Label smoothing in ``[0, 1)``.
    """

    def __init__(self, smoothing: float = 0.0) -> None:
        super().__init__()
        self.smoothing = smoothing
        self.soft_ce = SoftTargetCrossEntropy()

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.dim() == 1:
            num_classes = outputs.shape[-1]
            off = self.smoothing / num_classes
            targets = torch.full_like(outputs, off, dtype=torch.float32).scatter_(
                1, targets.long().view(-1, 1), 1.0 - self.smoothing + off)  # (B, C)
        return self.soft_ce(outputs, targets)


def build_criterion(config: CfgNode, mixup: bool) -> nn.Module:
    """The loss of ``TRAIN.LOSS``, for batches that are mixed (``mixup``) or not.

    * ``ce``: soft-target CE on mixed targets, else label-smoothed CE (plain CE without smoothing).
    * ``soft-ce``: soft-target CE always; unmixed labels become smoothed one-hot targets.
    * ``bce``: timm's ``BinaryCrossEntropy`` with ``TRAIN.BCE_TARGET_THRESH``. Unmixed labels become
      one-hot targets smoothed by timm's BCE convention; unmixed multi-hot targets move towards 0.5
      (``smooth_dense``, as ``Mixup`` smooths multi-label targets); mixed targets were smoothed by ``Mixup``.

    Args:
        config: Reads ``TRAIN.LOSS``, ``TRAIN.BCE_TARGET_THRESH`` and ``MODEL.LABEL_SMOOTHING``.
        mixup: Whether batches come mixed (and smoothed) by timm's ``Mixup``.
    """
    loss, smoothing = config.TRAIN.LOSS, config.MODEL.LABEL_SMOOTHING
    if loss == "bce":
        return BinaryCrossEntropy(smoothing=0.0 if mixup else smoothing,
                                  target_threshold=config.TRAIN.BCE_TARGET_THRESH, smooth_dense=not mixup)
    if mixup:
        return SoftTargetCrossEntropy()
    if loss == "soft-ce":
        return SmoothedSoftTargetCrossEntropy(smoothing)
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()

