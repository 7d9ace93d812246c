"""Rewrite rule: a step graph's attention over its key/value cache -> ``group_query_attention``.

onnxruntime-genai runs attention as ``com.microsoft::GroupQueryAttention``: K/V heads read
in place by their query groups, the cache appended inside the op (no repeated heads, no
concatenated copy per step). :mod:`graphpress.ir.ops.gqa` states its semantics.

Pattern: ``scaled_dot_product_attention(q, k, v, mask)``, no dropout, where
  * k and v, seen through repeat_kv, are ``cat([past, new], 2)`` of a key and a value cache
    entry, and those concatenations are the graph's outputs for the entries and feed nothing
    else; or, for kv_cache_quant's static scales, ``kv_dequantize_static`` of such a
    concatenation of codes whose new part is ``kv_quantize_static`` of the new tokens under the
    same scale (the op's ``kv_cache_bit_width``, per-channel ``k_scale`` / ``v_scale``);
  * q is (B, H, S, D) with H a multiple of the entries' KV heads, and K and V heads have D;
  * the mask is what the op computes from ``attention_mask``: causal, or causal within a
    sliding window of W tokens. This is checked by evaluating the mask (only the nodes it
    depends on) on unpadded steps: a prompt, a step after a past, and one token after a past
    of :data:`LONG` tokens, which is where a window shows and is measured.
Rewrite: q, new k and new v flattened to (B, S, heads * D); the op's output unflattened for
the SDPA's users; its present key and value become the entries' outputs. Anything else is
left alone, with the reason.

RoPE moves into the op (its ``cos_cache`` / ``sin_cache`` at ``position_ids``) where q and the
new k are one whole-head RoPE (:func:`~graphpress.ir.blocks.match_rope`) by the same tables of a
head of a multiple of 16 dims, and those tables, evaluated at every position up to the context
length, are one angle per pair of dims that depends on the position alone; the op then takes q
and k as they were before the rotation. Otherwise RoPE stays ahead of the op, said.

The op counts each row's tokens from ``attention_mask``, so left-padded batches (which
graphpress's own runtime feeds) would read the wrong keys: the rule is for the
onnxruntime-genai runtime, whose batches this contract is.
"""

from __future__ import annotations

import math
import operator
from collections import Counter

import torch
from torch import fx

from ..ir import Graph, SubgraphBuilder
from ..ir.blocks import match_rope, unrepeated
from ..ir.decode import decode_example

aten = torch.ops.aten
GQA = torch.ops.graphpress.group_query_attention.default
QUANTIZE = torch.ops.graphpress.kv_quantize_static.default
DEQUANTIZE = torch.ops.graphpress.kv_dequantize_static.default
LONG = 2**16
"""Past length of the probe that measures a sliding window (a longer window is not seen)."""


def read_cache(graph: Graph, tensor, kind: str | None = None) -> tuple | str:
    """How an attention input reads a cache entry in full: (entry, grown = cat([past, new]), the new tokens in
    floats, static scale, bits), through kv_cache_quant's static dequantize where there is one; else the reason it
    is not such a read. ``kind``: the entry kind the read must have ('key', 'value'; codes as 'key.codes')."""
    scale, bits = None, 0
    if isinstance(tensor, fx.Node) and tensor.target is DEQUANTIZE:  # kv_cache_quant, scales 'static'
        tensor, scale, bits = tensor.args
    want = f"{kind}.codes" if kind and bits else kind
    entry = next((e for e in graph.cache if graph.cache_output(e.name) is tensor and want in (None, e.kind)), None)
    if entry is None:
        what = f"{want} cache" if want else "cache"
        return f"its {kind or 'input'}s are not a {what} entry's cat([past, new]) (a rewritten cache)"
    try:
        grown, new = graph.cache_append(entry.name)
    except ValueError as exc:
        return f"cache entry {entry.name}: {exc}"
    if bits:
        if new.target is not QUANTIZE or new.args[1:] != (scale, bits):
            return f"cache entry {entry.name} appends codes other than its own scale's"
        new = new.args[0]
    return entry, grown, new, scale, bits


