"""Attention over a step's KV cache as onnxruntime runs it: ``com.microsoft::GroupQueryAttention``.

    graphpress::group_query_attention(query, key, value, past_key, past_value, attention_mask,
                                      position_ids, cos_cache, sin_cache, num_heads, kv_num_heads,
                                      scale, window, interleaved, k_scale, v_scale, bits)
        -> (output, present_key, present_value)

``query`` (B, S, H * D), ``key`` / ``value`` (B, S, Hkv * D): the step's S new tokens. With
tables ``cos_cache`` / ``sin_cache`` (positions, D / 2) the op applies RoPE to query and key at
``position_ids`` (half-split pairs, or interleaved ones): the op's ``do_rotary``; without, they
come rotated already. The cache is BNSH (B, Hkv, P, D); ``present = cat(past, new)`` on the
sequence axis. Which keys a query sees follows onnxruntime's contract, not a mask tensor:
``attention_mask`` only counts each row's tokens (its sum is the op's ``seqlens_k + 1``, its
width ``total_sequence_length``), the row's tokens are the first ones of its cache (right
padding), and the query s of S sits at position ``count - S + s``. It sees the keys at
positions up to its own, and with ``window`` W > 0 only the W newest of those (transformers'
sliding window, the op's ``local_window_size``). On unpadded batches that is the causal mask
a captured step builds from ``attention_mask``, which is what the rewrite into this op checks.

Quantized cache (``bits`` 8 or 4): onnxruntime's symmetric per-channel form with static
scales ``k_scale`` / ``v_scale`` (1, Hkv, 1, D), :func:`~graphpress.ir.ops.kv_quant.kv_quantize_static_reference`'s
codes; attention reads the dequantized cache, the step's new tokens too.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .contrib import contrib_op
from .kv_quant import kv_dequantize_static_reference, kv_quantize_static_reference


def group_query_attention_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    past_key: Tensor,
    past_value: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor | None,
    cos_cache: Tensor | None,
    sin_cache: Tensor | None,
    num_heads: int,
    kv_num_heads: int,
    scale: float,
    window: int,
    interleaved: bool,
    k_scale: Tensor | None,
    v_scale: Tensor | None,
    bits: int,
) -> tuple[Tensor, Tensor, Tensor]:
    size = query.shape[-1] // num_heads
    steps = query.shape[1]

    def heads(x: Tensor, n: int) -> Tensor:
        return x.unflatten(-1, (n, size)).transpose(1, 2)

    queries, new_key, new_value = heads(query, num_heads), heads(key, kv_num_heads), heads(value, kv_num_heads)
    if cos_cache is not None:
        queries = rotary(queries, cos_cache, sin_cache, position_ids, interleaved)
        new_key = rotary(new_key, cos_cache, sin_cache, position_ids, interleaved)
    if bits:
        present_key = torch.cat([past_key, kv_quantize_static_reference(new_key, k_scale, bits)], 2)
        present_value = torch.cat([past_value, kv_quantize_static_reference(new_value, v_scale, bits)], 2)
        keys, values = (
            kv_dequantize_static_reference(present_key, k_scale, bits),
            kv_dequantize_static_reference(present_value, v_scale, bits),
        )
    else:
        present_key, present_value = torch.cat([past_key, new_key], 2), torch.cat([past_value, new_value], 2)
        keys, values = present_key, present_value
    counts = attention_mask.sum(-1)
    positions = counts[:, None] - steps + torch.arange(steps, device=query.device)
    distance = positions[:, :, None] - torch.arange(keys.shape[2], device=query.device)
    keep = distance >= 0
    if window > 0:
        keep = keep & (distance < window)
    groups = num_heads // kv_num_heads
    out = torch.nn.functional.scaled_dot_product_attention(
        queries,
        keys.to(query.dtype).repeat_interleave(groups, 1),
        values.to(query.dtype).repeat_interleave(groups, 1),
        attn_mask=keep[:, None],
        scale=scale,
    )
    out = torch.where(keep.any(-1)[:, None, :, None], out, 0.0)  # a query with no key (padding): unspecified there
    return out.transpose(1, 2).flatten(2), present_key, present_value


def rotary(x: Tensor, cos_cache: Tensor, sin_cache: Tensor, position_ids: Tensor, interleaved: bool) -> Tensor:
    """RoPE on x (B, heads, S, D) at ``position_ids`` (B, S) from tables (positions, D / 2): dims i and i + D/2
    turn together, or 2i and 2i + 1 (interleaved)."""
    cos, sin = (t[position_ids][:, None].to(x.dtype) for t in (cos_cache, sin_cache))  # (B, 1, S, D / 2)
    if interleaved:
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([even * cos - odd * sin, odd * cos + even * sin], -1).flatten(-2)
    first, second = x.chunk(2, -1)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], -1)


group_query_attention = torch.library.custom_op(
    "graphpress::group_query_attention", group_query_attention_reference, mutates_args=()
)


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, *_):  # the shapes follow from these alone
    length = past_key.shape[2] + key.shape[1]
    return (
        query.new_empty(query.shape),
        past_key.new_empty((*past_key.shape[:2], length, past_key.shape[3])),
        past_value.new_empty((*past_value.shape[:2], length, past_value.shape[3])),
    )


def group_query_attention_onnx(
    query,
    key,
    value,
    past_key,
    past_value,
    attention_mask,
    position_ids,
    cos_cache,
    sin_cache,
    num_heads,
    kv_num_heads,
    scale,
    window,
    interleaved,
    k_scale,
    v_scale,
    bits,
):
    """``com.microsoft::GroupQueryAttention``, its ``seqlens_k`` and ``total_sequence_length`` counted from
    ``attention_mask`` as onnxruntime-genai's own models do."""
    from onnx import TensorProto
    from onnxscript import ir
    from onnxscript import opset18 as op

    def const(values, dtype):
        return op.Constant(value=ir.tensor(np.asarray(values, dtype=dtype)))

    counts = op.ReduceSum(attention_mask, const([1], np.int64), keepdims=0)
    seqlens_k = op.Cast(op.Sub(counts, const(1, np.int64)), to=TensorProto.INT32)
    total = op.Cast(op.Squeeze(op.Shape(attention_mask, start=1, end=2)), to=TensorProto.INT32)
    quantized = (
        {"kv_cache_bit_width": bits, "k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL"} if bits else {}
    )
    out, present_key, present_value = contrib_op("GroupQueryAttention", outputs=3)(
        query,
        key,
        value,
        past_key,
        past_value,
        seqlens_k,
        total,
        cos_cache,
        sin_cache,
        position_ids if cos_cache is not None else None,
        None,
        None,
        k_scale,
        v_scale,
        num_heads=num_heads,
        kv_num_heads=kv_num_heads,
        scale=scale,
        local_window_size=window if window > 0 else -1,
        do_rotary=int(cos_cache is not None),
        rotary_interleaved=int(interleaved),
        **quantized,
    )
    return out, present_key, present_value


ONNX_TRANSLATIONS = {torch.ops.graphpress.group_query_attention.default: group_query_attention_onnx}
DECOMPOSITIONS = {torch.ops.graphpress.group_query_attention.default: group_query_attention_reference}
