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
END = 2**63 - 1  # a slice to the end

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
ELEMENTWISE = ACTIVATIONS | {
    aten.mul.Tensor,
    aten.add.Tensor,
    aten.pow.Tensor_Scalar,
    aten.dropout.default,
    aten.to.dtype,
    aten._to_copy.default,
    aten.clone.default,
}


@dataclass(frozen=True)
class AttentionBlock:
    path: str
    q_proj: Linear
    k_proj: Linear
    v_proj: Linear
    o_proj: Linear
    sdpa: fx.Node
    """The attention's output node: the SDPA call, or (eager form) the probabilities-times-V matmul."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: bool
    rope_nodes: tuple[fx.Node, ...] = field(default=())
    repeat_kv_nodes: tuple[fx.Node, ...] = field(default=())
    eager: bool = False
    """Written out as matmul / softmax / matmul (transformers' eager attention), not SDPA."""
    softcap: bool = False
    """Eager form with a tanh soft-cap on the scores (Gemma 2)."""

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
    """``out = x * cos + rotate_half(x) * sin``: half-split pairing (dim i rotates with i + d/2) or interleaved.

    Partial rotary: ``x`` is the first ``rotary_dims`` dims of the head, ``rotated`` the RoPE
    of it, and ``out`` the whole head again (the rest appended unrotated).
    """

    out: fx.Node
    x: fx.Node
    cos: fx.Node
    sin: fx.Node
    rotary_dims: int | None = None
    rotated: fx.Node | None = None
    interleaved: bool = False
    """Pairs (2i, 2i + 1) instead of (i, i + d/2) (GPT-J's rotate_every_two)."""

    @property
    def partial(self) -> bool:
        """RoPE on a prefix of the head's dims only."""
        return self.rotary_dims is not None and self.rotary_dims < self.out.meta["val"].shape[-1]


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


def _is_rotate_every_two(node, x) -> bool:
    """flatten(stack([-x[..., 1::2], x[..., ::2]], -1), -2): GPT-J's interleaved rotate_every_two."""
    if not (_call(node, aten.flatten.using_ints) and _call(node.args[0], aten.stack.default)):
        return False
    parts, dim = node.args[0].args[0], node.args[0].args[1] if len(node.args[0].args) > 1 else 0
    if len(parts) != 2 or dim != -1 or not _call(parts[0], aten.neg.default):
        return False

    def every_other(n, start) -> bool:
        args = list(n.args) + [None] * (5 - len(n.args))
        return _call(n, aten.slice.Tensor) and n.args[0] is x and args[1] % 4 == 3 and args[2] == start and args[4] == 2

    return every_other(parts[0].args[0], 1) and every_other(parts[1], 0)


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
                if isinstance(x, fx.Node) and _is_rotate_every_two(rot, x):
                    return Rope(node, x, cos, sin, interleaved=True)
    return None


PER_HEAD = ELEMENTWISE | {aten.rsqrt.default, aten.mean.dim, aten.pow.Tensor_Scalar, aten.add.Scalar}


def split_heads(linear: fx.Node, heads: int, head_dim: int) -> fx.Node | None:
    """The (B, heads, S, head_dim) node made from a linear's output by view + transpose(1, 2).

    Per-head ops between the view and the transpose (Qwen3's / Gemma3's q_norm and k_norm:
    elementwise, or reducing over head_dim only) are allowed; :func:`head_norm` tells.
    """
    for view in linear.users:
        if view.op != "call_function" or view.target not in VIEWS:
            continue
        if tuple(view.meta["val"].shape[-2:]) != (heads, head_dim) or view.meta["val"].dim() != 4:
            continue
        seen, todo = set(), [view]
        while todo:
            node = todo.pop()
            for t in node.users:
                if t in seen:
                    continue
                seen.add(t)
                if _call(t, aten.transpose.int) and sorted(a % 4 for a in t.args[1:]) == [1, 2]:
                    return t
                if _call(t, *PER_HEAD) and _per_head(t, heads, 2):
                    todo.append(t)
    return None


def _per_head(node: fx.Node, heads: int, axis: int) -> bool:
    """Keeps a 4-D layout with the heads on ``axis``: nothing mixes heads (a norm reduces over head_dim alone)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 4 or val.shape[axis] != heads:
        return False
    return not _call(node, aten.mean.dim) or [d % 4 for d in node.args[1]] == [3]


def _normed(heads: fx.Node) -> list[fx.Node]:
    """Nodes computed from ``heads`` (B, heads, S, d) by per-head ops alone (a QK-norm after the transpose)."""
    count, found, todo = heads.meta["val"].shape[1], [], [heads]
    while todo:
        node = todo.pop()
        for user in node.users:
            if user not in found and _call(user, *PER_HEAD, aten.type_as.default) and _per_head(user, count, 1):
                found.append(user)
                todo.append(user)
    return found


def head_norm(heads: fx.Node) -> bool:
    """Whether a per-head norm (QK-norm) acts on ``heads`` (from split_heads) before RoPE or the scores.

    Before the transpose (Qwen3) or after it (Gemma3): either way it is a function of each
    head's vector that no lock or latent map commutes with in general.
    """
    if not _call(heads.args[0], *VIEWS):
        return True
    return any(_call(n, aten.mean.dim) for n in _normed(heads))  # a reduction over head_dim: a norm


def _aliases(node: fx.Node) -> list[fx.Node]:
    return [node] + [u for u in node.users if _call(u, aten.alias.default)]


def rope_of(heads: fx.Node) -> Rope | None:
    """The half-split RoPE applied to ``heads`` (a (B, heads, S, head_dim) node), or None.

    Partial rotary (GPT-NeoX, Phi): RoPE on the first ``rotary_dims`` dims, the rest passed
    through, ``cat([rope(x[..., :r]), x[..., r:]], -1)``; ``Rope.x`` is then the slice.
    """
    head_dim = heads.meta["val"].shape[-1]
    for base, source in [(n, a) for n in (heads, *_normed(heads)) for a in _aliases(n)]:
        prefixes = [source] + [
            u
            for u in source.users
            if _call(u, aten.slice.Tensor) and u.args[1] % 4 == 3 and u.args[2] == 0 and len(u.args) > 3
        ]
        for x in prefixes:
            for mul in x.users:
                for add in mul.users:
                    rope = match_rope(add)
                    if rope is None or rope.x is not x:
                        continue
                    rotary = int(x.meta["val"].shape[-1])
                    joined = _rejoined(rope.out, base, rotary)
                    if joined is not None:  # the head re-assembled (its tail empty when rotary == head_dim)
                        return Rope(joined, x, rope.cos, rope.sin, rotary, rope.out, rope.interleaved)
                    if rotary == head_dim and x is source:
                        return rope
    return None


def _rejoined(rotated: fx.Node, heads: fx.Node, rotary: int) -> fx.Node | None:
    """``cat([rotated, heads[..., rotary:]], -1)``: the whole head again, its tail untouched."""
    for cat in rotated.users:
        if not _call(cat, aten.cat.default) or len(cat.args[0]) != 2 or cat.args[0][0] is not rotated:
            continue
        if (cat.args[1] if len(cat.args) > 1 else 0) % 4 != 3:
            continue
        tail = cat.args[0][1]
        if (
            _call(tail, aten.slice.Tensor)
            and tail.args[0] in _aliases(heads)
            and tail.args[1:3] in ((3, rotary), (-1, rotary))
        ):
            return cat
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
        eager = eager_attention(sdpa)
        if not _call(sdpa, *SDPA) and eager is None:
            continue
        q_in, k_in, v_in, scores = eager or (*sdpa.args[:3], None)
        projections, paths = [], {}
        for arg in (q_in, k_in, v_in):
            seen, hits = _walk_back(arg, is_linear)
            if len(hits) != 1:
                break
            projections.append(linears[hits[0]])
            paths[len(projections) - 1] = seen
        outs = _walk_forward(sdpa, is_linear)
        if len(projections) != 3 or len(outs) != 1:
            continue
        q, k, v = projections
        q_val, k_val = q_in.meta["val"], k_in.meta["val"]
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
                eager=eager is not None,
                softcap=scores is not None and any(_call(n, aten.tanh.default) for n in scores),
            )
        )
    return blocks


SOFTMAX_TO_MATMUL = {
    aten.to.dtype,
    aten._to_copy.default,
    aten.dropout.default,
    aten.clone.default,
    aten.type_as.default,
}


def _is_noop_slice(node: fx.Node) -> bool:
    args = list(node.args) + [None] * (5 - len(node.args))
    return node.target is aten.slice.Tensor and args[2] in (0, None) and args[3] in (END, None) and args[4] in (1, None)


def _after_noop_slices(x):
    while _call(x, aten.slice.Tensor) and _is_noop_slice(x):
        x = x.args[0]
    return x


def repeated_heads(x) -> tuple[fx.Node, int] | None:
    """(y, g) where ``x`` is repeat_kv of y: each of y's heads (axis 1) g times in a row, as
    ``repeat_interleave(y, g, 1)`` or ``reshape(expand(unsqueeze(y, 2)))`` (no-op slices skipped); else None."""
    if not _call(x, aten.repeat_interleave.self_int, aten.reshape.default, aten.view.default):
        return None
    source = x.args[0]
    if x.target is aten.repeat_interleave.self_int:
        dim = x.args[2] if len(x.args) > 2 else x.kwargs.get("dim")
        if not isinstance(dim, int) or dim % 4 != 1:
            return None
    elif _call(source, aten.expand.default):
        unsqueeze = _after_noop_slices(source.args[0])
        if not _call(unsqueeze, aten.unsqueeze.default) or unsqueeze.args[1] != 2:
            return None
        source = _after_noop_slices(unsqueeze.args[0])
    else:
        return None
    before, after = source.meta["val"].shape, x.meta["val"].shape
    if len(before) != 4 or len(after) != 4 or not isinstance(before[1], int) or not isinstance(after[1], int):
        return None
    # the expand's reshape merges (heads, g) when it keeps the head dim (lengths may carry other symbols)
    return (source, after[1] // before[1]) if str(before[3]) == str(after[3]) and after[1] % before[1] == 0 else None


def unrepeated(x: fx.Node) -> fx.Node:
    """x before repeat_kv (:func:`repeated_heads`); x itself otherwise."""
    found = repeated_heads(x)
    return x if found is None else found[0]


def eager_attention(node) -> tuple[fx.Node, fx.Node, fx.Node, set[fx.Node]] | None:
    """``matmul(softmax(f(matmul(q, k^T))), v)``: (q, k, v, the nodes of f), or None.

    f is whatever elementwise work sits on the scores (scale, soft-cap, mask): it acts on
    the scores only, so a rewrite that keeps q.k and the probabilities-times-V products
    keeps the attention.
    """
    if not _call(node, aten.matmul.default):
        return None
    probs, v = node.args[:2]
    while _call(probs, *SOFTMAX_TO_MATMUL):
        probs = probs.args[0]
    if not _call(probs, aten.softmax.int, aten._softmax.default) or probs.args[1] % 4 != 3:
        return None
    seen, hits = _walk_back(probs.args[0], lambda n: _call(n, aten.matmul.default))
    if len(hits) != 1:
        return None
    q, kt = hits[0].args[:2]
    if not _call(kt, aten.transpose.int) or sorted(a % 4 for a in kt.args[1:3]) != [2, 3]:
        return None
    return q, kt.args[0], v, seen


def _keeps_features(node: fx.Node) -> bool:
    """A view that only regroups the leading dims (Conv1D's flatten to 2-D and back): elementwise per feature."""
    if node.target not in VIEWS or not isinstance(node.args[0], fx.Node):
        return False
    before, after = node.args[0].meta["val"].shape, node.meta["val"].shape
    return len(before) >= 1 and len(after) >= 1 and before[-1] == after[-1]


def find_mlp_blocks(graph: Graph) -> list[MLPBlock]:
    linears = {lin.node: lin for lin in graph.linears()}
    attention = {lin.node for b in find_attention_blocks(graph) for lin in (b.q_proj, b.k_proj, b.v_proj, b.o_proj)}
    blocks = []
    for node, down in linears.items():
        if node in attention:
            continue

        def stop(n: fx.Node) -> bool:
            return n in linears or n.op != "call_function" or not (n.target in ELEMENTWISE or _keeps_features(n))

        seen, hits = _walk_back(node.args[0], stop)
        hits = [h for h in hits if not _call(h, aten.sym_size.int)]  # shape reads carry no data
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
