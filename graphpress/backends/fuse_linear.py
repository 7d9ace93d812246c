"""Rewrite rule: ``linear(x, <format>_weight(*stored), bias)`` -> ``<format>_linear(x, *stored, bias)``.

Shared by the CUDA backend (every format, for its Triton kernels) and the ONNX backend
(integer weights, for ``MatMulNBits``).

Pattern: an ``aten.linear`` whose weight is a weight-format op (lut, nm, shift, int) read by
nothing else. Rewrite: the fused op of :data:`graphpress.ir.ops.fused.FUSED` with the
format op's arguments. Check: the output keeps its shape and dtype (the fused op's fake
implementation computes it). An N:M weight whose kept values are themselves palettized
fuses the outer ``nm_weight``; the small ``lut_weight`` rebuilding its values stays.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch import fx

from ..ir import Graph, SubgraphBuilder
from ..ir.ops.fused import FUSED

aten = torch.ops.aten


def fusable(node: fx.Node, only: Callable[[fx.Node], bool] | None = None) -> bool:
    """Whether ``node`` is the pattern (and its weight op passes ``only``, when given)."""
    if node.op != "call_function" or node.target is not aten.linear.default:
        return False
    weight = node.args[1]
    return (
        isinstance(weight, fx.Node)
        and weight.target in FUSED
        and len(weight.users) == 1
        and (only is None or only(weight))
    )


def fuse_format_linears(graph: Graph, only: Callable[[fx.Node], bool] | None = None) -> tuple[Graph, Counter]:
    """A copy of ``graph`` with every fusable pair fused (those whose weight op passes ``only``);
    how many of each fused op it holds."""
    work = graph.clone()
    fused: Counter[str] = Counter()
    for node in [n for n in work.nodes if fusable(n, only)]:
        weight = node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        op = FUSED[weight.target]
        with work.fx.inserting_before(node):
            out = SubgraphBuilder(work, "", node).call(op, node.args[0], *weight.args, bias)
        old, new = node.meta["val"], out.meta["val"]
        if old.shape != new.shape or old.dtype != new.dtype:
            raise ValueError(f"fusing {node.name} changes its output {old.shape} -> {new.shape}")
        work.substitute(node, out)
        work.fx.erase_node(weight)
        fused[op.name()] += 1
    work._changed()
    return work, fused
