"""Capture normal form: every weight matmul is an ``aten.linear`` of its own.

Passes and block recognisers speak of linears (y = x W^T + b, W a parameter of shape
(out, in)). Two spellings of the same dataflow are rewritten into that form once, after
capture, so no recogniser grows a case per model family:

- ``addmm(b, x, W)`` / ``mm(x, W)`` with W a (in, out) parameter (GPT-2's ``Conv1D``)
  becomes ``linear(x, W^T, b)``; the parameter keeps its name and is stored transposed.
  The flatten to 2-D and back around it is dropped: the linear takes the 3-D input.
- A *fused* linear whose output is only ever cut along its features (``slice``, ``split``,
  ``chunk`` on the last axis, possibly after a view into (heads, features) and transposes
  that keep the feature axis last: fused q/k/v, fused gate/up, GPT-NeoX's per-head qkv)
  becomes one linear per piece, holding exactly the rows the piece read. Piece ``i`` of
  ``...qkv_proj`` is the module ``...qkv_proj.i``. Exact: each output element is computed
  from the same row and bias entry as before.
- A *grouped* matmul over expert-sorted rows (transformers' ``grouped_mm``: row block e of
  the input times expert e's slice of a 3-D parameter, block ends ``offs``) becomes the
  loop it stands for: the rows split at ``offs``, one linear per expert, the outputs
  concatenated. Expert e of ``...experts.down_proj`` is the module ``...experts.e.down_proj``
  (weight (out, in), as every linear). Exact, and no row meets a weight it did not meet
  before; the split sizes are read from ``offs`` at run time.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .blocks import VIEWS, _call
from .graph import Graph, SubgraphBuilder, module_path

aten = torch.ops.aten
END = 2**62


def canonicalize(graph: Graph) -> Graph:
    """Rewrite ``graph`` in place into capture normal form and return it."""
    for node in list(graph.fx.nodes):
        if _call(node, aten.addmm.default, aten.mm.default):
            _matmul_to_linear(graph, node)
    grouped = _grouped_mm_ops()
    for node in list(graph.fx.nodes):
        if _call(node, *grouped):
            _unstack_experts(graph, node)
    for linear in graph.linears():
        _split_fused(graph, linear)
    graph.fx.eliminate_dead_code()
    graph.remove_unused_tensors()
    return graph


def _matmul_to_linear(graph: Graph, node: fx.Node) -> None:
    bias, x, weight = node.args[:3] if node.target is aten.addmm.default else (None, *node.args[:2])
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return
    name = graph.tensor_name(weight)
    if name is None or graph.weight(name).dim() != 2 or len(weight.users) != 1:
        return
    if bias is not None and (graph.tensor_name(bias) is None or graph.weight(graph.tensor_name(bias)).dim() != 1):
        return
    graph.replace_tensor(name, graph.weight(name).T.contiguous())
    builder = SubgraphBuilder(graph, module_path(node), node)
    replaced, flat = node, x
    unflatten = next(iter(node.users)) if len(node.users) == 1 else None
    if _call(x, *VIEWS) and _call(unflatten, *VIEWS):  # view(mm(view(x, (-1, in))), (..., out)): linear(x)
        x0 = x.args[0]
        if tuple(unflatten.meta["val"].shape) == (*x0.meta["val"].shape[:-1], node.meta["val"].shape[-1]):
            replaced, flat = unflatten, x0
    with graph.fx.inserting_before(replaced):
        args = (flat, weight) if bias is None else (flat, weight, bias)
        graph.substitute(replaced, builder.call(aten.linear.default, *args))


def _pieces(linear_out: fx.Node, features: int):
    """(cuts, head_view, transposes) when a linear's output is only ever cut along its features, else None.

    ``cuts`` are (node, start, end) feature ranges. ``head_view`` is the view the cuts happen
    after (into (..., heads, per_head), the ranges then per head; or one that only regroups
    the leading dims; None: the features are cut directly); ``transposes`` sit between that
    view and the cuts.
    """
    users = list(linear_out.users)
    head_view, transposes, source = None, [], linear_out
    if len(users) == 1 and _call(users[0], *VIEWS):
        view = users[0]
        shape = tuple(view.meta["val"].shape)
        unflatten = len(shape) >= 1 and shape[-1] == features  # leading dims regrouped (Conv1D's 2-D matmul)
        into_heads = (
            len(shape) >= 2 and all(isinstance(d, int) for d in shape[-2:]) and shape[-2] * shape[-1] == features
        )
        if not (unflatten or into_heads):
            return None
        head_view, source, features = view, view, shape[-1]
        while len(source.users) == 1 and _call(next(iter(source.users)), aten.transpose.int):
            t = next(iter(source.users))
            rank = t.meta["val"].dim()
            if rank - 1 in {a % rank for a in t.args[1:3]}:
                return None
            transposes.append(t)
            source = t
    rank = source.meta["val"].dim()
    cuts = []
    for user in source.users:
        if _call(user, aten.slice.Tensor) and user.args[1] % rank == rank - 1 and user.kwargs.get("step", 1) == 1:
            start = user.args[2] if len(user.args) > 2 else 0
            end = min(user.args[3] if len(user.args) > 3 else END, features)
            if len(user.args) > 4 and user.args[4] != 1:
                return None
            cuts.append((user, start, end))
        elif _call(user, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
            dim = user.args[2] if len(user.args) > 2 else user.kwargs.get("dim", 0)
            if dim % rank != rank - 1 or not all(_call(g, operator.getitem) for g in user.users):
                return None
            sizes = [int(p.shape[-1]) for p in user.meta["val"]]
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            cuts += [(g, starts[g.args[1]], starts[g.args[1]] + sizes[g.args[1]]) for g in user.users]
        else:
            return None
    if len(cuts) < 2 or not all(isinstance(s, int) and isinstance(e, int) and 0 <= s < e for _, s, e in cuts):
        return None
    return cuts, head_view, transposes


def _split_fused(graph: Graph, linear) -> None:
    found = _pieces(linear.node, linear.out_features)
    if found is None:
        return
    cuts, head_view, transposes = found
    weight = graph.weight(linear.weight)
    bias = graph.weight(linear.bias) if linear.bias else None
    heads = 1 if head_view is None else linear.out_features // int(head_view.meta["val"].shape[-1])
    per_head = linear.out_features // heads
    builder = SubgraphBuilder(graph, linear.path, linear.node)
    x = linear.node.args[0]
    for i, (cut, start, end) in enumerate(sorted(cuts, key=lambda c: (c[1], c[2]))):
        rows = torch.cat([torch.arange(h * per_head + start, h * per_head + end) for h in range(heads)])
        with graph.fx.inserting_before(cut):
            out = builder.linear(x, str(i), weight[rows].clone(), None if bias is None else bias[rows].clone())
            if head_view is not None:
                shape = [*head_view.args[1][:-1], end - start]
                out = builder.call(head_view.target, out, shape)
                for t in transposes:
                    out = builder.call(aten.transpose.int, out, *t.args[1:3])
        graph.substitute(cut, out)


def _grouped_mm_ops() -> tuple:
    """torch's and transformers' grouped matmuls (the latter registered once transformers' MoE code is imported)."""
    ops = (
        getattr(aten, "_grouped_mm", None),
        getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None),
    )
    return tuple(op.default for op in ops if op is not None)


