"""Fused linears over compressed weights: ``linear(x, <format>_weight(...), bias)`` as one op.

The passes emit the weight formats as rebuild ops feeding a plain ``linear`` (every
backend lowers that). A GPU kernel wants the pair fused, so the weight is decoded in
registers next to the multiply and never exists densely in memory:

    graphpress::lut_linear(x, indices, codebook, bits, in_features, group_rows, bias)
    graphpress::nm_linear(x, values, positions, n, m, in_features, bias)
    graphpress::shift_linear(x, codes, scale, min_exponent, max_exponent, in_features, bias)
    graphpress::int_linear(x, codes, scales, zeros, bits, block_size, in_features, bias)

Each reference is the unfused pair (so the fused graph computes exactly what the
unfused one did); the CUDA backend registers Triton kernels as their CUDA
implementations and rewrites the pairs into these ops (:mod:`graphpress.backends.cuda`).

Decode attention, for the same kernels' sake: ``decode_attention`` (one query token over
the whole cache, KV heads shared by groups of query heads: GQA, and MLA's absorbed form
with one latent KV head) and ``quantized_decode_attention`` (over a KIVI cache: packed
keys per channel, packed values per token, then the full-precision recent tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .int_weight import int_weight_reference
from .kv_quant import kv_dequantize_reference
from .lut import lut_weight_reference
from .nm_sparse import nm_weight_reference
from .shift import shift_weight_reference


def _out(x: Tensor, out_features: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def lut_linear_reference(
    x: Tensor, indices: Tensor, codebook: Tensor, bits: int, in_features: int, group_rows: int, bias: Tensor | None
) -> Tensor:
    """x @ lut_weight(...)^T + bias."""
    weight = lut_weight_reference(indices, codebook, bits, in_features, group_rows)
    return torch.nn.functional.linear(x, weight.to(x.dtype), bias)


lut_linear = torch.library.custom_op("graphpress::lut_linear", lut_linear_reference, mutates_args=())


@lut_linear.register_fake
def _(x, indices, codebook, bits, in_features, group_rows, bias):
    return _out(x, indices.shape[0])


def nm_linear_reference(
    x: Tensor, values: Tensor, positions: Tensor, n: int, m: int, in_features: int, bias: Tensor | None
) -> Tensor:
    """x @ nm_weight(...)^T + bias."""
    weight = nm_weight_reference(values, positions, n, m, in_features)
    return torch.nn.functional.linear(x, weight.to(x.dtype), bias)


nm_linear = torch.library.custom_op("graphpress::nm_linear", nm_linear_reference, mutates_args=())


@nm_linear.register_fake
def _(x, values, positions, n, m, in_features, bias):
    return _out(x, values.shape[0])


def shift_linear_reference(
    x: Tensor, codes: Tensor, scale: Tensor, min_exponent: int, max_exponent: int, in_features: int, bias: Tensor | None
) -> Tensor:
    """x @ shift_weight(...)^T + bias."""
    weight = shift_weight_reference(codes, scale, min_exponent, max_exponent, in_features)
    return torch.nn.functional.linear(x, weight.to(x.dtype), bias)


shift_linear = torch.library.custom_op("graphpress::shift_linear", shift_linear_reference, mutates_args=())


@shift_linear.register_fake
def _(x, codes, scale, min_exponent, max_exponent, in_features, bias):
    return _out(x, codes.shape[0])


def int_linear_reference(
    x: Tensor,
    codes: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bits: int,
    block_size: int,
    in_features: int,
    bias: Tensor | None,
) -> Tensor:
    """x @ int_weight(...)^T + bias."""
    weight = int_weight_reference(codes, scales, zeros, bits, block_size, in_features)
    return torch.nn.functional.linear(x, weight.to(x.dtype), bias)


int_linear = torch.library.custom_op("graphpress::int_linear", int_linear_reference, mutates_args=())


@int_linear.register_fake
def _(x, codes, scales, zeros, bits, block_size, in_features, bias):
    return _out(x, codes.shape[0])


FUSED = {
    torch.ops.graphpress.lut_weight.default: torch.ops.graphpress.lut_linear.default,
    torch.ops.graphpress.nm_weight.default: torch.ops.graphpress.nm_linear.default,
    torch.ops.graphpress.shift_weight.default: torch.ops.graphpress.shift_linear.default,
    torch.ops.graphpress.int_weight.default: torch.ops.graphpress.int_linear.default,
}
"""weight-format op -> the fused linear op taking the same arguments after x (and the bias last)."""

DECOMPOSITIONS = {
    torch.ops.graphpress.lut_linear.default: lut_linear_reference,
    torch.ops.graphpress.nm_linear.default: nm_linear_reference,
    torch.ops.graphpress.shift_linear.default: shift_linear_reference,
    torch.ops.graphpress.int_linear.default: int_linear_reference,
}


# ------------------------------------------------------------------ decode attention
def _grouped_heads(x: Tensor, heads: int) -> Tensor:
    """(B, kv_heads, T, D) -> (B, heads, T, D): each KV head serves heads / kv_heads query heads."""
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def decode_attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float, keep: Tensor | None) -> Tensor:
    """One decoding step's attention: q (B, H, 1, Dk) over the cached tokens of k (B, Hkv, T, Dk),
    v (B, Hkv, T, Dv); H a multiple of Hkv (GQA; Hkv = 1 is MLA's absorbed form, Dv may differ).
    With ``keep`` (B or 1, T) bool, batch b attends token t where keep[b, t] (the step's mask)."""
    heads = q.shape[1]
    scores = (q.float() @ _grouped_heads(k, heads).float().transpose(-1, -2)) * scale
    if keep is not None:
        scores = scores.masked_fill(~keep.bool().reshape(keep.shape[0], 1, 1, -1), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ _grouped_heads(v, heads).float()).to(q.dtype)


decode_attention = torch.library.custom_op("graphpress::decode_attention", decode_attention_reference, mutates_args=())


@decode_attention.register_fake
def _(q, k, v, scale, keep):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def quantized_decode_attention_reference(
    q: Tensor,
    k_packed: Tensor,
    k_scale: Tensor,
    k_zero: Tensor,
    v_packed: Tensor,
    v_scale: Tensor,
    v_zero: Tensor,
    k_recent: Tensor,
    v_recent: Tensor,
    k_bits: int,
    k_group: int,
    v_bits: int,
    v_group: int,
    scale: float,
    keep: Tensor | None,
) -> Tensor:
    """Decode attention over a KIVI cache: keys quantized per channel (groups of k_group tokens),
    values per token (groups of v_group channels), then the full-precision recent tokens
    (token indices run on from the quantized ones, for ``keep``)."""
    keys = torch.cat([kv_dequantize_reference(k_packed, k_scale, k_zero, k_bits, k_group, True), k_recent.float()], 2)
    values = torch.cat(
        [kv_dequantize_reference(v_packed, v_scale, v_zero, v_bits, v_group, False), v_recent.float()], 2
    )
    return decode_attention_reference(q, keys, values, scale, keep)


quantized_decode_attention = torch.library.custom_op(
    "graphpress::quantized_decode_attention", quantized_decode_attention_reference, mutates_args=()
)


@quantized_decode_attention.register_fake
def _(
    q,
    k_packed,
    k_scale,
    k_zero,
    v_packed,
    v_scale,
    v_zero,
    k_recent,
    v_recent,
    k_bits,
    k_group,
    v_bits,
    v_group,
    scale,
    keep,
):
    return q.new_empty((*q.shape[:-1], v_recent.shape[-1]))


DECOMPOSITIONS.update(
    {
        torch.ops.graphpress.decode_attention.default: decode_attention_reference,
        torch.ops.graphpress.quantized_decode_attention.default: quantized_decode_attention_reference,
    }
)
