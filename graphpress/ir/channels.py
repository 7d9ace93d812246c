"""Input-channel permutations that cost nothing at run time: folded into the producing linears.

A linear's input channels can be reordered for free when every channel comes from
linears' output rows through elementwise ops only (SwiGLU's ``act(gate(x)) * up(x)``
feeding ``down``, a low-rank pair ``B(A(x))``): permuting those producers' rows (and
biases) permutes the input the same way, and the consumer's columns follow, so
``W[:, p] @ x[p] == W @ x``. Inputs behind a norm, a residual or a reshape are not
foldable: the same values reach other consumers, or channels mix.

Per-channel scales (AWQ) fold the same way through fewer ops (:func:`channel_scale_site`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .blocks import ELEMENTWISE, _walk_back
from .graph import Graph, Linear

aten = torch.ops.aten


def channel_producers(graph: Graph, lin: Linear) -> list[Linear] | None:
    """The linears whose output rows are ``lin``'s input channels, or None when a permutation can't be folded."""
    linears = {other.node: other for other in graph.linears()}

    def stop(node: fx.Node) -> bool:
        return node in linears or node.op != "call_function" or node.target not in ELEMENTWISE

    seen, hits = _walk_back(lin.node.args[0], stop)
    if not hits or any(hit not in linears for hit in hits):
        return None
    producers = [linears[hit] for hit in hits]
    # every value on the way is read only on the way: permuting it changes nothing else
    on_path = (seen - set(hits)) | {lin.node}
    if any(user not in on_path for node in seen for user in node.users):
        return None
    # weights shared with another node (tied) would permute that node too
    weights = [lin.node.args[1], *(p.node.args[1] for p in producers)]
    if any(len(w.users) != 1 for w in weights) or any(p.out_features != lin.in_features for p in producers):
        return None
    return sorted(producers, key=lambda p: p.path)


def permute_input_channels(graph: Graph, lin: Linear, producers: list[Linear], perm: torch.Tensor) -> None:
    """Reorder ``lin``'s input channels to ``perm`` (new channel i = old channel perm[i]); the function is unchanged."""
    graph.set_weight(lin.weight, graph.weight(lin.weight).detach()[:, perm].contiguous())
    for producer in producers:
        graph.set_weight(producer.weight, graph.weight(producer.weight).detach()[perm].contiguous())
        if producer.bias is not None:
            graph.set_weight(producer.bias, graph.weight(producer.bias).detach()[perm].contiguous())


# Scales fold through fewer ops than permutations: only through ops linear in one operand.
_PASS_THROUGH = {aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.alias.default}


@dataclass(frozen=True)
class ChannelScale:
    """Where a per-channel factor 1/s on a node's value folds: a stored vector it is multiplied by
    (an RMSNorm's weight), or a producing linear's rows (and bias)."""

    vector: str | None = None
    producer: Linear | None = None


def channel_scale_site(graph: Graph, node: fx.Node) -> ChannelScale | None:
    """Where dividing ``node``'s channels (last dimension) by s can be folded, or None.

    The rule (AWQ's, Lin et al. 2023, stated as dataflow): walk back through dtype casts and
    through one operand of each product; stop at a linear (scale its rows) or at a stored
    vector of the channel count (scale it). Every value on the way must be read only on the
    way, and the folded tensor read only there, so nothing else sees the change.
    """
    linears = {lin.node: lin for lin in graph.linears()}
    channels = node.meta["val"].shape[-1]
    current = node
    while True:
        if current is not node and len(current.users) != 1:
            return None
        if current in linears:
            lin = linears[current]
            shared = len(current.args[1].users) != 1
            return None if shared or lin.out_features != channels else ChannelScale(producer=lin)
        if current.op != "call_function":
            return None
        if current.target in _PASS_THROUGH:
            current = current.args[0]
            continue
        if current.target is not aten.mul.Tensor:
            return None
        operands = [a for a in current.args if isinstance(a, fx.Node)]
        for operand in operands:
            name = graph.tensor_name(operand)
            if name is not None and tuple(operand.meta["val"].shape) == (channels,) and len(operand.users) == 1:
                return ChannelScale(vector=name)
        movable = [a for a in operands if a in linears or a.target in _PASS_THROUGH | {aten.mul.Tensor}]
        if not movable:
            return None
        current = movable[-1]  # SwiGLU: act(gate) * up: the up projection, not through the activation


def scale_input_channels(graph: Graph, site: ChannelScale, consumers: list[Linear], s: torch.Tensor) -> None:
    """Divide a node's channels by ``s`` at ``site`` and multiply its consumers' columns by it: unchanged function."""
    if site.vector is not None:
        vector = graph.weight(site.vector).detach()
        graph.set_weight(site.vector, (vector / s.to(vector.dtype)).contiguous())
    else:
        producer = site.producer
        rows = graph.weight(producer.weight).detach()
        graph.set_weight(producer.weight, (rows / s.to(rows.dtype)[:, None]).contiguous())
        if producer.bias is not None:
            bias = graph.weight(producer.bias).detach()
            graph.set_weight(producer.bias, (bias / s.to(bias.dtype)).contiguous())
    for lin in consumers:
        weight = graph.weight(lin.weight).detach()
        graph.set_weight(lin.weight, (weight * s.to(weight.dtype)).contiguous())
