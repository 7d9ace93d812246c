"""Rewrite rule: RMSNorm written as aten ops -> ``graphpress::rms_norm`` (onnxruntime's SimplifiedLayerNormalization).

Pattern (transformers' RMSNorm, any family; the dataflow, not the module name):

    h = x, or x cast to float32
    n = h * rsqrt(mean(h ** 2, -1, keepdim) + eps)         (either operand order)
    y = w * n', n' = n or n cast back to x's dtype         (either operand order)

where w is a vector of the normalized width computed from stored tensors only (a weight, or
Gemma's ``1 + weight``), and the intermediate values feed nothing else. Rewrite: ``y`` becomes
``rms_norm(x, w, eps)``. Check: same shape and dtype. Anything else is left alone.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx

from ..ir import Graph, SubgraphBuilder
from ..ir.graph import ASSERT

aten = torch.ops.aten
RMS_NORM = torch.ops.graphpress.rms_norm.default
CASTS = {aten.to.dtype, aten._to_copy.default}


def fuse_rms_norms(graph: Graph) -> tuple[Graph, Counter]:
    """A copy of ``graph`` with every RMSNorm as one op; how many."""
    work = graph.clone()
    fused: Counter[str] = Counter()
    stored = _stored(work)
    for rsqrt in [n for n in work.nodes if _is(n, aten.rsqrt.default)]:
        match = _match(rsqrt, stored)
        if match is None:
            continue
        x, weight, eps, out = match
        with work.fx.inserting_before(out):
            norm = SubgraphBuilder(work, "", out).call(RMS_NORM, x, weight, eps)
        if norm.meta["val"].shape != out.meta["val"].shape or norm.meta["val"].dtype != out.meta["val"].dtype:
            work.fx.erase_node(norm)
            continue
        work.substitute(out, norm)
        fused[RMS_NORM.name()] += 1
    work.eliminate_dead_code()
    return work, fused


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _other(mul: fx.Node, operand: fx.Node):
    """The operand of a binary ``mul`` that is not ``operand`` (None if neither is)."""
    a, b = mul.args[:2]
    return b if a is operand else a if b is operand else None


def _readers(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` other than export's dtype assertions (which check, and compute nothing)."""
    return [u for u in node.users if not _is(u, ASSERT)]


def _match(rsqrt: fx.Node, stored: set[fx.Node]):
    """(x, weight, eps, output node) of the RMSNorm around ``rsqrt``, or None."""
    add = rsqrt.args[0]
    if not _is(add, aten.add.Tensor, aten.add.Scalar) or not isinstance(add.args[1], float):
        return None
    mean, eps = add.args[0], add.args[1]
    if not _is(mean, aten.mean.dim) or list(mean.args[1]) not in ([-1], [mean.args[0].meta["val"].dim() - 1]):
        return None
    if not (len(mean.args) > 2 and mean.args[2]) or not _is(mean.args[0], aten.pow.Tensor_Scalar):
        return None
    square = mean.args[0]
    h = square.args[0]
    if square.args[1] != 2 or any(len(_readers(n)) != 1 for n in (rsqrt, add, mean, square)):
        return None
    (normed,) = _readers(rsqrt)
    if not _is(normed, aten.mul.Tensor) or _other(normed, rsqrt) is not h or len(_readers(normed)) != 1:
        return None
    # h = x.float() is dropped where nothing else reads it (the op casts); else the op reads h
    x = h.args[0] if _is(h, *CASTS) and set(_readers(h)) == {square, normed} else h
    (cast,) = _readers(normed)
    if _is(cast, *CASTS):
        if cast.meta["val"].dtype != x.meta["val"].dtype or len(_readers(cast)) != 1:
            return None
        (scaled,) = _readers(cast)
    else:
        cast, scaled = normed, cast
        if x.meta["val"].dtype != torch.float32:
            return None
    weight = _other(scaled, cast) if _is(scaled, aten.mul.Tensor) else None
    width = x.meta["val"].shape[-1]
    if not isinstance(weight, fx.Node) or weight not in stored or tuple(weight.meta["val"].shape) != (width,):
        return None
    return x, weight, eps, scaled


def _stored(graph: Graph) -> set[fx.Node]:
    """Nodes computed from parameters, buffers and constants only (no user input)."""
    user = set(graph.user_inputs())
    stored: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if node not in user:
                stored.add(node)
        elif node.op in ("get_attr", "call_function") and all(a in stored for a in node.all_input_nodes):
            stored.add(node)
    return stored
