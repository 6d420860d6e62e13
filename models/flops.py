"""Multiply-accumulate counts of a CrossFormer, through ``torch.utils.flop_counter.FlopCounterMode``.

The fast path calls kernels that torch 2.14's counter has no formula for; :func:`count_macs`
registers them the first time it runs (never at import, so importing the model leaves the
global FLOP registry alone).
"""
from __future__ import annotations

import math
from typing import Tuple, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode



def register_flop_formulas() -> None:
    """Let ``FlopCounterMode`` count the fast path's kernels: the fused oneDNN linear of
    ``linear_gelu`` (a linear layer), the in-place ``addmm_`` of ``linear_residual`` and SDPA's
    CPU flash kernel (two batched matmuls). Formulas already registered are left as they are."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_flop_count

    if torch.ops.aten.addmm_ not in flop_registry:
        @register_flop_formula(torch.ops.aten.addmm_)
        def addmm_inplace_flops(self_shape: torch.Size, a_shape: torch.Size, b_shape: torch.Size, *args: object,
                                **kwargs: object) -> int:
            return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    linear_pointwise = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if linear_pointwise is not None and linear_pointwise not in flop_registry:
        @register_flop_formula(linear_pointwise)
        def linear_pointwise_flops(x_shape: torch.Size, w_shape: torch.Size, *args: object, **kwargs: object) -> int:
            return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]

    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None and cpu_flash not in flop_registry:
        @register_flop_formula(cpu_flash)
        def cpu_flash_flops(q_shape: torch.Size, k_shape: torch.Size, v_shape: torch.Size, *args: object,
                            **kwargs: object) -> int:
            return sdpa_flop_count(q_shape, k_shape, v_shape)


@torch.no_grad()
def count_macs(model: nn.Module, img_size: Union[int, Tuple[int, int]] = 224, reference: bool = True) -> int:
    """Multiply-accumulates of one forward pass of one image.

    Counted with ``FlopCounterMode`` (its FLOP total / 2): convolutions, linear layers,
    attention matmuls and the position-bias MLP of every block. With ``reference=True``
    (default) the count runs the plain reference formulation, which is the official one, so the
    numbers compare with the papers' and the model zoo's. ``reference=False`` counts the fast
    path; the two do the same multiply-accumulates (both project padding tokens). The model's
    mode, formulation switch and position-bias caching are as before when it returns.

    Args:
        model: the model to count: a ``CrossFormer`` (it switches its formulation and clears its caches).
        img_size: ``H`` (square) or ``(H, W)``.
        reference: count the reference formulation instead of the fast path.
    """
    register_flop_formulas()
    height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
    param = next(model.parameters())
    x = torch.zeros(1, 3, height, width, device=param.device, dtype=param.dtype)
    was_training, was_reference = model.training, model.reference_attention
    # Eval mode (no randomness) with empty caches: every block's DPB MLP is counted once.
    model.eval()
    model.set_reference_attention(reference)
    model.clear_caches()
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
        model.set_reference_attention(was_reference)
    return counter.get_total_flops() // 2