def fuse_group_query_attention(graph: Graph, positions: int | None = None) -> tuple[Graph, Counter, list[str]]:
    """A copy of ``graph`` with each matching attention lowered; how many; a sentence for each one that was not
    (or whose RoPE stayed outside the op). With ``positions`` (the context length), RoPE moves into the op where
    its tables are a function of the positions alone."""
    work = graph.clone()
    windows: dict[fx.Node, int | str] = {}
    tables: dict[tuple, tuple | str] = {}
    buffers: list[tuple] = []
    lowered: Counter[str] = Counter()
    notes = []
    for sdpa in [
        n for n in work.nodes if n.op == "call_function" and n.target is aten.scaled_dot_product_attention.default
    ]:
        match = _match(work, sdpa)
        mask = match["mask"] if isinstance(match, dict) else None
        if mask is not None and mask not in windows:
            windows[mask] = _window(work, mask)
        reason = match if isinstance(match, str) else windows[mask]
        if isinstance(reason, str):
            notes.append(f"{_where(sdpa)}: not lowered to GroupQueryAttention: {reason}")
            continue
        rope = _rope(match["q"], match["new_k"]) if positions else None
        if isinstance(rope, tuple):
            rope = _rope_tables(work, sdpa, rope, positions, tables, buffers)
        if isinstance(rope, str):
            notes.append(f"{_where(sdpa)}: RoPE stays outside GroupQueryAttention: {rope}")
            rope = None
        _rewrite(work, sdpa, window=windows[mask], rope=rope, **{k: v for k, v in match.items() if k != "mask"})
        lowered[GQA.name()] += 1
    work.eliminate_dead_code()
    work.fx.lint()
    return work, lowered, notes


def _where(sdpa: fx.Node) -> str:
    stack = sdpa.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else ""
    return f"attention {path or sdpa.name}"


def _match(graph: Graph, sdpa: fx.Node) -> dict | str:
    q, k, v = sdpa.args[:3]
    options = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale"), sdpa.args[3:]), **sdpa.kwargs)
    if options.get("dropout_p") or options.get("is_causal") or options.get("attn_mask") is None:
        return "SDPA without an explicit mask, or with dropout"
    entries = {}
    for part, tensor in (("key", unrepeated(k)), ("value", unrepeated(v))):
        read = read_cache(graph, tensor, part)
        if isinstance(read, str):
            return read
        entry, grown, new, scale, bits = read
        readers = {sdpa} | _repeat_chain(k, grown) | _repeat_chain(v, grown)
        if any(u.op != "output" and u not in readers for u in grown.users):
            return f"cache entry {entry.name} is read by more than this attention"
        if new.meta["val"].dtype != q.meta["val"].dtype:
            return f"cache entry {entry.name} holds {new.meta['val'].dtype}, the query is {q.meta['val'].dtype}"
        entries[part] = (entry, grown, new, scale, bits)
    (key, grown_k, new_k, k_scale, bits), (value, grown_v, new_v, v_scale, v_bits) = entries["key"], entries["value"]
    if bits != v_bits:
        return f"keys are cached in {bits or 'no'} bits and values in {v_bits or 'no'}: the op has one width"
    batch, heads, _, size = q.meta["val"].shape
    kv_heads, key_size = new_k.meta["val"].shape[1], new_k.meta["val"].shape[3]
    value_heads, value_size = new_v.meta["val"].shape[1], new_v.meta["val"].shape[3]
    if not isinstance(heads, int) or heads % kv_heads or (key_size, value_size, value_heads) != (size, size, kv_heads):
        return f"q {heads} heads of {size}, K {kv_heads} x {key_size}, V {value_heads} x {value_size}: not GQA's shapes"
    return {
        "mask": options["attn_mask"],
        "q": q,
        "new_k": new_k,
        "new_v": new_v,
        "key": key.name,
        "value": value.name,
        "grown": (grown_k, grown_v),
        "scales": (k_scale, v_scale),
        "bits": bits,
        "heads": heads,
        "kv_heads": kv_heads,
        "scale": options.get("scale") or 1 / math.sqrt(size),
    }


