"""Input-channel permutations that cost nothing at run time: folded into the producing linears.

A linear's input channels can be reordered for free when every channel comes from
linears' output rows through elementwise ops only (SwiGLU's ``act(gate(x)) * up(x)``
feeding ``down``, a low-rank pair ``B(A(x))``): permuting those producers' rows (and
biases) permutes the input the same way, and the consumer's columns follow, so
``W[:, p] @ x[p] == W @ x``. Inputs behind a norm, a residual or a reshape are not
foldable: the same values reach other consumers, or channels mix.
"""

from __future__ import annotations

import torch
from torch import fx

from .blocks import ELEMENTWISE, _walk_back
from .graph import Graph, Linear


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
