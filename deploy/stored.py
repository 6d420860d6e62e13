"""What a file this project writes carries besides its weights: the training config and the class names.

A training checkpoint stores them under ``config`` and ``class_names``; an exported ``.safetensors``
in its metadata; an exported ``.pth`` in its state dict's ``_metadata`` (:data:`METADATA_KEY`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

from utils.file_io import load_file

# The key of a .pth export's state-dict ``_metadata`` that holds the training config and class names
# (not a module name, so load_state_dict passes it to no module).
METADATA_KEY = "crossformer_export"


def read_stored_info(path: str) -> Tuple[Optional[Dict[str, Any]], Optional[List[str]]]:
    """The training config and the class names a checkpoint or exported weights file carries.

    Args:
        path: A training checkpoint, or a ``.pth`` / ``.safetensors`` file from :func:`export_weights`.

    Returns:
        ``(config as plain dicts or None, class names in label order or None)``.
    """
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
