"""Data pipelines: ``build_loader(config, device)`` and ``build_mixup(config)``.

Datasets (``DATA.DATASET``): ``imagenet`` (a folder, tar shards or multi-label folders with label
files, ``DATA.FORMAT``; each format opens its splits as an ``ImageSplit``, ``data/split.py``),
``toy`` (generated JPEGs), ``synthetic`` (random tensors on device). Loaders (``DATA.LOADER``): ``dali``, ``pytorch``.
"""
from .build import build_loader, build_mixup
from .loader import BatchLoader, Loaders

__all__ = ["build_loader", "build_mixup", "BatchLoader", "Loaders"]
