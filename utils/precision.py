"""Precision: the autocast dtype a setting means on a device, TF32, the one autocast context, peak memory."""
from __future__ import annotations

import contextlib
import logging
import resource
from typing import Optional

import torch

logger = logging.getLogger(__name__)

def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 BF16 / AMX, or AVX-512 core), as torch reports.

    Where it does not (AVX2-only CPUs: most laptops, AMD Zen 2/3, many cloud machines), oneDNN
    emulates bf16 and bf16 autocast runs several times slower than float32.
    """
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def amp_name(dtype: Optional[torch.dtype]) -> str:
    """The setting that means ``dtype``: ``"bf16"``, ``"fp16"`` or ``"none"`` (float32)."""
    return {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def resolve_amp(amp: str, device: torch.device, key: str = "TRAIN.AMP",
                force_bf16: bool = False) -> Optional[torch.dtype]:
    """The autocast dtype for a precision setting on ``device`` (None = float32).

    bf16 where the device only emulates it changes, with a one-line notice, unless ``force_bf16``:

    - a GPU before Ampere (V100, T4: no bf16 tensor cores, several times slower than fp16) uses
      fp16; the caller adds the loss scaler that fp16 needs;
    - a CPU without native bf16 (:func:`cpu_has_native_bf16` False, e.g. AVX2 only, where bf16
      inference measured 7.6x slower than float32) uses float32.

    Args:
        amp: ``"bf16"``, ``"fp16"`` or ``"none"`` (the values config.validate() allows).
        device: The compute device.
        key: The config key ``amp`` came from (named in errors and notices).
        force_bf16: ``TRAIN.FORCE_BF16``: keep bf16 even where it is emulated.
    """
    if amp == "none":
        return None
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError(f"{key}='fp16' needs a CUDA device, this process runs on {device.type}; "
                             f"use --opts {key} bf16 or none")
        return torch.float16
    if force_bf16:
        return torch.bfloat16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        logger.warning("%s=bf16: %s has no native bf16 (only a slow emulation); using fp16 with a loss scaler "
                       "instead (set %s fp16 to silence this, or TRAIN.FORCE_BF16 True to use bf16 anyway)", key,
                       torch.cuda.get_device_name(device), key)
        return torch.float16
    if device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning("%s=bf16: this CPU (torch CPU capability %s) has no native bf16, which oneDNN would "
                       "emulate several times slower than float32; using float32 instead (set %s none to silence "
                       "this, or --opts TRAIN.FORCE_BF16 True to use bf16 anyway)", key,
                       torch.backends.cpu.get_cpu_capability(), key)
        return None
    return torch.bfloat16


def set_tf32(enabled: bool, device: torch.device) -> Optional[str]:
    """Let float32 matmuls and cuDNN convolutions use TF32 on ``device`` (CUDA only).

    Sets PyTorch's ``fp32_precision`` flags (the API that replaces ``allow_tf32``) for cuBLAS
    matmuls and cuDNN convolutions; returns the precision set, None off CUDA (nothing to set).

    Args:
        enabled: ``TRAIN.TF32``.
        device: The compute device.
    """
    if device.type != "cuda":
        return None
    precision = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision
    return precision


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """The one mixed-precision context: ``torch.autocast`` when ``dtype`` is set."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, max resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
