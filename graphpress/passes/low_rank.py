"""low_rank: factor a linear into two thin linears by truncated SVD.

    W (out x in) = U S V^T  ~=  B A,   A = S_r^{1/2} V_r^T (rank x in),   B = U_r S_r^{1/2} (out x rank)

so y = W x + b becomes y = B (A x) + b: two ``aten.linear`` calls, no custom op, and
an ONNX export of two MatMuls. By Eckart-Young the truncation minimises ||W - B A||_F
for the rank. The singular values are split evenly between the factors to keep both
well scaled in low precision.

Invariant: at full rank (rank = min(in, out)) the factored layer equals the original
up to floating-point error. A layer is left alone, and reported as skipped, when
rank * (in + out) >= in * out: factoring it would not save parameters.
"""

from __future__ import annotations

import torch

from ..ir import Graph, Linear
from ..schema import LowRankConfig, ParamRatio
from .base import LayerReport, Pass, PassReport
from .context import PassContext
from .registry import register

SPECTRUM_POINTS = 512  # singular values kept in the report (enough to plot; evenly subsampled beyond)


@register
class LowRank(Pass):
    name = "low_rank"
    Config = LowRankConfig

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        self.require_linears(graph, ctx)

    def rank_for(self, linear: Linear) -> int:
        full = min(linear.in_features, linear.out_features)
        rank = self.config.rank
        if isinstance(rank, ParamRatio):
            rank = int(
                rank.param_ratio * linear.in_features * linear.out_features / (linear.in_features + linear.out_features)
            )
        return max(self.config.min_rank, min(rank, full))

    def apply(self, graph: Graph, ctx: PassContext) -> PassReport:
        report = self.new_report()
        linears = self.selected_linears(graph, ctx)
        inputs = ctx.linear_inputs(graph, linears)
        for linear in linears:
            rank = self.rank_for(linear)
            dense = linear.in_features * linear.out_features
            factored = rank * (linear.in_features + linear.out_features)
            if factored >= dense and self.config.only_if_smaller:
                report.layers.append(
                    LayerReport(
                        linear.path,
                        "skipped",
                        linear.params,
                        linear.params,
                        {"rank": rank, "reason": f"rank {rank} x (in + out) = {factored} >= in x out = {dense}"},
                    )
                )
                continue
            weight = graph.weight(linear.weight)
            bias = graph.weight(linear.bias) if linear.bias else None
            a, b, spectrum = factor(weight, rank)
            graph.replace_linear(linear, two_linears(a, b, bias))
            x = inputs[linear.node.name]
            report.layers.append(
                LayerReport(
                    linear.path,
                    "factored",
                    linear.params,
                    factored + (linear.out_features if bias is not None else 0),
                    {
                        "rank": rank,
                        "full_rank": min(linear.in_features, linear.out_features),
                        "weight_error": relative_error(b.float() @ a.float(), weight.float()),
                        "output_error": relative_error(x @ (b.float() @ a.float()).T, x @ weight.float().T),
                        "spectrum": subsample(spectrum, SPECTRUM_POINTS),
                    },
                )
            )
        return report


def factor(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, singular values) with B @ A the best rank-`rank` approximation of `weight`."""
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    root = s[:rank].sqrt()
    a = (root[:, None] * vh[:rank]).to(weight.dtype).contiguous()
    b = (u[:, :rank] * root[None, :]).to(weight.dtype).contiguous()
    return a, b, s


def two_linears(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None):
    """Builder of x -> B (A x) + bias as modules '<path>.0' and '<path>.1' (like an nn.Sequential)."""

    def build(sub, x):
        return sub.linear(sub.linear(x, "0", a), "1", b, bias)

    return build


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    denom = exact.norm().item()
    return (approx - exact).norm().item() / denom if denom > 0 else (approx - exact).norm().item()


def subsample(values: torch.Tensor, points: int) -> list[float]:
    if len(values) > points:
        values = values[torch.linspace(0, len(values) - 1, points).round().long()]
    return [round(v, 6) for v in values.tolist()]
