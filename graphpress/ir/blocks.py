"""Recognise attention and MLP blocks in a captured graph, by dataflow rather than by names.

Attention is anchored on ``aten.scaled_dot_product_attention``: its q/k/v
arguments are traced back to the projection linears, its output forward to the
output projection. Between a projection and SDPA we note RoPE (the rotate-half
pattern: ``neg`` + ``cat``/``mul`` with cos/sin tables) and GQA grouping
(``expand``/``repeat_interleave`` of K/V heads, or SDPA's ``enable_gqa``).

An MLP is a linear (down) fed, through elementwise ops only, by either one
linear behind an activation (fc1 -> act -> fc2) or two linears of the same
input, one behind an activation (SwiGLU: down(act(gate(x)) * up(x))).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import fx

from .graph import Graph, Linear, module_path

aten = torch.ops.aten

SDPA = {aten.scaled_dot_product_attention.default}
ROPE_MARKERS = {aten.neg.default}
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
REPEAT_KV = {aten.expand.default, aten.repeat_interleave.self_int, aten.repeat_interleave.Tensor, aten.repeat.default}
ACTIVATIONS = {
    aten.silu.default,
    aten.gelu.default,
    aten.relu.default,
    aten.sigmoid.default,
    aten.tanh.default,
}
ELEMENTWISE = ACTIVATIONS | {aten.mul.Tensor, aten.add.Tensor, aten.to.dtype, aten._to_copy.default, aten.clone.default}


@dataclass(frozen=True)
class AttentionBlock:
    path: str
    q_proj: Linear
    k_proj: Linear
    v_proj: Linear
    o_proj: Linear
    sdpa: fx.Node
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: bool
    rope_nodes: tuple[fx.Node, ...] = field(default=())
    repeat_kv_nodes: tuple[fx.Node, ...] = field(default=())

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for multi-head attention, >1 for GQA)."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class MLPBlock:
    path: str
    down_proj: Linear
    up_proj: Linear
    gate_proj: Linear | None
    activation: str

    @property
    def linears(self) -> tuple[Linear, ...]:
        return tuple(x for x in (self.gate_proj, self.up_proj, self.down_proj) if x is not None)


@dataclass(frozen=True)
class Rope:
    """``out = x * cos + rotate_half(x) * sin`` with half-split pairing (dim i rotates with i + d/2)."""

    out: fx.Node
    x: fx.Node
    cos: fx.Node
    sin: fx.Node


def _call(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _mul_operands(node) -> tuple | None:
    return tuple(node.args[:2]) if _call(node, aten.mul.Tensor) else None


def _is_rotate_half(node, x) -> bool:
    """cat([-x[..., d/2:], x[..., :d/2]], -1): Hugging Face Llama's rotate_half."""
    if not _call(node, aten.cat.default) or len(node.args[0]) != 2:
        return False
    neg, first = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else 0
    rank = x.meta["val"].dim()
    if dim % rank != rank - 1 or not _call(neg, aten.neg.default):
        return False
    second = neg.args[0]
    half = x.meta["val"].shape[-1] // 2

    def is_slice(n, start, end) -> bool:
        return (
            _call(n, aten.slice.Tensor)
            and n.args[0] is x
            and n.args[1] % rank == rank - 1
            and n.args[2] == start
            and (n.args[3] if len(n.args) > 3 else end) >= end
            and min(n.args[3] if len(n.args) > 3 else end, 2 * half) == end
        )

    return is_slice(second, half, 2 * half) and is_slice(first, 0, half)


def match_rope(node) -> Rope | None:
    """The RoPE application computing ``node``, or None if ``node`` is not one."""
    if not _call(node, aten.add.Tensor):
        return None
    left, right = (_mul_operands(a) for a in node.args[:2])
    if left is None or right is None:
        return None
    for plain, rotated in ((left, right), (right, left)):
        for x, cos in (plain, plain[::-1]):
            for rot, sin in (rotated, rotated[::-1]):
                if isinstance(x, fx.Node) and _is_rotate_half(rot, x):
                    return Rope(node, x, cos, sin)
    return None


def split_heads(linear: fx.Node, heads: int, head_dim: int) -> fx.Node | None:
    """The (B, heads, S, head_dim) node made from a linear's output by view + transpose(1, 2)."""
    for view in linear.users:
        if view.op != "call_function" or view.target not in VIEWS:
            continue
        if tuple(view.meta["val"].shape[-2:]) != (heads, head_dim) or view.meta["val"].dim() != 4:
            continue
        for t in view.users:
            if (
                t.op == "call_function"
                and t.target is aten.transpose.int
                and sorted(a % 4 for a in t.args[1:]) == [1, 2]
            ):
                return t
    return None


