"""Look-up of the variants registered in ``models/crossformer.py`` (through timm's registry)."""
from __future__ import annotations

import difflib
from typing import Any, List

from timm.models import model_entrypoint

from .crossformer import CrossFormer, default_cfgs


def list_models() -> List[str]:
    """Names of the registered variants, in the order of the model zoo."""
    return list(default_cfgs)


def create_model(name: str, **overrides: Any) -> CrossFormer:
    """Build a registered variant, as ``timm.create_model(name, **overrides)`` does.

    Args:
        name: one of :func:`list_models`.
        **overrides: constructor arguments that replace the variant's (``num_classes``,
            ``global_pool``, ``in_chans``, ``drop_path_rate``, ``embed_dim``, ``depths``,
            ``use_checkpoint`` ...) and timm's builder arguments (``features_only``,
            ``out_indices``, ``feature_cls``, ``feature_cfg``, ``pretrained``,
            ``pretrained_cfg_overlay``).
    """
    if name not in default_cfgs:
        close = difflib.get_close_matches(name, list_models(), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"unknown model name {name!r}: {hint}choose one of {', '.join(list_models())}")
    return model_entrypoint(name)(**overrides)
