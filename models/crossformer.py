"""CrossFormer (arXiv 2108.00154) and CrossFormer++ (arXiv 2303.06908).

Parts, in the papers' names:
- CEL, cross-scale embedding layer: several convolutions of different kernel sizes (same
  stride) whose outputs are concatenated along channels (``PatchEmbed``, ``PatchMerging``).
- LSDA, long short distance attention: blocks alternate SDA (adjacent ``G x G`` groups) and
  LDA (``G x G`` tokens sampled with a fixed ``interval``) (``CrossFormerBlock``).
- DPB, dynamic position bias: an MLP maps relative coordinates to per-head biases
  (``DynamicPosBias``), so no weight depends on the input size.
- PGS, progressive group size (CrossFormer++): per-stage group sizes / intervals.
- ACL, amplitude cooling layer (CrossFormer++): depthwise 3x3 conv + LayerNorm after every
  third block of a stage except the stage's last block.

Parameter names and shapes equal the official release, so its checkpoints load with
``strict=True``. Padding and masks are computed for the size given at run time (cached per
size), so one instance runs at any ``H, W`` that are multiples of 32.

Attention uses ``F.scaled_dot_product_attention`` with the position bias and padding mask
merged into one additive bias in the query dtype. Alternatives live in their own modules,
chosen by ``CrossFormer.set_reference_attention``: the official formulation in
:mod:`models.reference`, the oneDNN CPU inference kernels in :mod:`models.cpu_kernels`; MAC
counting is :mod:`models.flops`. The variants at the end of the file are registered with timm
through ``build_model_with_cfg`` (``pretrained_cfg``, ``features_only``, ``checkpoint_filter_fn``).
"""
from __future__ import annotations

import contextlib
import logging
from functools import partial
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from timm.layers import DropPath, register_notrace_function, register_notrace_module, trunc_normal_
from timm.layers import Mlp as TimmMlp
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from torch.nn.attention import SDPBackend, sdpa_kernel

from .cpu_kernels import linear_gelu, linear_residual, strided_conv
from .reference import explicit_attention, official_attention
from .stored import ARCH_KEYS, read_stored_info, stored_architecture, stored_data_config

_logger = logging.getLogger(__name__)

# Input sizes must be multiples of this: stem stride 4 times three stride-2 merges.
SIZE_DIVISOR = 32


def check_input_size(height: int, width: int) -> None:
    """Raise a ValueError unless ``height`` and ``width`` are positive multiples of 32.

    Args:
        height: input image height in pixels.
        width: input image width in pixels.
    """
    if height <= 0 or width <= 0 or height % SIZE_DIVISOR or width % SIZE_DIVISOR:
        raise ValueError(
            f"input size {height}x{width} is not supported: CrossFormer needs height and width "
            f"that are positive multiples of {SIZE_DIVISOR} (e.g. 224, 256, 384); "
            f"resize or pad the input"
        )


