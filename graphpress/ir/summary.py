"""Size and cost of a graph: parameters, bytes per dtype, linear FLOPs per token, KV-cache bytes per token."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from .graph import Graph


@dataclass
class GraphSummary:
    params: int
    bytes: int
    bytes_by_dtype: dict[str, int]
    linear_flops_per_token: int
    kv_cache_bytes_per_token: float | None = None
    """Decode graphs: bytes the cache grows by per token of one sequence (all layers)."""
    kv_cache_window_bytes: int | None = None
    """Decode graphs: bytes of bounded cache windows (full-precision residuals) per sequence."""
    op_histogram: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(graph: Graph) -> GraphSummary:
    """``params`` counts parameters; ``bytes`` every stored tensor (parameters, buffers, constants).

    FLOPs are 2 * in * out per linear per token: the cost that weight compression changes;
    attention's sequence-dependent cost is not included.
    """
    by_dtype: Counter[str] = Counter()
    params = sum(graph.weight(name).numel() for name in graph.program.graph_signature.parameters)
    for tensor in graph.tensors().values():
        by_dtype[str(tensor.dtype).removeprefix("torch.")] += tensor.numel() * tensor.element_size()
    flops = sum(2 * lin.in_features * lin.out_features for lin in graph.linears())
    ops = Counter(str(n.target) for n in graph.fx.nodes if n.op == "call_function")
    return GraphSummary(
        params=params,
        bytes=sum(by_dtype.values()),
        bytes_by_dtype=dict(sorted(by_dtype.items())),
        linear_flops_per_token=flops,
        kv_cache_bytes_per_token=graph.cache.bytes_per_token if graph.cache is not None else None,
        kv_cache_window_bytes=graph.cache.window_bytes if graph.cache is not None else None,
        op_histogram=dict(sorted(ops.items())),
    )
