"""What a file this project writes carries besides its weights: the training config and the class names.

A training checkpoint stores them under ``config`` and ``class_names``; an exported ``.safetensors``
in its metadata; an exported ``.pth`` in its state dict's ``_metadata`` (:data:`METADATA_KEY`); a
Hub folder (``python -m deploy.export ... --format hf``) in its ``config.json`` (timm's
``label_names`` and :data:`HF_CONFIG_KEY`). The model's part of that config (the variant and its
``MODEL.CROSSFORMER.*`` widths) and the eval transform's part are read here, so that a model is
built with the architecture stored in its file and carries the file's input size and classes.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from utils.file_io import load_file

# The key of a .pth export's state-dict ``_metadata`` that holds the training config and class names
# (not a module name, so load_state_dict passes it to no module).
METADATA_KEY = "crossformer_export"
# The key of a Hub folder's config.json that holds the training config (timm reads the other keys).
HF_CONFIG_KEY = "crossformer_training_config"
# Constructor argument -> its MODEL.CROSSFORMER key: the widths a config may change (None keeps the variant's).
ARCH_KEYS = {"embed_dim": "EMBED_DIM", "depths": "DEPTHS", "num_heads": "NUM_HEADS", "group_size": "GROUP_SIZE",
             "crs_interval": "CRS_INTERVAL"}


def read_stored_info(path: str) -> Tuple[Optional[Dict[str, Any]], Optional[List[str]]]:
    """The training config and the class names a checkpoint, an exported file or a Hub folder carries.

    Args:
        path: A training checkpoint, a ``.pth`` / ``.safetensors`` file or a Hub folder from
            ``python -m deploy.export``, or any other weights file (which carries neither).

    Returns:
        ``(config as plain dicts or None, class names in label order or None)``.
    """
    if os.path.isdir(path):
        config_json = os.path.join(path, "config.json")
        if not os.path.isfile(config_json):
            raise FileNotFoundError(f"{path} is a folder without config.json; pass a weights file or a Hub folder "
                                    "written by python -m deploy.export --format hf")
        with open(config_json, encoding="utf-8") as f:
            hub = json.load(f)
        names = hub.get("label_names") or (hub.get("pretrained_cfg") or {}).get("label_names")
        return hub.get(HF_CONFIG_KEY) or None, list(names) if names else None
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file {path} does not exist; check the path")
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        config, names = (json.loads(metadata[k]) if metadata.get(k) else None for k in ("config", "class_names"))
        return config or None, names
    checkpoint = load_file(path, mmap=True)
    if not isinstance(checkpoint, dict):
        return None, None
    if "model" in checkpoint:  # a training checkpoint (or an official release: no names)
        config = checkpoint.get("config")
        return (config if isinstance(config, dict) and config else None), checkpoint.get("class_names")
    stored = (getattr(checkpoint, "_metadata", None) or {}).get(METADATA_KEY) or {}
    return stored.get("config") or None, stored.get("class_names")


def stored_architecture(config: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """``(MODEL.NAME, the constructor arguments its MODEL.CROSSFORMER.* set)`` of a stored config.

    Args:
        config: A training config as plain dicts (from :func:`read_stored_info`).
    """
    model = config.get("MODEL") or {}
    widths = model.get("CROSSFORMER") or {}
    overrides = {arg: list(widths[key]) if isinstance(widths[key], (list, tuple)) else widths[key]
                 for arg, key in ARCH_KEYS.items() if widths.get(key) is not None}
    return str(model.get("NAME", "")), overrides


def stored_data_config(config: Dict[str, Any], class_names: Optional[List[str]]) -> Dict[str, Any]:
    """timm's ``pretrained_cfg`` entries for a stored config: classes, input size and eval transform.

    Our loaders normalise with ImageNet's mean / std and evaluate at ``DATA.IMG_SIZE`` after a
    resize to ``IMG_SIZE / TEST.CROP_PCT`` with ``DATA.INTERPOLATION``: timm's center crop.

    Args:
        config: A training config as plain dicts.
        class_names: The file's class names in label order, or None.
    """
    data, test, model = config.get("DATA") or {}, config.get("TEST") or {}, config.get("MODEL") or {}
    size = int(data.get("IMG_SIZE", 224))
    cfg: Dict[str, Any] = {
        "num_classes": int(model.get("NUM_CLASSES", 1000)), "input_size": (3, size, size),
        "crop_pct": float(test.get("CROP_PCT", 0.875)), "crop_mode": "center",
        "interpolation": str(data.get("INTERPOLATION", "bicubic")),
        "mean": tuple(IMAGENET_DEFAULT_MEAN), "std": tuple(IMAGENET_DEFAULT_STD), "pool_size": None,
    }
    if class_names and len(class_names) == cfg["num_classes"]:
        cfg["label_names"] = tuple(class_names)
    return cfg
