"""CrossFormer / CrossFormer++ models. Importing this package registers them with timm too."""
from .build import build_model, keep_head_for_classes, load_pretrained
from .crossformer import CrossFormer, check_input_size, checkpoint_filter_fn
from .flops import count_macs
from .freeze import freeze
from .registry import create_model, list_models

__all__ = ["CrossFormer", "build_model", "check_input_size", "checkpoint_filter_fn", "count_macs", "create_model",
           "freeze", "keep_head_for_classes", "list_models", "load_pretrained"]
