"""The CPU kernels the fast path uses by default: fc1+GELU in one oneDNN call, fc2 accumulating onto the
residual (both in inference), and the CEL stem's large strided convolutions as space-to-depth
convolutions (training and inference).

``Mlp.forward_residual`` in ``models/crossformer.py`` calls the first two in eval mode,
``PatchEmbed.forward`` calls :func:`strided_conv`. ``linear_gelu``
uses the oneDNN call only on CPU without autograd (float32 or bf16 autocast) and otherwise runs
the plain linear + GELU; ``linear_residual`` is ``addmm_`` onto the residual on any device. Each
falls back to the plain PyTorch expression where its fast form does not apply, so callers never
need to check. Both are registered with timm's notrace helpers: torch.fx records each as one call,
so a traced graph chooses the kernel at run time as eager does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function


def onednn_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """Compute dtype for :func:`linear_gelu`'s one-call oneDNN path on ``x``, or None if it does not apply.

    It applies on CPU without autograd (inference and no_grad evaluation, not under
    torch.compile, which fuses on its own) in float32, or in bfloat16 where oneDNN supports it;
    under CPU autocast the compute dtype is autocast's.

    Args:
        x: the layer's input.
    """
    if (x.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling()
            or not torch.backends.mkldnn.is_available()):
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return dtype
    return None


@register_notrace_function
def linear_gelu(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``GELU(linear(x))`` (exact, erf form), in one oneDNN call where :func:`onednn_dtype` allows.

    The GEMM writes its output once with bias and GELU applied in its epilogue, instead of
    addmm copying the bias into the output, the GEMM, and a separate GELU pass.

    Args:
        x: ``(..., in_features)``.
        linear: the layer (its weight and bias are cast like autocast would).

    Returns:
        ``(..., out_features)``.
    """
    dtype = onednn_dtype(x)
    if dtype is None:
        return F.gelu(linear(x))
    bias = linear.bias.to(dtype) if linear.bias is not None else None
    return torch.ops.mkldnn._linear_pointwise(x.to(dtype), linear.weight.to(dtype), bias, "gelu", [], "none")


@register_notrace_function
def linear_residual(x: torch.Tensor, linear: nn.Linear, residual: torch.Tensor) -> torch.Tensor:
    """``residual + linear(x)``, with the GEMM accumulating onto ``residual + bias``.

    One pass over the output fewer than addmm's copy of the bias followed by a separate add
    (15-25 % of the layer's time on this CPU for the MLP's fc2). Under autocast, or with mixed
    dtypes, it is the plain sum.

    Args:
        x: ``(..., in_features)``, contiguous.
        linear: the layer.
        residual: ``(..., out_features)``.
    """
    # is_compiling() first: torch 2.11's dynamo cannot trace is_autocast_available (a graph break, an error
    # under fullgraph=True), and a device that torch.compile runs on always has autocast.
    autocast = ((torch.compiler.is_compiling() or torch.amp.is_autocast_available(x.device.type))
                and torch.is_autocast_enabled(x.device.type))
    if autocast or linear.bias is None or not x.dtype == residual.dtype == linear.weight.dtype:
        return residual + linear(x)
    out = (residual + linear.bias).contiguous()  # a new (..., out_features) tensor
    out.view(-1, out.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), linear.weight.t())
    return out


@register_notrace_function  # shape checks: torch.fx keeps the call as one node
def strided_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)``; on a CPU, a stride-s convolution whose kernel is a larger multiple of s runs as a
    stride-1 convolution of kernel k/s over the s x s space-to-depth (``pixel_unshuffle``) input.

    The same products, summed in another order (float32 results within a few 1e-6). The CEL stem's
    convolutions (3 input channels, kernels 8-32, stride 4) are a poor fit for oneDNN's direct
    convolution: as 48-channel convolutions of kernel 2-8 a forward and backward take 1.4-3.6x less
    time on an AVX2 CPU (``python -m benchmarks.cpu_precision`` times the demo they dominate).

    Args:
        x: ``(B, C, H, W)``.
        conv: A convolution with equal strides, square kernel and padding, no dilation or groups.
    """
    stride, kernel, padding = conv.stride[0], conv.kernel_size[0], conv.padding[0]
    height, width = x.shape[-2:]
    if (x.device.type != "cpu" or kernel <= stride or kernel % stride or conv.groups != 1 or conv.dilation != (1, 1)
            or conv.stride != (stride, stride) or conv.kernel_size != (kernel, kernel)
            or conv.padding != (padding, padding) or (height + 2 * padding) % stride
            or (width + 2 * padding) % stride):
        return conv(x)
    out_channels, in_channels = conv.weight.shape[:2]
    blocks = kernel // stride
    # (O, C, k, k) -> (O, C * s * s, k/s, k/s) in pixel_unshuffle's channel order (c, row in block, column in block)
    weight = conv.weight.reshape(out_channels, in_channels, blocks, stride, blocks, stride)
    weight = weight.permute(0, 1, 3, 5, 2, 4).reshape(out_channels, in_channels * stride * stride, blocks, blocks)
    padded = F.pad(x, (padding,) * 4)
    batch, rows, cols = x.shape[0], (height + 2 * padding) // stride, (width + 2 * padding) // stride
    # pixel_unshuffle as one reshape-permute copy (F.pixel_unshuffle's CPU kernel takes ~10x longer)
    unshuffled = padded.reshape(batch, in_channels, rows, stride, cols, stride).permute(0, 1, 3, 5, 2, 4)
    unshuffled = unshuffled.reshape(batch, in_channels * stride * stride, rows, cols)  # (B, C*s*s, (H+2p)/s, (W+2p)/s)
    return F.conv2d(unshuffled, weight, conv.bias)
