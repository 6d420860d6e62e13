"""``build_loader`` / ``build_mixup``: the one entry point the training engine uses."""
from __future__ import annotations

import logging
from typing import Optional

import torch
from timm.data import Mixup
from yacs.config import CfgNode

from .common import EpochBatchSampler, Loaders, dist_info
from .synthetic import SyntheticLoader

logger = logging.getLogger(__name__)


def build_loader(config: CfgNode, device: torch.device, rank: Optional[int] = None,
                 world_size: Optional[int] = None) -> Loaders:
    """Build the train and validation loaders described by ``config``.

    Args:
        config: The run's validated config (``DATA``, ``AUG``, ``TEST``, ``MODEL.NUM_CLASSES``, ``SEED``).
        device: Where batches are delivered (CPU or a CUDA device).
        rank: Override of the rank (default: torch.distributed, else 0).
        world_size: Override of the number of processes (default: torch.distributed, else 1).

    Returns:
        ``Loaders(train, val, num_classes)``; both yield ``(images, labels)`` on ``device``.
    """
    rank, world_size = dist_info(rank, world_size)
    device = torch.device(device)
    if config.DATA.DATASET == "synthetic":
        return _build_synthetic(config, device, rank, world_size)

    from .folder import resolve_dataset_root, scan_image_folder

    root = resolve_dataset_root(config)
    train_set, val_set = scan_image_folder(root, config.MODEL.NUM_CLASSES)
    if config.DATA.LOADER == "pytorch":
        from .torch_loader import make_torch_loader

        def make(split, sampler):
            return make_torch_loader(config, split, sampler, device)
    else:  # "dali"
        from .dali_loader import DaliLoader

        def make(split, sampler):
            return DaliLoader(config, split, sampler, device, rank)
    train, val = (make(split, EpochBatchSampler(len(split), config.DATA.BATCH_SIZE, config.SEED, rank, world_size,
                                                train=is_train))
                  for split, is_train in ((train_set, True), (val_set, False)))
    return Loaders(train=train, val=val, num_classes=len(train_set.classes))


def _build_synthetic(config: CfgNode, device: torch.device, rank: int, world_size: int) -> Loaders:
    """Random tensors on ``device``; ``DATA.LOADER`` does not apply."""
    common = dict(batch_size=config.DATA.BATCH_SIZE, img_size=config.DATA.IMG_SIZE,
                  num_classes=config.MODEL.NUM_CLASSES, seed=config.SEED, rank=rank,
                  world_size=world_size, device=device)
    train = SyntheticLoader(config.DATA.SYNTHETIC_TRAIN_SIZE, train=True, **common)
    val = SyntheticLoader(config.DATA.SYNTHETIC_VAL_SIZE, train=False, **common)
    logger.info("synthetic data: %d train batches, %d val batches per epoch on rank %d",
                len(train), len(val), rank)
    return Loaders(train=train, val=val, num_classes=config.MODEL.NUM_CLASSES)


def build_mixup(config: CfgNode) -> Optional[Mixup]:
    """timm's ``Mixup`` (mixup/cutmix + label smoothing) for the batch on device, or None when both are off.

    Args:
        config: Reads ``AUG.MIXUP``, ``AUG.CUTMIX``, ``AUG.MIXUP_PROB``, ``AUG.MIXUP_SWITCH_PROB``,
            ``AUG.MIXUP_MODE``, ``MODEL.LABEL_SMOOTHING`` and ``MODEL.NUM_CLASSES``.
    """
    aug = config.AUG
    if aug.MIXUP <= 0 and aug.CUTMIX <= 0:
        return None
    return Mixup(mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX, prob=aug.MIXUP_PROB,
                 switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=config.MODEL.NUM_CLASSES)
