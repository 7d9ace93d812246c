"""Rewrite rule: a decode step's attention -> ``decode_attention`` / ``quantized_decode_attention``.

Pattern: ``scaled_dot_product_attention(q, k, v, mask)`` with one query token (a step graph
captured on one token: ``capture.step_tokens: 1``), no dropout or is_causal, where
  * k and v are the cache tensors, possibly repeated over query-head groups
    (``repeat_interleave(x, g, 1)`` or ``reshape(expand(unsqueeze(x, 2)))``, repeat_kv): the
    rule reads x, and the kernel maps query heads to KV heads instead of reading copies;
  * the mask is absent, or a boolean (B or 1, 1, 1, T) over the T cached tokens (causal,
    padding, window: whatever the model built): it becomes the op's ``keep`` (B, T).
If k is ``cat([kv_dequantize(per channel), recent])`` and v ``cat([kv_dequantize(per
token), recent])`` (kv_cache_quant, asymmetric, no rotation), the quantized op reads the
packed codes directly. Check: same output shape and dtype. Anything else is left alone.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch import fx

from ...ir import Graph, SubgraphBuilder
from ...ir.blocks import unrepeated

aten = torch.ops.aten


def key_mask(mask, length) -> bool:
    """Whether ``mask`` is a boolean (B or 1, 1, 1, length): one query's mask over the cached tokens."""
    val = mask.meta.get("val") if isinstance(mask, fx.Node) else None
    if val is None or val.dtype != torch.bool or val.dim() != 4:
        return False
    return str(val.shape[1]) == "1" and str(val.shape[2]) == "1" and str(val.shape[3]) == str(length)


def _kivi(x: fx.Node, per_channel: bool) -> tuple | None:
    """(packed, scale, zero, bits, group, recent) of ``cat([kv_dequantize(...), recent], 2)``."""
    if x.target is not aten.cat.default or len(x.args[0]) != 2 or (x.args[1] if len(x.args) > 1 else 0) != 2:
        return None
    dequantized, recent = x.args[0]
    if not isinstance(dequantized, fx.Node) or dequantized.target is not torch.ops.graphpress.kv_dequantize.default:
        return None
    packed, scale, zero, bits, group, channel = dequantized.args
    if zero is None or channel != per_channel:
        return None
    return packed, scale, zero, bits, group, recent


def fuse_decode_attention(graph: Graph) -> tuple[Graph, Counter]:
    """A copy of ``graph`` with every matching decode attention fused; how many of each op it holds."""
    work = graph.clone()
    fused: Counter[str] = Counter()
    sdpa_nodes = [
        n for n in work.nodes if n.op == "call_function" and n.target is aten.scaled_dot_product_attention.default
    ]
    for sdpa in sdpa_nodes:
        q, k, v = sdpa.args[:3]
        options = dict(zip(("attn_mask", "dropout_p", "is_causal"), sdpa.args[3:]), **sdpa.kwargs)
        q_shape = q.meta["val"].shape
        if options.get("dropout_p", 0.0) or options.get("is_causal") or len(q_shape) != 4 or str(q_shape[2]) != "1":
            continue
        mask = options.get("attn_mask")
        if mask is not None and not key_mask(mask, k.meta["val"].shape[2]):
            continue
        keys, values = unrepeated(k), unrepeated(v)
        kv_heads = keys.meta["val"].shape[1]
        if not isinstance(kv_heads, int) or q_shape[1] % kv_heads:
            continue
        scale = options.get("scale") or 1 / math.sqrt(q_shape[-1])
        b = SubgraphBuilder(work, "", sdpa)
        quantized_k, quantized_v = _kivi(keys, True), _kivi(values, False)
        with work.fx.inserting_before(sdpa):
            keep = b.call(aten.squeeze.dims, mask, [1, 2]) if mask is not None else None
            if quantized_k and quantized_v:
                kp, ks, kz, k_bits, k_group, k_recent = quantized_k
                vp, vs, vz, v_bits, v_group, v_recent = quantized_v
                op = torch.ops.graphpress.quantized_decode_attention.default
                args = (q, kp, ks, kz, vp, vs, vz, k_recent, v_recent, k_bits, k_group, v_bits, v_group, scale, keep)
            else:
                op = torch.ops.graphpress.decode_attention.default
                args = (q, keys, values, scale, keep)
            out = b.call(op, *args)
        if out.meta["val"].shape != sdpa.meta["val"].shape or out.meta["val"].dtype != sdpa.meta["val"].dtype:
            work.fx.erase_node(out)
            continue
        work.substitute(sdpa, out)
        fused[op.name()] += 1
    work.eliminate_dead_code()
    return work, fused
