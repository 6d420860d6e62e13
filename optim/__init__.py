"""The optimizer (AdamW, LAMB, Lion, SGD) with the CrossFormer no-decay rules, and the per-step LR schedule."""
from .optimizer import build_optimizer, build_param_groups, param_groups
from .scheduler import build_scheduler, current_lr, steps_per_epoch, warmup_epochs

__all__ = ["build_optimizer", "build_param_groups", "build_scheduler", "current_lr", "param_groups",
           "steps_per_epoch", "warmup_epochs"]
