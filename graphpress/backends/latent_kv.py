"""Rewrite rule: absorbed MLA over a latent cache -> attention over one key/value head.

gqa_to_mla's absorbed form (TransMLA; DeepSeek-V2's MLA, eq. 10-11 absorbed) attends every
query head to one shared key [c, k_rope] and one shared value c, from two cache entries: the
latent c (r numbers a token) and the RoPE key (d numbers). That is multi-query attention with
one KV head, except that GroupQueryAttention (onnxruntime's op; :mod:`.fuse_gqa` lowers to it)
wants keys and values of the query's head size. So the value becomes the key itself and the
output keeps its first r channels:

    softmax(q [c, k_rope]^T) [c, k_rope] [:, :r]  =  softmax(q [c, k_rope]^T) c

exactly (each output channel is its own weighted sum). The cache becomes a ``key`` and a
``value`` entry of one head of r + d channels: twice the latent, the price of the op's one
head size (still (r + d) / (kv_heads * head_dim) of the original cache). kv_cache_quant's
static-scale codes carry over: per-channel codes concatenated are the codes of the
concatenation (4-bit pairs align, r being even), under the concatenated scales.

Pattern: ``scaled_dot_product_attention(q, unsqueeze(cat([C, R], -1), 1), unsqueeze(C, 1))``,
C and R each a cache entry's ``cat([past, new])`` (or ``kv_dequantize_static`` of one of
codes whose new part is ``kv_quantize_static`` of the new tokens, both entries at one width),
read by nothing else.
"""

from __future__ import annotations

import torch
from torch import fx

from ..ir import Graph, SubgraphBuilder
from ..ir.decode import CacheEntry
from .fuse_gqa import read_cache

aten = torch.ops.aten
QUANTIZE = torch.ops.graphpress.kv_quantize_static.default
DEQUANTIZE = torch.ops.graphpress.kv_dequantize_static.default


def latent_as_key_value(graph: Graph) -> tuple[Graph, int, list[str]]:
    """A copy of ``graph`` with each absorbed latent attention reading a key and a value cache entry of one head;
    how many; a sentence for each latent attention that was not rewritten."""
    work = graph.clone()
    rewritten, notes = 0, []
    for sdpa in [n for n in work.nodes if n.target is aten.scaled_dot_product_attention.default]:
        match = _match(work, sdpa)
        if isinstance(match, str):
            notes.append(f"{sdpa.name}: latent cache kept (no GroupQueryAttention): {match}")
        elif match is not None:
            _rewrite(work, sdpa, *match)
            rewritten += 1
    if rewritten:
        work.fx.lint()
    return work, rewritten, notes


def _match(graph: Graph, sdpa: fx.Node) -> tuple | str | None:
    """(latent read, RoPE-key read) of an absorbed latent attention; the reason it cannot be rewritten; or None
    where ``sdpa`` is not one."""
    _, k, v = sdpa.args[:3]
    if not (_is(k, aten.unsqueeze.default, 1) and _is(v, aten.unsqueeze.default, 1)):
        return None
    joined, latent = k.args[0], v.args[0]
    if not (_is(joined, aten.cat.default) and joined.args[1:] in ((-1,), (2,)) and len(joined.args[0]) == 2):
        return None
    if joined.args[0][0] is not latent:
        return None
    reads = [read_cache(graph, t) for t in joined.args[0]]
    if any(isinstance(read, str) for read in reads):
        return None
    reads = [(entry, new, scale, bits) for entry, _, new, scale, bits in reads]
    (c, _, c_scale, bits), (r, _, r_scale, r_bits) = reads
    if bits != r_bits:
        return f"{c.name} is cached in {bits or 'no'} bits and {r.name} in {r_bits or 'no'}: the op has one width"
    readers = [u for t in joined.args[0] for u in t.users if u.op != "output"]
    if set(readers) != {joined, v}:
        return f"{c.name} or {r.name} is read by more than this attention"
    return reads


def _is(node, target, *args) -> bool:
    return isinstance(node, fx.Node) and node.target is target and (not args or tuple(node.args[1:]) == args)


def _rewrite(graph: Graph, sdpa: fx.Node, latent: tuple, rope_key: tuple) -> None:
    (c, c_new, c_scale, bits), (r, r_new, r_scale, _) = latent, rope_key
    rank = c.shape[-1] * (2 if c.dtype == "uint8" else 1)
    base = c.name.removesuffix(f".{c.kind}")  # layers.i
    suffix = ".codes" if bits else ""
    width = c.shape[-1] + r.shape[-1]
    b = SubgraphBuilder(graph, base, sdpa)
    with graph.fx.inserting_before(sdpa):
        new = b.call(aten.unsqueeze.default, b.call(aten.cat.default, [c_new, r_new], -1), 1)
        if bits:
            both = torch.cat([graph.weight(graph.tensor_name(s)) for s in (c_scale, r_scale)], -1)
            scale = graph.add_buffer(f"kv_cache_quant.{base}.key.scale", both.reshape(1, 1, 1, -1))
            new = b.call(QUANTIZE, new, scale, bits)
    entries = [
        CacheEntry(f"{base}.{part}{suffix}", f"{part}{suffix}", (None, 1, None, width), 2, c.dtype)
        for part in ("key", "value")
    ]

    def build(past: list[fx.Node]) -> list[fx.Node]:
        with graph.fx.inserting_before(sdpa):
            present = [b.call(aten.cat.default, [p, new], 2) for p in past]
            key, value = (b.call(DEQUANTIZE, p, scale, bits) for p in present) if bits else present
            out = b.call(sdpa.target, sdpa.args[0], key, value, *sdpa.args[3:], **sdpa.kwargs)
            graph.substitute(sdpa, b.call(aten.slice.Tensor, out, -1, 0, rank))
        return present

    graph.replace_cache_entries([c.name, r.name], entries, build)