@register_notrace_function
def check_image_size(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself after :func:`check_input_size` on its height and width.

    A pass-through so that torch.fx keeps the check in the graph: registered with timm's
    notrace helpers, it is one call in a traced graph (its test is Python control flow).

    Args:
        x: ``(B, C, H, W)`` images.
    """
    check_input_size(x.shape[-2], x.shape[-1])
    return x


# The poolings forward_head implements (timm's names).
GLOBAL_POOLS = ("avg", "")


def _checked_global_pool(global_pool: str) -> str:
    """``global_pool`` if :meth:`CrossFormer.forward_head` implements it, else a ValueError."""
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool {global_pool!r} is not supported; use 'avg' (average over the map) "
                         "or '' (no pooling)")
    return global_pool


def relative_position_index(group_h: int, group_w: int, device: torch.device) -> torch.Tensor:
    """Index into the ``(2Gh-1)*(2Gw-1)`` relative-offset table for every token pair.

    Args:
        group_h: group height ``Gh`` in tokens.
        group_w: group width ``Gw`` in tokens.
        device: device of the result.

    Returns:
        ``(Gh*Gw, Gh*Gw)`` int64 tensor.
    """
    coords = torch.stack(
        torch.meshgrid(
            torch.arange(group_h, device=device), torch.arange(group_w, device=device), indexing="ij"
        )
    ).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return (rel[0] + group_h - 1) * (2 * group_w - 1) + (rel[1] + group_w - 1)


def relative_offsets(group_h: int, group_w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """All relative offsets ``(dh, dw)`` of a ``Gh x Gw`` group, row-major.

    Returns:
        ``((2Gh-1)*(2Gw-1), 2)`` tensor of ``dtype``.
    """
    dh = torch.arange(1 - group_h, group_h, device=device)
    dw = torch.arange(1 - group_w, group_w, device=device)
    return torch.stack(torch.meshgrid(dh, dw, indexing="ij")).flatten(1).t().to(dtype)


class Grouping(NamedTuple):
    """How a block groups a map: group side ``G``, sampling interval ``I``, bottom / right padding."""

    group: int
    interval: int
    pad_h: int
    pad_w: int


def group_tokens(x: torch.Tensor, group: int, interval: int) -> torch.Tensor:
    """Split a padded map into groups of ``group x group`` tokens.

    Token ``(r*G*I + g*I + i)`` along each axis belongs to group ``(r, i)`` at position ``g``:
    ``interval=1`` gives adjacent windows (SDA), ``interval=I`` tokens ``I`` apart (LDA).

    Args:
        x: ``(B, Hp, Wp, C)`` with ``Hp, Wp`` multiples of ``group * interval``.
        group: group side ``G``.
        interval: sampling interval ``I``.

    Returns:
        ``(B, nG, G*G, C)`` with groups ordered (region row, region col, i_h, i_w).
    """
    batch, height, width, channels = x.shape
    rows, cols = height // (group * interval), width // (group * interval)
    x = x.view(batch, rows, group, interval, cols, group, interval, channels)
    x = x.permute(0, 1, 4, 3, 6, 2, 5, 7)  # (B, Rh, Rw, I, I, G, G, C)
    return x.reshape(batch, rows * cols * interval * interval, group * group, channels)


def ungroup_tokens(x: torch.Tensor, group: int, interval: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`group_tokens`: ``(B, nG, G*G, C)`` -> ``(B, Hp, Wp, C)``."""
    batch, channels = x.shape[0], x.shape[-1]
    rows, cols = height // (group * interval), width // (group * interval)
    x = x.view(batch, rows, cols, interval, interval, group, group, channels)
    x = x.permute(0, 1, 5, 3, 2, 6, 4, 7)  # (B, Rh, G, I, Rw, G, I, C)
    return x.reshape(batch, height, width, channels)


def padding_mask(height: int, width: int, grouping: Grouping, device: torch.device) -> torch.Tensor:
    """Additive key mask of the padded tokens of an ``height x width`` map grouped by ``grouping``.

    Returns:
        ``(nG, 1, 1, N)`` float32: 0 for real tokens, -inf for padding (all 0 without padding).
    """
    group, interval, pad_h, pad_w = grouping
    # Comparisons rather than writes into the padded rows / columns: torch.export then needs no
    # assumption on the padding's size.
    rows = torch.arange(height + pad_h, device=device)[:, None] >= height  # (Hp, 1)
    cols = torch.arange(width + pad_w, device=device)[None, :] >= width  # (1, Wp)
    padded = torch.where(rows | cols, float("-inf"), 0.0)  # (Hp, Wp) float32
    mask = group_tokens(padded[None, :, :, None], group, interval)  # (1, nG, N, 1)
    return mask[0].transpose(1, 2).unsqueeze(1)  # (nG, 1, 1, N)


def sdpa_backends(device: torch.device) -> Optional[List[SDPBackend]]:
    """SDPA backends to allow for an additive bias, or None to let PyTorch choose.

    On CUDA, training and inference both run the memory-efficient kernel (math as the
    fallback): flash attention takes no arbitrary bias, and cuDNN attention, PyTorch's first
    choice on Hopper since 2.11, has had wrong gradients with an explicit mask
    (pytorch/pytorch#196678). Pinning inference too means validation, ``--eval`` and training
    run the one kernel whose results the tests and the official fixtures vouch for. On CPU
    PyTorch's choice stands (its flash kernel takes a bias).
    """
    if device.type == "cuda":
        return [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return None


def sdpa_mask_alignment(device: torch.device) -> int:
    """Row alignment, in elements, of the additive bias handed to SDPA on ``device``: 8 on CUDA, where
    PyTorch copies a bias whose strides are not multiples of 8 into a row-padded buffer before the
    memory-efficient kernel, on every call (``preprocess_mask``, aten/src/ATen/native/transformers/
    attention.cpp); 1 (taken as given) elsewhere."""
    return 8 if device.type == "cuda" else 1


def sdpa_mask(bias: torch.Tensor, dtype: torch.dtype, batch: int, alignment: int) -> torch.Tensor:
    """The 4-D additive mask SDPA takes, in ``dtype``.

    A bias shared by every group becomes ``(1, nH, N, N)`` (broadcast over images and groups); a
    per-group bias ``(nG, nH, N, N)`` is repeated for every image, ``(B*nG, nH, N, N)``. When ``N``
    is not a multiple of ``alignment``, the mask is written once (cast and repeat in one copy) into
    storage whose rows are padded to a multiple of ``alignment`` elements and is a view of their
    first ``N`` columns, so that SDPA takes it without copying it again.

    Args:
        bias: ``(nH, N, N)`` or ``(nG, nH, N, N)``.
        dtype: The query dtype.
        batch: Images ``B``.
        alignment: Row alignment in elements (:func:`sdpa_mask_alignment`).
    """
    repeats = 1 if bias.dim() == 3 else batch
    bias = bias if bias.dim() == 4 else bias.unsqueeze(0)  # (1 or nG, nH, N, N)
    groups, heads, rows, cols = bias.shape
    if cols % alignment == 0:
        bias = bias.to(dtype)
        return bias if repeats == 1 else bias.expand(repeats, *bias.shape).reshape(repeats * groups, heads, rows, cols)
    padded = -(-cols // alignment) * alignment
    mask = bias.new_empty(repeats, groups, heads, rows, padded, dtype=dtype)[..., :cols]
    mask.copy_(bias.expand(repeats, *bias.shape))  # differentiable: the gradient reaches ``bias``
    return mask.view(repeats * groups, heads, rows, cols)  # (1 or B*nG, nH, N, N), row stride ``padded``


class DynamicPosBias(nn.Module):
    """DPB: an MLP from a relative offset ``(dh, dw)`` to one bias per head.

    Args:
        dim: width of the hidden layers.
        num_heads: number of attention heads (outputs).
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.pos_proj = nn.Linear(2, dim)
        self.pos1 = nn.Sequential(nn.LayerNorm(dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))
        self.pos2 = nn.Sequential(nn.LayerNorm(dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))
        self.pos3 = nn.Sequential(nn.LayerNorm(dim), nn.ReLU(inplace=True), nn.Linear(dim, num_heads))

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        """``(M, 2)`` offsets -> ``(M, num_heads)`` biases."""
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))


@register_notrace_module  # torch.fx: one call (its grouping and caches depend on the map's size)
class Attention(nn.Module):
    """Multi-head self-attention inside LSDA groups, with a dynamic position bias.

    ``forward`` owns the whole computation: the grouping for the map's size (SDA or LDA, see
    :meth:`grouping`), padding and its mask, q/k/v projection, attention, output projection,
    ungrouping and cropping. ``reference`` selects the official formulation
    (:mod:`models.reference`); it is set through ``CrossFormer.set_reference_attention``.

    Attributes:
        explicit_cpu_training: on CPU with autograd, use the explicit form instead of SDPA
            (faster there, see :meth:`fast_attention`); tests switch it off to check SDPA's gradients.
        reference: run the official formulation and recompute the position bias every forward.

    Args:
        dim: token width.
        num_heads: number of heads.
        group_size: SDA group side ``G`` (and the threshold under which the whole map is one group).
        interval: LDA sampling interval ``I``.
        long_distance: True for LDA, False for SDA.
        qkv_bias: whether the qkv projection has a bias.
        attn_drop: dropout on attention weights.
        proj_drop: dropout after the output projection.
    """

    explicit_cpu_training = True

    def __init__(
        self, dim: int, num_heads: int, group_size: int, interval: int, long_distance: bool, qkv_bias: bool = True,
        attn_drop: float = 0.0, proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}; choose a divisor")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.group_size = group_size
        self.interval = interval
        self.long_distance = long_distance
        self.pos = DynamicPosBias(dim // 4 // 4, num_heads)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reference = False
        # Eval-mode cache of the position bias: key -> (nH, N, N) tensor (not in reference mode).
        self._bias_cache: Dict[tuple, torch.Tensor] = {}
        # Padding masks, cached per (H, W, device): see cached_padding_mask().
        self._mask_cache: Dict[tuple, Optional[torch.Tensor]] = {}

    def grouping(self, height: int, width: int) -> Grouping:
        """How an ``height x width`` map is grouped.

        SDA groups are adjacent ``G x G`` windows. LDA groups are ``G x G`` tokens sampled with
        interval ``I`` inside regions of ``G*I x G*I`` tokens. SDA is LDA with ``I = 1``. A map
        no larger than a group (``min(H, W) <= G``) is one SDA group of side ``max(H, W)``.

        Returns:
            ``(group, interval, pad_h, pad_w)``: group side, sampling interval, and the
            bottom / right padding that makes the map a multiple of ``group * interval``.
        """
        if min(height, width) <= self.group_size:
            group, interval = max(height, width), 1
        else:
            group, interval = self.group_size, (self.interval if self.long_distance else 1)
        unit = group * interval
        return Grouping(group, interval, (-height) % unit, (-width) % unit)

    def cached_padding_mask(self, height: int, width: int, grouping: Grouping,
                            device: torch.device) -> Optional[torch.Tensor]:
        """:func:`padding_mask` (cached per size), or None without padding.

        Under ``torch.compile`` the mask is built inside the graph and the cache is left alone:
        filling it while tracing changes the dict the graph's guards test, so the next call
        would compile the whole model a second time.
        """
        if torch.compiler.is_compiling():
            return padding_mask(height, width, grouping, device) if grouping.pad_h or grouping.pad_w else None
        key = (height, width, device)
        if key not in self._mask_cache:
            self._mask_cache[key] = (padding_mask(height, width, grouping, device)
                                     if grouping.pad_h or grouping.pad_w else None)
        return self._mask_cache[key]

    def clear_cache(self) -> None:
        """Drop the cached eval-mode position bias."""
        self._bias_cache = {}

    def _weights_version(self) -> int:
        # In-place updates (optimizer steps, load_state_dict, EMA) bump _version.
        return sum(p._version for p in self.pos.parameters())

    def position_bias(self, group_h: int, group_w: int, device: torch.device) -> torch.Tensor:
        """Position bias of a ``Gh x Gw`` group, float32, ``(nH, N, N)``.

        Computed once per call; in eval mode without autograd (and outside reference mode) it
        is cached until the DPB weights change.
        """
        use_cache = (
            not self.reference and not self.training and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
        )
        if use_cache:
            # The bias is computed under the caller's autocast, so its dtype is part of the key.
            autocast = torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)
            autocast_dtype = torch.get_autocast_dtype(device.type) if autocast else None
            key = (group_h, group_w, device, autocast_dtype, self._weights_version())
            if key in self._bias_cache:
                return self._bias_cache[key]
        table = self.pos(relative_offsets(group_h, group_w, device, self.pos.pos_proj.weight.dtype))  # ((2Gh-1)(2Gw-1), nH)
        index = relative_position_index(group_h, group_w, device)  # (N, N)
        bias = table.t()[:, index]  # (nH, N, N), contiguous: SDPA would copy a strided bias every call
        if use_cache:
            self._bias_cache = {key: bias}
        return bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Grouped self-attention with output projection, ``(B, H, W, C)`` -> ``(B, H, W, C)``.

        Args:
            x: normalised tokens, ``(B, H, W, C)``.

        Returns:
            ``(B, H, W, C)``; on the fast path a strided view (ungrouped, cropped) that the
            residual add reads in place.
        """
        batch, height, width, channels = x.shape
        grouping = self.grouping(height, width)
        group, interval, pad_h, pad_w = grouping
        padded_h, padded_w = height + pad_h, width + pad_w
        bias = self.position_bias(group, group, x.device)  # (nH, N, N)
        exporting = torch.compiler.is_exporting()
        if exporting:
            # One exported program serves every size of its range: no branch on the padding
            # (which depends on the size), the mask computed in the graph (all 0 without padding).
            bias = bias + padding_mask(height, width, grouping, x.device)  # (nG, nH, N, N)
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # (B, Hp, Wp, C)
        elif pad_h or pad_w:
            bias = bias + self.cached_padding_mask(height, width, grouping, x.device)  # (nG, nH, N, N)
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # (B, Hp, Wp, C)
        if self.reference:
            # The official sequence: project every token, group the projections, split heads,
            # attend, merge heads, ungroup, project, crop; each step a contiguous copy.
            qkv = group_tokens(self.qkv(x), group, interval).contiguous()  # (B, nG, N, 3C)
            out = official_attention(qkv, bias, self.num_heads, self.scale, self.attn_drop, self.training)
            out = self.proj(ungroup_tokens(out, group, interval, padded_h, padded_w).contiguous())
        else:
            # Group the C-wide tokens rather than the 3C-wide projections: one copy of C in (none
            # for a map that is a single group), q, k, v as strided views of the projection, heads
            # merged for free from the kernel's output layout, one copy of C out (again none for
            # a single group). The crop is a view that the residual add reads.
            out = self.fast_attention(self.qkv(group_tokens(x, group, interval)), bias)  # (B, nG, N, C)
            out = ungroup_tokens(self.proj(out), group, interval, padded_h, padded_w)  # (B, Hp, Wp, C)
        if exporting:
            # Crop by gathering: a cropped view's strides would tie the program to whether a size pads.
            out = out.index_select(1, torch.arange(height, device=out.device))
            return self.proj_drop(out.index_select(2, torch.arange(width, device=out.device)))
        return self.proj_drop(out[:, :height, :width])

    def fast_attention(self, qkv: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Attention over grouped, already projected tokens: SDPA with one additive bias.

        Args:
            qkv: ``(B, nG, N, 3*C)``, channels ordered (q/k/v, head, head_dim).
            bias: additive bias, ``(nH, N, N)`` (shared by all groups) or ``(nG, nH, N, N)``.

        Returns:
            ``(B, nG, N, C)``.
        """
        batch, num_groups, tokens, _ = qkv.shape
        heads, head_dim = self.num_heads, self.head_dim
        # Strided views, no copy: (3, B, nG, nH, N, d).
        q, k, v = qkv.view(batch, num_groups, tokens, 3, heads, head_dim).permute(3, 0, 1, 4, 2, 5).unbind(0)
        # On CPU, SDPA's backward with a bias that needs gradients is no faster than the
        # explicit form in float32 and about 2x slower in bf16 (benchmarks/, torch 2.14), so
        # CPU training uses the explicit form; CUDA always takes SDPA (memory-efficient kernel).
        if self.explicit_cpu_training and q.device.type == "cpu" and torch.is_grad_enabled() and bias.requires_grad:
            return explicit_attention(q, k, v, bias.to(q.dtype), self.scale, self.attn_drop, self.training)
        # SDPA's fused kernels take 4-D inputs (5-D falls back to the materialising math path):
        # fold groups into the batch. q, k, v stay strided views of qkv.
        shape = (batch * num_groups, heads, tokens, head_dim)
        mask = sdpa_mask(bias, q.dtype, batch, sdpa_mask_alignment(q.device))  # (1 or B*nG, nH, N, N)
        backends = sdpa_backends(q.device)
        with sdpa_kernel(backends) if backends else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(
                q.reshape(shape), k.reshape(shape), v.reshape(shape), attn_mask=mask,
                dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale,
            )  # (B*nG, nH, N, d); the CPU and CUDA kernels lay it out as (B*nG, N, nH, d)
        return out.transpose(1, 2).reshape(batch, num_groups, tokens, heads * head_dim)


class Mlp(TimmMlp):
    """timm's ``Mlp`` (fc1, GELU, fc2) with a residual entry point for inference kernels.

    Attributes:
        reference: keep timm's plain forward everywhere (the official formulation).
    """

    reference = False

    def forward_residual(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)``; in eval mode outside reference mode, through the oneDNN kernels
        of :mod:`models.cpu_kernels` where they apply (fc1+GELU in one call, fc2 accumulating onto
        the residual; eval has no dropout and this MLP no norm, so nothing is skipped).

        Args:
            x: ``(..., in_features)``.
            residual: ``(..., out_features)``.
        """
        if self.training or self.reference:
            return residual + self(x)
        return linear_residual(linear_gelu(x, self.fc1), self.fc2, residual)


class CrossFormerBlock(nn.Module):
    """Transformer block with SDA or LDA grouping, an MLP, and an optional ACL.

    Args:
        dim: token width.
        num_heads: number of heads.
        group_size: SDA group side ``G`` (and the threshold under which the whole map is one group).
        interval: LDA sampling interval ``I``.
        long_distance: True for LDA, False for SDA.
        mlp_ratio: MLP hidden width / dim.
        drop: dropout rate.
        attn_drop: attention dropout rate.
        drop_path: stochastic depth rate.
        use_acl: append an amplitude cooling layer (depthwise 3x3 conv + LayerNorm).
    """

    def __init__(
        self, dim: int, num_heads: int, group_size: int, interval: int, long_distance: bool,
        mlp_ratio: float = 4.0, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
        use_acl: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, group_size, interval, long_distance, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.use_acl = use_acl
        if use_acl:
            self.ex_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
            self.ex_ln = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        attended = self.attn(self.norm1(x))
        x = x + self.drop_path(attended)
        if self.training:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        else:
            x = self.mlp.forward_residual(self.norm2(x), x)  # no stochastic depth in eval
        if self.use_acl:
            # Amplitude cooling: no residual, the LayerNorm resets the amplitude.
            x = self.ex_ln(self.ex_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        return x


def cross_scale_split(out_dim: int, num_kernels: int) -> List[int]:
    """Output channels of each CEL convolution: halves, the last two equal (64 -> 32, 16, 8, 8)."""
    return [out_dim // 2 ** (i + 1) if i < num_kernels - 1 else out_dim // 2 ** i for i in range(num_kernels)]


class PatchEmbed(nn.Module):
    """CEL stem: convolutions of several kernel sizes, stride ``kernel_sizes[0]``, concatenated.

    Args:
        kernel_sizes: e.g. ``(4, 8, 16, 32)``; the first one is the stride.
        in_chans: input channels.
        embed_dim: output channels (split by :func:`cross_scale_split`).

    Attributes:
        reference: plain convolutions (the official formulation); else :func:`models.cpu_kernels.strided_conv`.
    """

    reference = False

    def __init__(self, kernel_sizes: Sequence[int], in_chans: int, embed_dim: int) -> None:
        super().__init__()
        stride = kernel_sizes[0]
        self.projs = nn.ModuleList(
            nn.Conv2d(in_chans, dim, kernel, stride=stride, padding=(kernel - stride) // 2)
            for kernel, dim in zip(kernel_sizes, cross_scale_split(embed_dim, len(kernel_sizes)))
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, H/4, W/4, C)``."""
        x = torch.cat([proj(x) if self.reference else strided_conv(x, proj) for proj in self.projs], dim=1)
        return self.norm(x.permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """CEL between stages: LayerNorm, then stride-2 convolutions of several kernel sizes.

    Args:
        dim: input channels; the output has ``2 * dim``.
        kernel_sizes: e.g. ``(2, 4)``.
    """

    def __init__(self, dim: int, kernel_sizes: Sequence[int]) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        stride = 2
        self.reductions = nn.ModuleList(
            nn.Conv2d(dim, out, kernel, stride=stride, padding=(kernel - stride) // 2)
            for kernel, out in zip(kernel_sizes, cross_scale_split(2 * dim, len(kernel_sizes)))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, H/2, W/2, 2C)``."""
        x = self.norm(x).permute(0, 3, 1, 2)
        return torch.cat([reduction(x) for reduction in self.reductions], dim=1).permute(0, 2, 3, 1)


class Stage(nn.Module):
    """Blocks alternating SDA / LDA, then an optional patch merging.

    Args:
        dim: token width.
        depth: number of blocks.
        num_heads: heads per block.
        group_size: SDA group side.
        interval: LDA interval.
        mlp_ratio: MLP ratio.
        drop, attn_drop: dropout rates.
        drop_path: per-block stochastic depth rates (``depth`` values).
        merge_kernels: kernel sizes of the following patch merging, or None for the last stage.
        use_acl: amplitude cooling after blocks 3, 6, ... except the last block.
    """

    def __init__(
        self, dim: int, depth: int, num_heads: int, group_size: int, interval: int, mlp_ratio: float,
        drop: float, attn_drop: float, drop_path: Sequence[float], merge_kernels: Optional[Sequence[int]],
        use_acl: bool,
    ) -> None:
        super().__init__()
        # A Sequential (same keys as a list): its output, the stage's feature map, is what timm's
        # hook and fx feature extractors take from ``layers.{i}.blocks``.
        self.blocks = nn.Sequential(*(
            CrossFormerBlock(
                dim, num_heads, group_size, interval, long_distance=i % 2 == 1, mlp_ratio=mlp_ratio,
                drop=drop, attn_drop=attn_drop, drop_path=drop_path[i],
                use_acl=use_acl and (i + 1) % 3 == 0 and i != depth - 1,
            )
            for i in range(depth)
        ))
        self.downsample = PatchMerging(dim, merge_kernels) if merge_kernels else None
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(B, H, W, C)`` -> (stage output ``(B, H, W, C)``, next stage input or the same)."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint.checkpoint(self.blocks, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return x, (self.downsample(x) if self.downsample is not None else x)


class CrossFormer(nn.Module):
    """CrossFormer / CrossFormer++ classifier and backbone.

    timm's model contract: ``forward_features`` returns the normalised last map
    ``(B, H/32, W/32, C)`` (``output_fmt`` NHWC), ``forward_head`` pools it (``global_pool``) and
    applies the classifier, ``forward(x) == forward_head(forward_features(x))``; ``num_features``
    and ``head_hidden_size`` are that map's width ``C``.

    Args:
        num_classes: classes of the head; 0 for a feature extractor (``head`` is Identity).
        global_pool: ``"avg"`` (average over the map) or ``""`` (no pooling: the head, if any,
            applies to every position of the map).
        embed_dim: stage-1 width (doubles every stage).
        depths: blocks per stage.
        num_heads: heads per stage.
        group_size: SDA group side per stage.
        crs_interval: LDA interval per stage.
        use_acl: amplitude cooling layers (CrossFormer++).
        patch_size: CEL stem kernels (the first is the stride).
        merge_size: CEL merge kernels per stage transition.
        mlp_ratio: MLP ratio per stage.
        in_chans: input channels.
        drop_rate, attn_drop_rate: dropout rates.
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
        use_checkpoint: gradient checkpointing per stage.
    """

    def __init__(
        self, num_classes: int = 1000, global_pool: str = "avg", embed_dim: int = 64,
        depths: Sequence[int] = (2, 2, 18, 2), num_heads: Sequence[int] = (2, 4, 8, 16),
        group_size: Sequence[int] = (4, 4, 14, 7), crs_interval: Sequence[int] = (4, 2, 1, 1), use_acl: bool = True,
        patch_size: Sequence[int] = (4, 8, 16, 32),
        merge_size: Sequence[Sequence[int]] = ((2, 4), (2, 4), (2, 4)),
        mlp_ratio: Sequence[float] = (4.0, 4.0, 4.0, 4.0), in_chans: int = 3, drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        num_stages = len(depths)
        for name, values in (("num_heads", num_heads), ("group_size", group_size),
                             ("crs_interval", crs_interval), ("mlp_ratio", mlp_ratio)):
            if len(values) != num_stages:
                raise ValueError(
                    f"{name} has {len(values)} entries but depths has {num_stages} stages; give one per stage"
                )
        if len(merge_size) != num_stages - 1:
            raise ValueError(f"merge_size needs {num_stages - 1} entries (one per stage transition), got {len(merge_size)}")
        self.num_classes = num_classes
        self.global_pool = _checked_global_pool(global_pool)
        self.in_chans = in_chans
        self.output_fmt = "NHWC"
        self.num_features = self.head_hidden_size = embed_dim * 2 ** (num_stages - 1)
        self.stage_dims = [embed_dim * 2 ** i for i in range(num_stages)]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear from 0
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(Stage(
                self.stage_dims[i], depth, num_heads[i], group_size[i], crs_interval[i], mlp_ratio[i],
                drop_rate, attn_drop_rate, rates[start:start + depth],
                merge_size[i] if i < num_stages - 1 else None, use_acl,
            ))
        # Stage outputs for timm's features_only / forward_intermediates: stride 4, 8, 16, 32. The
        # module is the stage's blocks, whose output is the map before the patch merging.
        self.feature_info = [dict(num_chs=dim, reduction=4 * 2 ** i, module=f"layers.{i}.blocks")
                             for i, dim in enumerate(self.stage_dims)]
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        self.set_grad_checkpointing(use_checkpoint)
        self._reference_attention = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage's activations in backward to save memory."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def set_reference_attention(self, enable: bool = True) -> None:
        """Switch every block to the plain reference formulation, the official one.

        Reference (:mod:`models.reference`): pad the tokens, project them, explicit
        softmax(QK^T*scale + bias) V, output projection of every token before cropping, timm's
        plain MLP, and the position bias recomputed on every forward. Fast (default): SDPA with
        one additive bias in the query dtype, the C-wide tokens grouped once with q, k, v as
        strided views, position bias cached in eval mode, the stem's convolutions as space-to-depth
        convolutions on a CPU, and in eval the MLP through the kernels of :mod:`models.cpu_kernels`
        where they apply.

        Args:
            enable: True for the reference formulation, False for the fast path.
        """
        self._reference_attention = enable
        for module in self.modules():
            if isinstance(module, (Attention, Mlp, PatchEmbed)):
                module.reference = enable

    @property
    def reference_attention(self) -> bool:
        """Whether :meth:`set_reference_attention` selected the reference formulation."""
        return self._reference_attention

    def clear_caches(self) -> None:
        """Drop every block's cached eval-mode position bias (recomputed on the next forward)."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.clear_cache()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's grouping of the parameters by depth (layer-wise LR decay): the stem first, then each
        stage's blocks and its closing patch merge in order, the final norm with the last block
        (timm's ``(99999,)``: join the previous group), the head, matched by nothing, last.

        Args:
            coarse: One group per stage instead of per block.
        """
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^layers\.(\d+)\.downsample", (99998,)),
                (r"^norm", (99999,)),
            ],
        )

    def no_weight_decay(self) -> Set[str]:
        """Names of parameters that take no weight decay: norms, biases and other 1-D tensors."""
        return {name for name, param in self.named_parameters() if param.ndim <= 1 or name.endswith(".bias")}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier head (``nn.Linear``, or Identity without classes)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head (freshly initialised) for ``num_classes`` (0 = Identity).

        Args:
            num_classes: classes of the new head.
            global_pool: ``"avg"`` or ``""`` (no pooling); None keeps the current pooling.
        """
        if global_pool is not None:
            self.global_pool = _checked_global_pool(global_pool)
        self.num_classes = num_classes
        device = self.norm.weight.device if isinstance(self.norm, nn.LayerNorm) else None
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()
        self.head.apply(_init_weights)

    def forward_intermediates(
        self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
        stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (before patch merging) as timm's feature API expects them.

        Args:
            x: ``(B, in_chans, H, W)``, ``H, W`` multiples of 32.
            indices: stages to return: the last ``n`` if an int, all if None, else their indices.
            norm: apply the final norm to the last stage's output.
            stop_early: skip the stages after the last requested one.
            output_fmt: ``"NCHW"`` (``(B, C_i, H / 2^(i+2), W / 2^(i+2))``) or ``"NHWC"``.
            intermediates_only: return only the intermediates.

        Returns:
            The intermediates, or ``(final, intermediates)``: ``final`` is what
            :meth:`forward_features` returns, the normalised last map ``(B, H/32, W/32, C)``, when
            every stage ran (a run stopped early gives its last stage's map, not normalised).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt {output_fmt!r} is not supported; use 'NCHW' or 'NHWC'")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        x = self.pos_drop(self.patch_embed(check_image_size(x)))  # (B, H/4, W/4, C)
        stages = self.layers[:max_index + 1] if stop_early else self.layers
        intermediates = []
        for i, stage in enumerate(stages):
            out, x = stage(x)  # stage output, next stage input
            if i in take_indices:
                out_i = self.norm(out) if norm and i == len(self.layers) - 1 else out
                intermediates.append(out_i.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else out_i)
        if intermediates_only:
            return intermediates
        # The final norm is sized for the last stage.
        return (self.norm(out) if len(stages) == len(self.layers) else out), intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages, norm and head that the requested intermediates do not need.

        Pruning later stages drops the final norm and the head too (both are sized for the last
        stage); ``num_features`` becomes the last kept stage's width.

        Args:
            indices: as in :meth:`forward_intermediates`.
            prune_norm: replace the final norm by Identity.
            prune_head: replace the head by Identity, without pooling.

        Returns:
            The absolute stage indices kept for :meth:`forward_intermediates`.
        """
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        prune_end = max_index < len(self.layers) - 1
        self.layers = self.layers[:max_index + 1]
        if prune_end:
            self.layers[-1].downsample = None  # its output would feed a pruned stage
            self.num_features = self.head_hidden_size = self.stage_dims[max_index]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_stages(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Feature maps of all stages for dense prediction.

        Args:
            x: ``(B, in_chans, H, W)``, ``H, W`` multiples of 32.

        Returns:
            One ``(B, C_i, H / 2^(i+2), W / 2^(i+2))`` tensor per stage (before patch merging).
        """
        return self.forward_intermediates(x, intermediates_only=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` -> the normalised last map ``(B, H/32, W/32, num_features)``, unpooled."""
        x = self.pos_drop(self.patch_embed(check_image_size(x)))  # (B, H/4, W/4, C)
        for stage in self.layers:
            x = stage(x)[1]
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooling (``global_pool``) and the classifier.

        Args:
            x: normalised last map ``(B, H, W, C)`` from :meth:`forward_features`.
            pre_logits: return the pooled features ``(B, head_hidden_size)`` without the head.

        Returns:
            ``(B, num_classes)`` logits; with ``global_pool=""`` per position, ``(B, H, W, num_classes)``.
        """
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))  # (B, C)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` -> logits ``(B, num_classes)`` (pooled features if ``num_classes == 0``)."""
        return self.forward_head(self.forward_features(x))

    def macs(self, img_size: Union[int, Tuple[int, int]] = 224, reference: bool = True) -> int:
        """Multiply-accumulates of one forward pass of one image: :func:`models.flops.count_macs`."""
        from .flops import count_macs  # counting is flops' own module: the model needs it only here

        return count_macs(self, img_size, reference)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: CrossFormer) -> Dict[str, torch.Tensor]:
    """Weights of an official, foreign or own checkpoint in this model's key format.

    Accepts a checkpoint dict with the weights under ``model`` (the official release and this
    framework) or ``state_dict``, or a bare state dict; strips DDP's ``module.`` prefix; leaves out
    a classifier head that does not fit the model's (another number of classes, or a model
    without a head), so the model keeps its own, and says so in one WARNING (a plain script shows
    it). Other mismatches are left for ``load_state_dict`` to report. timm's builder (through
    :func:`_pretrained_filter_fn`) and ``models.build.load_pretrained`` both call it.

    Args:
        state_dict: the loaded checkpoint.
        model: the model the weights are for.

    Returns:
        A state dict with the model's key names.
    """
    if isinstance(state_dict.get("model"), dict):
        weights = state_dict["model"]
    elif isinstance(state_dict.get("state_dict"), dict):
        weights = state_dict["state_dict"]
    elif all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        weights = state_dict
    else:
        raise ValueError("the checkpoint holds no weights under 'model' or 'state_dict' and is not a state dict; "
                         "pass a checkpoint of this framework or an official CrossFormer release")
    weights = {key.removeprefix("module."): value for key, value in weights.items()}
    own = model.state_dict()
    head = [key for key in weights if key.startswith("head.")]
    own_head = [key for key in own if key.startswith("head.")]
    if any(key not in own or weights[key].shape != own[key].shape for key in head):
        _logger.warning("the checkpoint's classifier head (%s) does not fit the model's (%s): the model keeps its "
                        "own, freshly initialised", ", ".join(f"{key} {tuple(weights[key].shape)}" for key in head),
                        ", ".join(f"{key} {tuple(own[key].shape)}" for key in own_head) or "none")
        for key in head:
            del weights[key]
    elif own_head and not head:
        _logger.warning("the checkpoint has no classifier head: the model keeps its own, freshly initialised")
    return weights


def _pretrained_filter_fn(state_dict: Dict[str, Any], model: CrossFormer, source_names: Optional[Sequence[str]] = None,
                          wanted_names: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
    """:func:`checkpoint_filter_fn` for timm's builder, whose load is strict.

    The file's head is kept when it fits, when the pretrained config's class count is the model's
    (else timm's builder drops it) and, where both are named, when its classes are the ones asked
    for (``label_names``); otherwise the model's fresh head takes its place, with one WARNING.
    Every other tensor stays strict.

    Args:
        state_dict: the loaded file.
        model: the model being built (its ``pretrained_cfg`` describes the file).
        source_names: the file's class names, if it names them.
        wanted_names: the class names the caller asked for (``pretrained_cfg_overlay``'s ``label_names``).
    """
    weights = checkpoint_filter_fn(state_dict, model)
    head = [key for key in weights if key.startswith("head.")]
    source_classes = model.pretrained_cfg.get("num_classes")
    reason = ""
    if head and source_classes != model.num_classes:
        reason = f"the weights are for {source_classes} classes, the model has {model.num_classes}"
    elif head and source_names and wanted_names and list(source_names) != list(wanted_names):
        index = next((i for i, (a, b) in enumerate(zip(source_names, wanted_names)) if a != b), len(source_names))
        reason = (f"the weights' classes are not the ones asked for (class {index}: "
                  f"{_name_at(source_names, index)} in the file, {_name_at(wanted_names, index)} in label_names)")
    if reason:
        _logger.warning("the classifier head of the pretrained weights is replaced by a fresh one: %s", reason)
        for key in head:
            del weights[key]
    if not any(key.startswith("head.") for key in weights):
        weights.update((key, value) for key, value in model.state_dict().items() if key.startswith("head."))
    return weights


def _name_at(names: Sequence[str], index: int) -> str:
    return repr(names[index]) if index < len(names) else "none"


def _refuse_training_checkpoint(module: nn.Module, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
    """A load_state_dict pre-hook: a whole training checkpoint of ours given as a state dict is one clear
    error (timm's ``train.py --resume`` passes it so), not hundreds of lines of unexpected keys."""
    if not prefix and "format_version" in state_dict and isinstance(state_dict.get("model"), dict):
        raise ValueError(
            f"this is a training checkpoint of the CrossFormer framework (format_version "
            f"{state_dict['format_version']}), not a state dict: its optimizer, schedule and data position are this "
            "framework's, so timm's train.py cannot --resume it; start from its weights with --initial-checkpoint "
            "FILE (or --pretrained --pretrained-path FILE, which builds the file's architecture), or resume it with "
            "main.py --resume FILE")


# The CEL stem's four convolutions (kernels 4, 8, 16, 32): every one reads the image, so each is a
# first conv for timm, which adapts each one's weights to another ``in_chans`` (adapt_input_conv:
# summed over RGB for one channel, cycled and rescaled for more), independently and exactly as
# for a single-conv stem, since each is linear in the input channels.
STEM_CONVS = tuple(f"patch_embed.projs.{i}" for i in range(4))


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    """Pretrained config of a variant: the official evaluation (224, crop 0.875, bicubic, ImageNet mean / std)."""
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "first_conv": STEM_CONVS,
        "classifier": "head", "license": "mit", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "crossformer_t": _cfg(),
    "crossformer_s": _cfg(),
    "crossformer_b": _cfg(),
    "crossformer_l": _cfg(),
    "crossformerpp_s": _cfg(),
    "crossformerpp_b": _cfg(),
    "crossformerpp_l": _cfg(),
    "crossformerpp_h": _cfg(),
})

def _create_crossformer(variant: str, pretrained: bool, model_args: Dict[str, Any], **kwargs: Any) -> CrossFormer:
    """Build a variant through timm's builder (``pretrained_cfg``, ``features_only``, checkpoint filter).

    Args:
        variant: registered name.
        pretrained: load weights from the source timm's pretrained config names: a file
            (``pretrained_cfg_overlay=dict(file=PATH)``: one of our checkpoints or exports, an
            official release, a bare state dict), a Hub folder (``"local-dir:DIR"``,
            ``"hf-hub:ORG/NAME"``), a ``state_dict``, or an explicit ``url`` / ``hf_hub_id``. A
            file of ours builds the architecture it stores (:func:`_from_stored_file`).
        model_args: the variant's constructor arguments; ``kwargs`` replace them.
        **kwargs: constructor arguments and timm's builder arguments; ``out_indices``,
            ``feature_cls`` and a ``feature_cfg`` dict refine the default feature extractor (timm's
            ``getter``: :meth:`CrossFormer.forward_intermediates`, all four stages).
    """
    filter_fn = _pretrained_filter_fn
    if pretrained:
        kwargs, names = _weight_source(variant, model_args, kwargs)
        filter_fn = partial(_pretrained_filter_fn, **names)
    kwargs = dict(model_args, **kwargs)
    feature_cfg = dict(feature_cls="getter", out_indices=tuple(range(len(kwargs["depths"]))))
    feature_cfg.update(kwargs.pop("feature_cfg", None) or {})
    if "out_indices" in kwargs:  # the builder takes it only with features_only; the model never
        feature_cfg["out_indices"] = kwargs.pop("out_indices")
    model = build_model_with_cfg(
        CrossFormer, variant, pretrained, pretrained_filter_fn=filter_fn, feature_cfg=feature_cfg, **kwargs,
    )
    model.register_load_state_dict_pre_hook(_refuse_training_checkpoint)
    return model


def _weight_source(variant: str, model_args: Dict[str, Any],
                   kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Optional[Sequence[str]]]]:
    """The builder's arguments for ``pretrained=True``; ``(kwargs, class names for the head's filter)``.

    Raises:
        ValueError: no weight source named (nothing is downloaded unless a ``url`` / ``hf_hub_id`` is
            given), or a file of another architecture than the one asked for.
    """
    kwargs = dict(kwargs)
    given = resolve_pretrained_cfg(variant, kwargs.pop("pretrained_cfg", None)).to_dict()
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    merged = {**given, **overlay}
    wanted = overlay.get("label_names")
    if merged.get("source") in ("local-dir", "hf-hub"):  # timm read its config.json: model_args are in kwargs
        source_names = given.get("label_names")
    elif merged.get("file") and not merged.get("state_dict"):
        stored, names = read_stored_info(merged["file"])
        if stored:
            given, kwargs = _from_stored_file(variant, merged["file"], stored, names, given, model_args, kwargs)
            source_names, wanted = given.get("label_names"), wanted or merged.get("label_names")
        else:  # no stored classes: the head's shape decides (_pretrained_filter_fn), never the count alone
            overlay = {"num_classes": kwargs.get("num_classes", model_args.get("num_classes", 1000)), **overlay}
            source_names = None
    elif merged.get("state_dict") is not None:
        overlay = {"num_classes": kwargs.get("num_classes", model_args.get("num_classes", 1000)), **overlay}
        source_names = None
    elif merged.get("url") or merged.get("hf_hub_id"):  # named by the caller: timm downloads, as for any model
        source_names = None
    else:
        raise ValueError(
            f"pretrained=True for {variant} names no weights: pass pretrained_cfg_overlay=dict(file=PATH) (a "
            "checkpoint or export of this framework, an official release), create it from a Hub folder "
            "(timm.create_model('local-dir:DIR' or 'hf-hub:ORG/NAME', pretrained=True)), or load a file into a "
            "model with models.load_pretrained (--pretrained in main.py)")
    source_classes = {**given, **overlay}.get("num_classes")
    if kwargs.get("num_classes", source_classes) != source_classes:
        given.pop("label_names", None)  # the model's outputs are not the file's classes
    kwargs["pretrained_cfg"], kwargs["pretrained_cfg_overlay"] = given, overlay
    return kwargs, {"source_names": source_names, "wanted_names": wanted}


def _from_stored_file(variant: str, path: str, stored: Dict[str, Any], names: Optional[List[str]],
                      given: Dict[str, Any], model_args: Dict[str, Any],
                      kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The pretrained config and constructor arguments for a file that stores its training config.

    The file's architecture (its variant and ``MODEL.CROSSFORMER.*`` widths) is built; an argument
    that contradicts it is one error naming both. The pretrained config carries the file's classes
    (``num_classes``, ``label_names``), input size and eval transform.
    """
    name, stored_args = stored_architecture(stored)
    architecture = {arg: _plain(stored_args.get(arg, model_args[arg])) for arg in ARCH_KEYS}
    described = " ".join(f"{arg}={value}" for arg, value in architecture.items())
    if name and name != variant:
        raise ValueError(f"{path} holds a {name} ({described}), not a {variant}: create it as "
                         f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file=...))")
    for arg, value in architecture.items():
        if arg in kwargs and _plain(kwargs[arg]) != value:
            raise ValueError(f"{path} holds a {variant} with {described}, but {arg}={_plain(kwargs[arg])} was asked "
                             f"for: drop {arg} to build the file's architecture, or pass weights of that architecture")
    kwargs = dict(kwargs, **{arg: value for arg, value in stored_args.items() if arg not in kwargs})
    return dict(given, **stored_data_config(stored, names)), kwargs


def _plain(value: Any) -> Any:
    """A width argument in one form (JSON and YAML give lists, the variants tuples)."""
    return list(value) if isinstance(value, (list, tuple)) else value


_CROSSFORMER = dict(group_size=(7, 7, 7, 7), crs_interval=(8, 4, 2, 1), use_acl=False)
_CROSSFORMERPP = dict(group_size=(4, 4, 14, 7), crs_interval=(4, 2, 1, 1), use_acl=True)


@register_model
def crossformer_t(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer-T: 27.8M params, 2.9 GMACs at 224."""
    model_args = dict(embed_dim=64, depths=(1, 1, 8, 6), num_heads=(2, 4, 8, 16), drop_path_rate=0.1, **_CROSSFORMER)
    return _create_crossformer("crossformer_t", pretrained, model_args, **kwargs)


@register_model
def crossformer_s(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer-S: 30.7M params, 4.9 GMACs at 224."""
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2, **_CROSSFORMER)
    return _create_crossformer("crossformer_s", pretrained, model_args, **kwargs)


@register_model
def crossformer_b(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer-B: 52.0M params, 9.2 GMACs at 224."""
    model_args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3, **_CROSSFORMER)
    return _create_crossformer("crossformer_b", pretrained, model_args, **kwargs)


@register_model
def crossformer_l(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer-L: 92.0M params, 16.1 GMACs at 224."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5, **_CROSSFORMER)
    return _create_crossformer("crossformer_l", pretrained, model_args, **kwargs)


@register_model
def crossformerpp_s(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer++-S: 23.3M params, 4.4 GMACs at 224."""
    model_args = dict(embed_dim=64, depths=(2, 2, 18, 2), num_heads=(2, 4, 8, 16), drop_path_rate=0.2, **_CROSSFORMERPP)
    return _create_crossformer("crossformerpp_s", pretrained, model_args, **kwargs)


@register_model
def crossformerpp_b(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer++-B: 52.0M params, 9.6 GMACs at 224."""
    model_args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3, **_CROSSFORMERPP)
    return _create_crossformer("crossformerpp_b", pretrained, model_args, **kwargs)


@register_model
def crossformerpp_l(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer++-L: 92.0M params, 16.7 GMACs at 224."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5, **_CROSSFORMERPP)
    return _create_crossformer("crossformerpp_l", pretrained, model_args, **kwargs)


@register_model
def crossformerpp_h(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer++-H: 96.0M params, 22.0 GMACs at 224."""
    model_args = dict(embed_dim=128, depths=(6, 6, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5, **_CROSSFORMERPP)
    return _create_crossformer("crossformerpp_h", pretrained, model_args, **kwargs)