def _unstack_experts(graph: Graph, node: fx.Node) -> None:
    x, stacked, offs = (*node.args, node.kwargs.get("offs"))[:3]
    transposed = _call(stacked, aten.transpose.int) and {a % 3 for a in stacked.args[1:3]} == {1, 2}
    name = graph.tensor_name(stacked.args[0] if transposed else stacked)
    if name is None or offs is None or graph.weight(name).dim() != 3 or (transposed and len(stacked.users) != 1):
        return
    weights = graph.weight(name) if transposed else graph.weight(name).transpose(1, 2)  # (E, out, in)
    owner, attr = name.rpartition(".")[::2]
    builder = SubgraphBuilder(graph, owner, node)
    with graph.fx.inserting_before(node):
        ends = builder.call(aten._to_copy.default, offs, dtype=torch.int64)
        counts = builder.call(aten.diff.default, ends, 1, 0, builder.call(aten.new_zeros.default, ends, [1]))
        sizes = []
        for e in range(len(weights)):
            size = builder.call(aten._local_scalar_dense.default, builder.call(aten.select.int, counts, 0, e))
            builder.call(aten.sym_constrain_range_for_size.default, size)
            sizes.append(size)
        rest = builder.call(operator.sub, builder.call(aten.sym_size.int, x, 0), _sum(builder, sizes))
        pieces = builder.call(aten.split_with_sizes.default, x, [*sizes, rest])
        outs = [
            builder.linear(builder.call(operator.getitem, pieces, e), f"{e}.{attr}", weights[e].clone())
            for e in range(len(weights))
        ]
        tail = builder.call(operator.getitem, pieces, len(weights))  # rows past the last block: zeros, as grouped_mm
        outs.append(builder.call(aten.new_zeros.default, tail, [rest, int(weights.shape[1])]))
        graph.substitute(node, builder.call(aten.cat.default, outs))


def _sum(builder: SubgraphBuilder, sizes: list[fx.Node]) -> fx.Node:
    total = sizes[0]
    for size in sizes[1:]:
        total = builder.call(operator.add, total, size)
    return total
