"""The plain attention math of the official CrossFormer code, the formulation tests compare against.

``Attention`` selects it with ``CrossFormer.set_reference_attention(True)``: heads are split
with contiguous copies and the ``(B, nG, nH, N, N)`` attention matrix is materialised, as in the
official release. The fast path's explicit CPU-training form shares :func:`explicit_attention`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                       drop: float, training: bool) -> torch.Tensor:
    """``softmax(Q K^T * scale + bias) V`` with the attention matrix materialised.

    Args:
        q, k, v: ``(B, nG, nH, N, d)``.
        bias: additive bias broadcast to ``(B, nG, nH, N, N)``: ``(nH, N, N)`` or ``(nG, nH, N, N)``.
        scale: factor on ``Q K^T``.
        drop: dropout rate on the attention weights.
        training: apply the dropout.

    Returns:
        ``(B, nG, N, nH*d)``, heads merged.
    """
    batch, num_groups, heads, tokens, head_dim = q.shape
    attn = (q * scale) @ k.transpose(-2, -1)  # (B, nG, nH, N, N)
    attn = (attn + bias).softmax(dim=-1)
    attn = F.dropout(attn, drop, training)
    return (attn @ v).transpose(2, 3).reshape(batch, num_groups, tokens, heads * head_dim)


def official_attention(qkv: torch.Tensor, bias: torch.Tensor, num_heads: int, scale: float, drop: float,
                       training: bool) -> torch.Tensor:
    """The official attention over grouped projections: contiguous q, k, v, then :func:`explicit_attention`.

    The bias is added in its own dtype (float32), as the official code does under autocast.

    Args:
        qkv: ``(B, nG, N, 3*C)``, channels ordered (q/k/v, head, head_dim).
        bias: float32 ``(nH, N, N)`` or ``(nG, nH, N, N)``.
        num_heads: number of heads ``nH``.
        scale: factor on ``Q K^T``.
        drop: dropout rate on the attention weights.
        training: apply the dropout.

    Returns:
        ``(B, nG, N, C)``.
    """
    batch, num_groups, tokens, channels3 = qkv.shape
    head_dim = channels3 // 3 // num_heads
    qkv = qkv.view(batch, num_groups, tokens, 3, num_heads, head_dim).permute(3, 0, 1, 4, 2, 5).contiguous()
    q, k, v = qkv.unbind(0)  # (B, nG, nH, N, d)
    return explicit_attention(q, k, v, bias, scale, drop, training)
