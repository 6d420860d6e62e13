"""The eight released variants, registered by name here and in timm's registry."""
from __future__ import annotations

from typing import Any, Callable, Dict, List

from timm.models import register_model

from .crossformer import CrossFormer

_VARIANTS: Dict[str, Callable[..., CrossFormer]] = {}

# Keyword arguments timm.create_model passes that our constructor does not take.
_TIMM_ONLY_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _build(model_args: Dict[str, Any], pretrained: bool, overrides: Dict[str, Any]) -> CrossFormer:
    if pretrained:
        raise ValueError(
            "pretrained=True is not supported: weights are never downloaded; create the model, then "
            "load a released checkpoint with model.load_state_dict(torch.load(path)['model'])"
        )
    for name in _TIMM_ONLY_ARGS:
        overrides.pop(name, None)
    return CrossFormer(**{**model_args, **overrides})


def _variant(fn: Callable[..., CrossFormer]) -> Callable[..., CrossFormer]:
    _VARIANTS[fn.__name__] = fn
    return register_model(fn)


_CROSSFORMER = dict(group_size=(7, 7, 7, 7), crs_interval=(8, 4, 2, 1), use_acl=False)
_CROSSFORMERPP = dict(group_size=(4, 4, 14, 7), crs_interval=(4, 2, 1, 1), use_acl=True)


@_variant
def crossformer_t(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer-T: 27.8M params, 2.9 GMACs at 224."""
    model_args = dict(embed_dim=64, depths=(1, 1, 8, 6), num_heads=(2, 4, 8, 16), drop_path_rate=0.1, **_CROSSFORMER)
    return _build(model_args, pretrained, kwargs)


@_variant
def crossformer_s(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer-S: 30.7M params, 4.9 GMACs at 224."""
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2, **_CROSSFORMER)
    return _build(model_args, pretrained, kwargs)


@_variant
def crossformer_b(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer-B: 52.0M params, 9.2 GMACs at 224."""
    model_args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3, **_CROSSFORMER)
    return _build(model_args, pretrained, kwargs)


@_variant
def crossformer_l(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer-L: 92.0M params, 16.1 GMACs at 224."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5, **_CROSSFORMER)
    return _build(model_args, pretrained, kwargs)


@_variant
def crossformerpp_s(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer++-S: 23.3M params, 4.4 GMACs at 224."""
    model_args = dict(embed_dim=64, depths=(2, 2, 18, 2), num_heads=(2, 4, 8, 16), drop_path_rate=0.2, **_CROSSFORMERPP)
    return _build(model_args, pretrained, kwargs)


@_variant
def crossformerpp_b(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer++-B: 52.0M params, 9.6 GMACs at 224."""
    model_args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3, **_CROSSFORMERPP)
    return _build(model_args, pretrained, kwargs)


@_variant
def crossformerpp_l(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer++-L: 92.0M params, 16.7 GMACs at 224."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5, **_CROSSFORMERPP)
    return _build(model_args, pretrained, kwargs)


@_variant
def crossformerpp_h(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer++-H: 96.0M params, 22.0 GMACs at 224."""
    model_args = dict(embed_dim=128, depths=(6, 6, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5, **_CROSSFORMERPP)
    return _build(model_args, pretrained, kwargs)


def list_models() -> List[str]:
    """Names of the registered variants."""
    return list(_VARIANTS)


def create_model(name: str, **overrides: Any) -> CrossFormer:
    """Build a registered variant.

    Args:
        name: one of :func:`list_models`.
        **overrides: constructor arguments that replace the variant's (``num_classes``,
            ``drop_path_rate``, ``embed_dim``, ``depths``, ``use_checkpoint`` ...).
    """
    if name not in _VARIANTS:
        import difflib

        close = difflib.get_close_matches(name, list(_VARIANTS), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"unknown model name {name!r}: {hint}choose one of {', '.join(_VARIANTS)}")
    return _VARIANTS[name](**overrides)