def rope_of(heads: fx.Node) -> Rope | None:
    """The half-split RoPE applied to ``heads`` (a (B, heads, S, head_dim) node), or None."""
    for mul in heads.users:
        for add in mul.users:
            rope = match_rope(add)
            if rope is not None and rope.x is heads:
                return rope
    return None


def _walk_back(start, stop) -> tuple[set[fx.Node], list[fx.Node]]:
    """Nodes reachable backwards from ``start`` without crossing a ``stop(node)`` node; and the stops hit."""
    seen, hits, todo = set(), [], [start] if isinstance(start, fx.Node) else []
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if stop(node):
            hits.append(node)
            continue
        todo.extend(node.all_input_nodes)
    return seen, hits


def _walk_forward(start: fx.Node, stop) -> list[fx.Node]:
    seen, hits, todo = set(), [], list(start.users)
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if stop(node):
            hits.append(node)
            continue
        todo.extend(node.users)
    return hits


def find_attention_blocks(graph: Graph) -> list[AttentionBlock]:
    linears = {lin.node: lin for lin in graph.linears()}
    is_linear = linears.__contains__
    blocks = []
    for sdpa in graph.fx.nodes:
        if sdpa.op != "call_function" or sdpa.target not in SDPA:
            continue
        projections, paths = [], {}
        for arg in sdpa.args[:3]:
            seen, hits = _walk_back(arg, is_linear)
            if len(hits) != 1:
                break
            projections.append(linears[hits[0]])
            paths[len(projections) - 1] = seen
        outs = _walk_forward(sdpa, is_linear)
        if len(projections) != 3 or len(outs) != 1:
            continue
        q, k, v = projections
        q_val, k_val = sdpa.args[0].meta["val"], sdpa.args[1].meta["val"]
        num_heads, head_dim = int(q_val.shape[1]), int(q_val.shape[-1])
        num_kv_heads = k.out_features // head_dim
        if num_kv_heads * head_dim != k.out_features or num_heads % num_kv_heads:
            continue
        rope_nodes = tuple(n for n in paths[0] | paths[1] if n.op == "call_function" and n.target in ROPE_MARKERS)
        repeat_nodes = tuple(n for n in paths[1] | paths[2] if n.op == "call_function" and n.target in REPEAT_KV)
        if int(k_val.shape[1]) != num_heads and not sdpa.kwargs.get("enable_gqa", False):
            continue
        blocks.append(
            AttentionBlock(
                path=module_path(sdpa),
                q_proj=q,
                k_proj=k,
                v_proj=v,
                o_proj=linears[outs[0]],
                sdpa=sdpa,
                num_heads=num_heads,
                num_kv_heads=num_kv_heads,
                head_dim=head_dim,
                rope=bool(rope_nodes),
                rope_nodes=rope_nodes,
                repeat_kv_nodes=repeat_nodes,
            )
        )
    return blocks


def find_mlp_blocks(graph: Graph) -> list[MLPBlock]:
    linears = {lin.node: lin for lin in graph.linears()}
    attention = {lin.node for b in find_attention_blocks(graph) for lin in (b.q_proj, b.k_proj, b.v_proj, b.o_proj)}
    blocks = []
    for node, down in linears.items():
        if node in attention:
            continue

        def stop(n: fx.Node) -> bool:
            return n in linears or n.op != "call_function" or n.target not in ELEMENTWISE

        seen, hits = _walk_back(node.args[0], stop)
        producers = [linears[h] for h in hits if h in linears and h not in attention]
        if len(producers) != len(hits) or not 1 <= len(producers) <= 2:
            continue
        acts = [n for n in seen if n.op == "call_function" and n.target in ACTIVATIONS]
        if len(acts) != 1:
            continue
        act = acts[0]
        behind_act = [linears[h] for h in _walk_back(act, linears.__contains__)[1]]
        if len(behind_act) != 1:
            continue
        if len(producers) == 1:
            gate, up = None, producers[0]
        else:
            gate = behind_act[0]
            up = next(p for p in producers if p is not gate)
            if gate.node.args[0] is not up.node.args[0]:
                continue
        path = os.path.commonprefix(
            [lin.path.split(".") for lin in (down, up)] + ([gate.path.split(".")] if gate else [])
        )
        blocks.append(MLPBlock(".".join(path), down, up, gate, act.target.__name__.split(".")[0]))
    return blocks
