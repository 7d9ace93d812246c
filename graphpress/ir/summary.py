"""Size and cost of a graph: parameters, bytes per dtype, linear FLOPs per token, KV-cache bytes per token."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from .graph import Graph, StoredLinear


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
    format_bytes: int = 0
    """Bytes of the tensors that compressed-format ops rebuild weights from (buffers, not parameters: where this
    is not 0, ``params`` no longer measures the weights, ``bytes`` does)."""

    def to_dict(self) -> dict:
        return asdict(self)


def _stored_flops(lin: StoredLinear) -> int:
    out_features, in_features = lin.op.meta["val"].shape
    dense = 2 * in_features * out_features
    if lin.format == "graphpress::nm_weight":
        n, m = lin.op.args[2], lin.op.args[3]
        return dense * n // m
    return dense


def summarize(graph: Graph) -> GraphSummary:
    """``params`` counts parameters; ``bytes`` every stored tensor (parameters, buffers, constants).

    FLOPs are 2 * in * out per linear per token: the cost that weight compression changes;
    attention's sequence-dependent cost is not included. A linear whose weight a format op
    rebuilds counts its dense shape, an N:M one n/m of it (what a sparse kernel computes); a
    shift linear's products are shifts, still counted (shift_add reports the multiplications
    it removed).
    """
    by_dtype: Counter[str] = Counter()
    params = sum(graph.stored(name).numel() for name in graph.program.graph_signature.parameters)
    for tensor in graph.tensors().values():
        by_dtype[str(tensor.dtype).removeprefix("torch.")] += tensor.numel() * tensor.element_size()
    flops = sum(2 * lin.in_features * lin.out_features for lin in graph.linears())
    flops += sum(_stored_flops(lin) for lin in graph.stored_linears())
    ops = Counter(str(n.target) for n in graph.fx.nodes if n.op == "call_function")
    formats = {graph.tensor_name(a) for lin in graph.stored_linears() for a in lin.op.args} - {None}
    return GraphSummary(
        params=params,
        bytes=sum(by_dtype.values()),
        bytes_by_dtype=dict(sorted(by_dtype.items())),
        linear_flops_per_token=flops,
        kv_cache_bytes_per_token=graph.cache.bytes_per_token if graph.cache is not None else None,
        kv_cache_window_bytes=graph.cache.window_bytes if graph.cache is not None else None,
        op_histogram=dict(sorted(ops.items())),
        format_bytes=sum(graph.stored(n).numel() * graph.stored(n).element_size() for n in sorted(formats)),
    )
