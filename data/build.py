"""``build_loader`` / ``build_mixup``: the one entry point the training engine uses."""
from __future__ import annotations

import logging
import os
from typing import Optional, Tuple

import torch
from timm.data import Mixup
from yacs.config import CfgNode

from utils.distributed import rank_and_world_size

from .common import EpochBatchSampler
from .loader import Loaders
from .synthetic import SyntheticLoader

logger = logging.getLogger(__name__)

MAX_AUTO_WORKERS = 8  # the automatic DATA.NUM_WORKERS: more workers than this rarely help one GPU


def build_loader(config: CfgNode, device: torch.device, rank: Optional[int] = None,
                 world_size: Optional[int] = None) -> Loaders:
    """Build the train and validation loaders described by ``config``.

    Args:
        config: The run's validated config (``DATA``, ``AUG``, ``TEST``, ``MODEL.NUM_CLASSES``, ``SEED``).
        device: Where batches are delivered (CPU or a CUDA device).
        rank: Override of the rank (default: torch.distributed, else 0).
        world_size: Override of the number of processes (default: torch.distributed, else 1).

    Returns:
        ``Loaders(train, val, num_classes)``; both yield ``(images, labels)`` on ``device``: ``(B,)`` int64
        labels, or ``(B, C)`` float32 multi-hot targets for ``DATA.FORMAT multilabel``.
    """
    rank, world_size = _rank_and_world_size(rank, world_size)
    device = torch.device(device)
    if config.DATA.DATASET == "synthetic":
        return _build_synthetic(config, device, rank, world_size)

    from .folder import FileListCache, default_cache_dir, resolve_dataset_root, scan_image_folder

    root = resolve_dataset_root(config)
    if config.DATA.FORMAT == "shards":
        from .shards import ShardBatchSampler, open_shard_splits

        train_set, val_set = open_shard_splits(root, config.MODEL.NUM_CLASSES)

        def sampler(split, train):
            return ShardBatchSampler(len(split), config.DATA.BATCH_SIZE, config.SEED, rank, world_size, train=train,
                                     repeats=config.DATA.REPEATED_AUG if train else 1,
                                     shard_sizes=tuple(split.shard_sizes), buffer=config.DATA.SHUFFLE_BUFFER)
    elif config.DATA.FORMAT == "multilabel":
        from .multilabel import open_multilabel_splits

        train_set, val_set = open_multilabel_splits(root, config.MODEL.NUM_CLASSES)

        def sampler(split, train):
            return EpochBatchSampler(len(split), config.DATA.BATCH_SIZE, config.SEED, rank, world_size, train=train)
    else:
        cache = FileListCache(default_cache_dir()) if config.DATA.FILE_LIST_CACHE else None
        if config.DATA.VAL_LAYOUT == "indices":  # ImageNet-V2: val's class folders are named by index
            from .testsets import scan_with_index_val

            train_set, val_set = scan_with_index_val(root, config.MODEL.NUM_CLASSES, cache)
        else:
            train_set, val_set = scan_image_folder(root, config.MODEL.NUM_CLASSES, cache)

        def sampler(split, train):
            return EpochBatchSampler(len(split), config.DATA.BATCH_SIZE, config.SEED, rank, world_size, train=train,
                                     repeats=config.DATA.REPEATED_AUG if train else 1)
    workers = num_workers(config)
    if config.DATA.LOADER == "pytorch":
        from .torch_loader import make_torch_loader

        def make(split, sampler):
            return make_torch_loader(config, split, sampler, device, workers)
    else:  # "dali"
        from .dali_loader import DaliLoader

        def make(split, sampler):
            return DaliLoader(config, split, sampler, device, workers)
    train, val = (make(split, sampler(split, is_train)) for split, is_train in ((train_set, True), (val_set, False)))
    return Loaders(train=train, val=val, num_classes=len(train_set.classes), val_split=val_set)


def num_workers(config: CfgNode) -> int:
    """``DATA.NUM_WORKERS``, or when it is None the CPU cores of this process per process on the node
    (``LOCAL_WORLD_SIZE``), at least 1 and at most 8; logged either way.

    Args:
        config: Reads ``DATA.NUM_WORKERS`` and ``DATA.LOADER``.
    """
    what = "DataLoader worker processes" if config.DATA.LOADER == "pytorch" else "DALI CPU threads"
    if config.DATA.NUM_WORKERS is not None:
        logger.info("%d %s per process (DATA.NUM_WORKERS)", config.DATA.NUM_WORKERS, what)
        return config.DATA.NUM_WORKERS
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    chosen = min(MAX_AUTO_WORKERS, max(1, cores // local_processes))
    logger.info("%d %s per process: %d CPU cores / %d process(es) on this node, at most %d (DATA.NUM_WORKERS "
                "null; set a number to override)", chosen, what, cores, local_processes, MAX_AUTO_WORKERS)
    return chosen


def _rank_and_world_size(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
    """``utils.distributed.rank_and_world_size()`` with each value overridable (tests simulate ranks this way)."""
    default_rank, default_world_size = rank_and_world_size()
    rank = default_rank if rank is None else rank
    world_size = default_world_size if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world size {world_size} is invalid: need 0 <= rank < world_size; "
                         "check the launcher's RANK and WORLD_SIZE")
    return rank, world_size


def _build_synthetic(config: CfgNode, device: torch.device, rank: int, world_size: int) -> Loaders:
    """Random tensors on ``device``; ``DATA.LOADER`` does not apply."""
    sizes = {True: config.DATA.SYNTHETIC_TRAIN_SIZE, False: config.DATA.SYNTHETIC_VAL_SIZE}
    if sizes[True] // world_size < config.DATA.BATCH_SIZE:
        raise ValueError(
            f"{sizes[True]} synthetic training samples give no full batch of {config.DATA.BATCH_SIZE} on each "
            f"of {world_size} process(es); raise DATA.SYNTHETIC_TRAIN_SIZE or lower DATA.BATCH_SIZE")
    train, val = (SyntheticLoader(EpochBatchSampler(sizes[is_train], config.DATA.BATCH_SIZE, config.SEED, rank,
                                                    world_size, train=is_train),
                                  config.DATA.IMG_SIZE, config.MODEL.NUM_CLASSES, device) for is_train in (True, False))
    logger.info("synthetic data: %d train batches, %d val batches per epoch on rank %d",
                len(train), len(val), rank)
    return Loaders(train=train, val=val, num_classes=config.MODEL.NUM_CLASSES)


def build_mixup(config: CfgNode) -> Optional[Mixup]:
    """timm's ``Mixup`` (mixup/cutmix + label smoothing) for the batch on device, or None when both are off.

    Args:
        config: Reads ``AUG.MIXUP``, ``AUG.CUTMIX``, ``AUG.MIXUP_PROB``, ``AUG.MIXUP_SWITCH_PROB``,
            ``AUG.MIXUP_MODE``, ``MODEL.LABEL_SMOOTHING``, ``MODEL.NUM_CLASSES`` and ``DATA.FORMAT``.
    """
    aug = config.AUG
    if aug.MIXUP <= 0 and aug.CUTMIX <= 0:
        return None
    # Multi-hot targets (DATA.FORMAT multilabel) mix as lam * t + (1 - lam) * t.flip(0), each label
    # smoothed towards 0.5 first (timm's multi_label): one-hot smoothing would spread mass over classes.
    return Mixup(mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX, prob=aug.MIXUP_PROB,
                 switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=config.MODEL.NUM_CLASSES,
                 multi_label=config.DATA.FORMAT == "multilabel")