def _repeat_chain(x: fx.Node, source: fx.Node) -> set[fx.Node]:
    """The nodes from ``source`` (excluded) to ``x`` along first arguments: repeat_kv's steps."""
    chain = set()
    while x is not source and isinstance(x, fx.Node) and x.op == "call_function":
        chain.add(x)
        x = x.args[0]
    return chain if x is source else set()


def _probe(graph: Graph, past: int, steps: int, positions: torch.Tensor | None = None) -> tuple:
    """One unpadded step's inputs for :meth:`Graph.evaluate`: ``steps`` tokens after ``past`` (at ``positions``,
    default past, past + 1, ...), the cache of zero-stride zeros (no memory: only what is evaluated runs)."""
    ids, _, default, cache = decode_example(graph.cache, 1, 0, steps)
    caches = []
    for entry, empty in zip(graph.cache, cache):
        shape = list(empty.shape)
        shape[entry.seq_axis] = past if entry.max_len is None else min(past, entry.max_len)
        caches.append(empty.new_zeros(()).expand(shape))
    attention = torch.ones(1, past + steps, dtype=torch.long)
    return ids, attention, default + past if positions is None else positions, caches


def _rope(q: fx.Node, new_k: fx.Node):
    """(query's RoPE, key's RoPE) where both are one whole-head rotation by the same tables; None where neither
    is rotated; else the reason."""
    rq, rk = match_rope(q), match_rope(new_k)
    if rq is None and rk is None:
        return None
    if rq is None or rk is None:
        return "only one of the query and key is rotated"
    if (rq.cos, rq.sin) != (rk.cos, rk.sin) or rq.interleaved != rk.interleaved or rq.partial or rk.partial:
        return "the query and key are rotated differently, or on part of the head"
    if rq.out.meta["val"].shape[-1] % 16:
        return f"onnxruntime rotates heads of a multiple of 16 dims, these have {rq.out.meta['val'].shape[-1]}"
    return rq, rk


def _rope_tables(graph: Graph, sdpa: fx.Node, rope: tuple, positions: int, tables: dict, buffers: list) -> tuple | str:
    """(the RoPE matches, the op's cos / sin cache buffers), or the reason there are none. ``tables`` remembers
    what each pair of RoPE nodes gave; ``buffers`` holds one pair of buffers per distinct table (layers read the
    same angles through nodes of their own)."""
    key = rope[0].cos, rope[0].sin
    if key not in tables:
        found = _tables(graph, rope[0], positions)
        if not isinstance(found, str):
            same = next((nodes for values, nodes in buffers if all(map(torch.equal, values, found))), None)
            if same is None:
                with graph.fx.inserting_before(sdpa):
                    name = f"group_query_attention.rope{len(buffers)}"
                    same = tuple(graph.add_buffer(f"{name}.{n}_cache", t) for n, t in zip(("cos", "sin"), found))
                buffers.append((found, same))
            found = same
        tables[key] = found
    return tables[key] if isinstance(tables[key], str) else (rope, tables[key])


