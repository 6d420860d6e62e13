"""Mixed precision: the autocast dtype a setting means on a device, the one autocast context, peak memory."""
from __future__ import annotations

import contextlib
import resource
from typing import Optional

import torch


def resolve_amp(amp: str, device: torch.device, key: str = "TRAIN.AMP") -> Optional[torch.dtype]:
    """The autocast dtype for a precision setting on ``device`` (None = float32).

    Args:
        amp: ``"bf16"``, ``"fp16"`` or ``"none"`` (the values config.validate() allows).
        device: The compute device.
        key: The config key ``amp`` came from (named in errors).
    """
    if amp == "none":
        return None
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError(f"{key}='fp16' needs a CUDA device, this process runs on {device.type}; "
                             f"use --opts {key} bf16 or none")
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{key}='bf16' is not supported by this GPU; use --opts {key} fp16")
    return torch.bfloat16


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """The one mixed-precision context: ``torch.autocast`` when ``dtype`` is set."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, max resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
