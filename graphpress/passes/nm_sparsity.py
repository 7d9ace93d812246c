"""nm_sparsity: N:M structured sparsity (2:4 by default) along each linear's input dimension.

In every run of m consecutive inputs of a row, the n weights with the highest score stay:
``magnitude`` scores |W_ij|; ``activation`` scores |W_ij| * ||X_j|| (Wanda, Sun et al.
2023), X the layer's calibration inputs. With ``update`` the kept weights of each row are
refit by least squares on the calibration inputs (the one-shot reconstruction SparseGPT
approximates column by column), which can only lower the calibration output error.

Storage: ``compressed`` replaces the linear's weight by ``graphpress::nm_weight(values,
positions)`` (kept values + log2(m)-bit positions; 2:4 fp32 is 0.52x of dense), ``dense``
writes the masked weight with zeros back into the same parameter.

Invariants (tested): every group of m inputs has at most n non-zeros; the stored format
rebuilds exactly the masked weight; ``update`` does not raise the output error.
"""

from __future__ import annotations

import torch

from ..errors import PassPreconditionError
from ..ir import Graph
from ..ir.ops.bitstream import pack_bits
from ..ir.ops.nm_sparse import position_bits
from ..schema import NmSparsityConfig
from .base import LayerReport, Pass, PassReport
from .context import PassContext
from .low_rank import relative_error
from .registry import register

ROWS_PER_SOLVE = 32  # rows refit together (each a kept x kept system)


@register
class NmSparsity(Pass):
    name = "nm_sparsity"
    Config = NmSparsityConfig

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        self.require_linears(graph, ctx)
        cfg: NmSparsityConfig = self.config
        for lin in self.selected_linears(graph, ctx):
            if lin.in_features % cfg.m:
                raise PassPreconditionError(
                    f"{ctx.spec_path}.m: {cfg.m} does not divide the {lin.in_features} inputs of {lin.path}"
                )

    def apply(self, graph: Graph, ctx: PassContext) -> PassReport:
        cfg: NmSparsityConfig = self.config
        report = self.new_report()
        linears = self.selected_linears(graph, ctx)
        inputs = ctx.linear_inputs(graph, linears)
        for lin in linears:
            weight = graph.weight(lin.weight)
            w = weight.detach().double()
            gram = inputs[lin.node.name].gram.double()
            score = w.abs() * gram.diagonal().clamp_min(0).sqrt() if cfg.score == "activation" else w.abs()
            columns, within = keep(score, cfg.n, cfg.m)
            if cfg.update:
                w = refit(w, gram, columns, cfg.damping)
            values = w.gather(1, columns).to(weight.dtype)
            dense = torch.zeros_like(weight).scatter(1, columns, values)
            x = inputs[lin.node.name].rows.to(weight.dtype)
            positions = pack_bits(within, position_bits(cfg.m))
            if cfg.storage == "dense":
                graph.set_weight(lin.weight, dense)
            else:
                cfg_args = (cfg.n, cfg.m, lin.in_features)
                tensors = {"nm_values": values, "nm_positions": positions}
                self.store_weight_as(graph, lin, torch.ops.graphpress.nm_weight.default, tensors, *cfg_args)
            bytes_before = weight.numel() * weight.element_size()
            bytes_after = (
                bytes_before if cfg.storage == "dense" else values.numel() * values.element_size() + positions.numel()
            )
            report.layers.append(
                LayerReport(
                    lin.path,
                    "sparsified",
                    lin.params,
                    lin.params if cfg.storage == "dense" else values.numel() + (lin.out_features if lin.bias else 0),
                    {
                        "pattern": f"{cfg.n}:{cfg.m}",
                        "weight_bytes": (bytes_before, bytes_after),
                        "weight_error": relative_error(dense, weight),
                        "output_error": relative_error(x @ dense.T, x @ weight.T),
                    },
                )
            )
        return report


def keep(score: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept columns (out, in/m*n), their positions within their group), ascending; ties go to the lower column."""
    out, inp = score.shape
    groups = score.reshape(out, inp // m, m)
    # stable: among equal scores the earlier column wins
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    within = order.sort(-1).values
    columns = within + (torch.arange(inp // m) * m)[None, :, None]
    return columns.reshape(out, -1), within.reshape(out, -1)


def refit(w: torch.Tensor, gram: torch.Tensor, columns: torch.Tensor, damping: float) -> torch.Tensor:
    """Per row: the weights on the kept columns minimising ||X w' - X w||, ridge-damped."""
    ridge = damping * gram.diagonal().mean().clamp_min(1e-12)
    out = w.clone()
    for start in range(0, w.shape[0], ROWS_PER_SOLVE):
        rows = slice(start, start + ROWS_PER_SOLVE)
        cols = columns[rows]
        g_ss = gram[cols.unsqueeze(-1), cols.unsqueeze(-2)]
        g_ss = g_ss + ridge * torch.eye(cols.shape[1], dtype=gram.dtype)
        rhs = (gram[cols] @ w[rows].unsqueeze(-1)).squeeze(-1)
        factor = torch.linalg.cholesky(g_ss)  # symmetric positive definite once damped
        solved = torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)
        out[rows] = torch.zeros_like(w[rows]).scatter(1, cols, solved)
    return out
