"""Data pipelines: ``build_loader(config, device)`` and ``build_mixup(config)``.

Datasets (``DATA.DATASET``): ``imagenet`` (folder layout), ``toy`` (generated JPEGs),
``synthetic`` (random tensors on device). Loaders (``DATA.LOADER``): ``dali``, ``pytorch``.
"""
from .build import build_loader, build_mixup
from .loader import BatchLoader, Loaders

__all__ = ["build_loader", "build_mixup", "BatchLoader", "Loaders"]
