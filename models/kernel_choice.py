"""Which form the fast path takes on a CPU, by compute dtype, autograd and CPU: the one switch.

The fast path's CPU forms were tuned in float32 (the stem's space-to-depth convolutions on an
AVX2 CPU). Measured on a CPU with native bf16 (torch CPU capability ``AVX512``, avx512_bf16, no
AMX; numbers and commands in docs/performance.md):

- attention: SDPA's flash CPU kernel in bf16 runs its blocks' GEMMs as many small oneDNN calls
  and took 35 % of a bf16 forward, more than the explicit form (two batched GEMMs and a softmax)
  takes. CPU inference in bf16 therefore runs the explicit form; float32 and float64 keep SDPA.
  CPU training runs the explicit form in every dtype (``Attention.explicit_cpu_training``).
- the CEL stem: on AVX-512 a plain convolution with 3 input channels is faster than its
  space-to-depth form in inference (float32 and bf16, every kernel) and, in training, for kernels
  below 4x the stride; the space-to-depth form stays where it was measured faster (AVX2 CPUs,
  and training with kernels of 4x the stride or more, whose plain backward is slow).
- fc1+GELU as one oneDNN call: faster than linear + GELU in float32 and in bf16, so it has no
  branch here (``models.cpu_kernels.onednn_dtype`` only checks that oneDNN supports the dtype).

Callers ask these functions through the module (``kernel_choice.cpu_inference_uses_sdpa(...)``),
so a test forces either branch on any CPU by patching one function.
"""
from __future__ import annotations

import torch


# Read once: a constant for torch.compile to trace through.
_CPU_HAS_AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def cpu_has_avx512() -> bool:
    """Whether torch runs its AVX-512 kernels on this CPU (``torch.backends.cpu.get_cpu_capability()``)."""
    return _CPU_HAS_AVX512


def cpu_inference_uses_sdpa(dtype: torch.dtype) -> bool:
    """Whether CPU attention without autograd runs SDPA (True) or the explicit form (False).

    Args:
        dtype: the compute dtype of q, k, v (autocast's dtype under autocast).
    """
    return dtype != torch.bfloat16


def cpu_stem_uses_space_to_depth(kernel: int, stride: int, grad_enabled: bool) -> bool:
    """Whether a CPU stride-``stride`` convolution of kernel ``kernel`` runs as a space-to-depth convolution.

    Args:
        kernel: square kernel side, a multiple of ``stride`` larger than it.
        stride: the convolution's stride.
        grad_enabled: autograd records the call (training).
    """
    if not cpu_has_avx512():
        return True
    return grad_enabled and kernel >= 4 * stride