def _tables(graph: Graph, rope, positions: int) -> tuple[torch.Tensor, torch.Tensor] | str:
    """The op's cos / sin caches (positions, D / 2), read off the graph's own RoPE tables at 0 .. positions - 1,
    if those are a function of the positions alone with one angle per pair of dims; else the reason."""
    size = rope.out.meta["val"].shape[-1]

    def at(past: int, steps: int, where=None) -> list[torch.Tensor]:
        return [t.reshape(-1, size) for t in graph.evaluate([rope.cos, rope.sin], _probe(graph, past, steps, where))]

    probes = [torch.tensor([[positions - 1, 3]]), torch.tensor([[3, 1]])]  # a long and a short context
    try:
        cos, sin = at(0, positions)
        moved = [(where, at(5, 2, where)) for where in probes]
    except Exception as exc:  # tables that cannot be evaluated alone are not ones this rule knows
        return f"its RoPE tables could not be evaluated on their own ({type(exc).__name__})"
    pairs = (
        (slice(0, None, 2), slice(1, None, 2)) if rope.interleaved else (slice(0, size // 2), slice(size // 2, None))
    )
    if len(cos) != positions or not all(torch.equal(t[:, pairs[0]], t[:, pairs[1]]) for t in (cos, sin)):
        return "its RoPE tables are not one angle per pair of dims over the positions"
    if not all(torch.equal(m, t[where[0]]) for where, found in moved for m, t in zip(found, (cos, sin))):
        return "its RoPE tables depend on more than the positions (a context-dependent scaling)"
    return cos[:, pairs[0]].contiguous(), sin[:, pairs[0]].contiguous()


def _window(graph: Graph, mask: fx.Node) -> int | str:
    """-1 if ``mask`` is the causal mask of unpadded steps, W if it is causal within W tokens; else the reason."""
    val = mask.meta.get("val")
    if val is None or val.dim() != 4:
        return "its mask is not a (batch, heads, query, key) tensor"

    def keep(past: int, steps: int) -> torch.Tensor:
        (value,) = graph.evaluate([mask], _probe(graph, past, steps))
        allowed = value if value.dtype == torch.bool else value > torch.finfo(value.dtype).min / 2
        return allowed.expand(1, 1, steps, past + steps)[0, 0]

    def expected(past: int, steps: int, window: int) -> torch.Tensor:
        distance = (past + torch.arange(steps))[:, None] - torch.arange(past + steps)
        return (distance >= 0) & ((distance < window) if window > 0 else True)

    try:
        seen = int(keep(LONG, 1).sum())
        window = -1 if seen == LONG + 1 else seen
        probes = [(0, 5), (3, 2)] + ([(window + 3, 2)] if window > 0 else [])
        if all(torch.equal(keep(p, s), expected(p, s, window)) for p, s in probes):
            return window
    except Exception as exc:  # a mask that cannot be evaluated alone is not one this rule knows
        return f"its mask could not be evaluated on its own ({type(exc).__name__})"
    return "its mask is not causal (nor causal within a sliding window) on unpadded steps"


def _rewrite(
    graph: Graph, sdpa: fx.Node, q, new_k, new_v, key, value, grown, scales, bits, heads, kv_heads, scale, window, rope
) -> None:
    b = SubgraphBuilder(graph, "", sdpa)
    size = q.meta["val"].shape[-1]
    rotary, interleaved = (None, None, None), False
    if rope is not None:  # the op rotates: it takes q and k as they were before RoPE
        (rq, rk), (cos, sin) = rope
        q, new_k, interleaved = rq.x, rk.x, rq.interleaved
        rotary = (graph.step_input("position_ids"), cos, sin)
    with graph.fx.inserting_before(sdpa):

        def flat(x: fx.Node) -> fx.Node:
            return b.call(aten.flatten.using_ints, b.call(aten.transpose.int, x, 1, 2), 2)

        mask = graph.step_input("attention_mask")
        args = (flat(q), flat(new_k), flat(new_v), graph.cache_input(key), graph.cache_input(value), mask)
        config = (heads, kv_heads, float(scale), window, interleaved, *scales, bits)
        node = b.call(GQA, *args, *rotary, *config)
        out, present_key, present_value = (b.call(operator.getitem, node, i) for i in range(3))
        heads_out = b.call(aten.transpose.int, b.call(aten.unflatten.int, out, 2, [heads, size]), 1, 2)
    for old, new in zip(grown, (present_key, present_value)):
        graph.substitute_output(old, new)
    graph.substitute(sdpa, heads_out)  # repeat_kv and the concatenations are dead now: swept once, at the end
