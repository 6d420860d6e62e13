"""CrossFormer / CrossFormer++ models. Importing this package registers them with timm too."""
from .crossformer import CrossFormer, check_input_size
from .registry import create_model, list_models

__all__ = ["CrossFormer", "check_input_size", "create_model", "list_models"]
