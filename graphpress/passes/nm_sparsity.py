"""nm_sparsity: N:M structured sparsity (2:4 by default) along each linear's input dimension.

In every run of m consecutive inputs of a row, the n weights with the highest score stay:
``magnitude`` scores |W_ij|; ``activation`` scores |W_ij| * ||X_j|| (Wanda, Sun et al.
2023), X the layer's calibration inputs. With ``update`` the kept weights of each row are
refit by least squares on the calibration inputs (the one-shot reconstruction SparseGPT
approximates column by column), which can only lower the calibration output error.

With ``permute`` the input channels are first reordered so that the masks keep more of
the score (NVIDIA ASP's channel-swap search), where the order folds into the producing
linears' rows (:mod:`graphpress.ir.channels`: SwiGLU down projections, low-rank second
factors); the graph is exact after permuting, before masking.

Storage: ``compressed`` replaces the linear's weight by ``graphpress::nm_weight(values,
positions)`` (kept values + log2(m)-bit positions; 2:4 fp32 is 0.52x of dense), ``dense``
writes the masked weight with zeros back into the same parameter.

Invariants (tested): every group of m inputs has at most n non-zeros; the stored format
rebuilds exactly the masked weight; ``update`` does not raise the output error;
permuting alone leaves the function unchanged and never lowers the kept score.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from ..errors import PassPreconditionError
from ..execution import job_result
from ..ir import Graph, Linear
from ..ir.channels import channel_producers, permute_input_channels
from ..ir.ops.bitstream import pack_bits
from ..ir.ops.nm_sparse import position_bits
from ..progress import track
from ..schema import NmSparsityConfig
from .base import LayerReport, Pass, PassReport
from .context import LinearInputs, PassContext
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
        """Each linear's mask (and refit) is a pure job for ``ctx.engine``; the graph is rewritten here, in order.
        Without ``permute`` the statistics come one input at a time (a streamed graph never holds every layer's
        X^T X); the permutation search reads them all first, and its reordered graph is calibrated again."""
        cfg: NmSparsityConfig = self.config
        report = self.new_report()
        report.details["engine"] = ctx.engine.name
        linears = self.selected_linears(graph, ctx)
        permuted = self.permute(graph, ctx, linears, report) if cfg.permute else {}
        pending: deque = deque()
        for group, inputs in ctx.linear_input_groups(graph, linears, "nm_sparsity: masks"):
            for lin in group:
                x = inputs[lin.node.name]
                blind = (cfg.score == "activation" or cfg.update) and self.data_free(
                    report, lin, x.reached, "magnitudes pick its weights, unrefit"
                )
                job = MaskJob(
                    lin.path, graph.weight(lin.weight), x, blind, lin.params, lin.out_features if lin.bias else 0
                )
                pending.append((lin, ctx.engine.submit(sparsify_layer, cfg, job)))
                while len(pending) > ctx.engine.in_flight:
                    self.rewrite(graph, *pending.popleft(), ctx, report, permuted)
        while pending:
            self.rewrite(graph, *pending.popleft(), ctx, report, permuted)
        return report

    def rewrite(self, graph: Graph, lin: Linear, job, ctx: PassContext, report: PassReport, permuted) -> None:
        cfg: NmSparsityConfig = self.config
        result = ctx.engine.result(job)
        if cfg.storage == "dense":
            graph.set_weight(lin.weight, result.tensors["weight"])
        else:
            nm = torch.ops.graphpress.nm_weight.default
            self.store_weight_as(graph, lin, nm, result.tensors, cfg.n, cfg.m, lin.in_features)
        if lin.path in permuted:
            result.report.details["kept_score_unpermuted"] = permuted[lin.path]
        report.layers.append(result.report)

    def score(self, weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        if self.config.score == "magnitude":
            return weight.abs()
        return weight.abs() * gram.double().diagonal().clamp_min(0).sqrt()

    def permute(self, graph: Graph, ctx: PassContext, linears: list[Linear], report: PassReport) -> dict[str, float]:
        """Reorder input channels where the order folds into the producers; {path: kept score before}."""
        cfg: NmSparsityConfig = self.config
        inputs = ctx.linear_inputs(graph, linears)
        before, unfoldable = {}, []
        for lin in track(linears, f"{ctx.spec_path} nm_sparsity: channel permutation"):
            producers = channel_producers(graph, lin)
            if producers is None:
                unfoldable.append(lin.path)
                continue
            score = self.score(graph.weight(lin.weight).detach().double(), inputs[lin.node.name].gram)
            perm = search_permutation(score, cfg.n, cfg.m, cfg.permute_rounds)
            before[lin.path] = kept_fraction(score, keep(score, cfg.n, cfg.m)[0])
            if not torch.equal(perm, torch.arange(len(perm))):
                permute_input_channels(graph, lin, producers, perm)
        if unfoldable:
            report.warnings.append(
                f"permute: not permuted (inputs not produced by linears through elementwise ops only, so the order "
                f"cannot be folded away): {', '.join(unfoldable)}"
            )
        return before


def kept_fraction(score: torch.Tensor, columns: torch.Tensor) -> float:
    return float(score.gather(1, columns).sum() / score.sum().clamp_min(1e-300))


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


PAIRS_PER_CHUNK = 256  # group pairs scored together in the permutation search


@dataclass
class MaskJob:
    """One linear's N:M mask and everything it reads: a pure job, picklable, that an engine may run elsewhere."""

    path: str
    weight: torch.Tensor
    inputs: LinearInputs
    blind: bool
    """No calibration input reached it: magnitudes pick its weights, unrefit."""
    params: int
    bias: int


@dataclass
class MaskResult:
    tensors: dict[str, torch.Tensor]
    """``weight`` (storage dense) or ``nm_values`` and ``nm_positions``."""
    report: LayerReport


job_result(MaskResult, LayerReport)


def sparsify_layer(config: NmSparsityConfig, job: MaskJob) -> MaskResult:
    """A linear's kept values and positions (refit on the calibration inputs if asked), and its report."""
    weight, n, m = job.weight, config.n, config.m
    w = weight.detach().double()
    score = w.abs() if job.blind else NmSparsity(config).score(w, job.inputs.gram)
    columns, within = keep(score, n, m)
    if config.update and not job.blind:
        w = refit(w, job.inputs.gram.double(), columns, config.damping)
    values = w.gather(1, columns).to(weight.dtype)
    dense = torch.zeros_like(weight).scatter(1, columns, values)
    x = job.inputs.rows.to(weight.dtype)
    positions = pack_bits(within, position_bits(m))
    bytes_before = weight.numel() * weight.element_size()
    if config.storage == "dense":
        tensors, bytes_after, params_after = {"weight": dense}, bytes_before, job.params
    else:
        tensors = {"nm_values": values, "nm_positions": positions}
        bytes_after = values.numel() * values.element_size() + positions.numel()
        params_after = values.numel() + job.bias
    details = {
        "pattern": f"{n}:{m}",
        "kept_score": kept_fraction(score, columns),
        "weight_bytes": (bytes_before, bytes_after),
        "weight_error": relative_error(dense, weight),
        "output_error": relative_error(x @ dense.T, x @ weight.T),
    }
    return MaskResult(tensors, LayerReport(job.path, "sparsified", job.params, params_after, details))


def search_permutation(score: torch.Tensor, n: int, m: int, rounds: int) -> torch.Tensor:
    """An input-channel order under which the n-of-m masks keep more total score (NVIDIA ASP's channel swaps).

    Each round scores every swap of one channel between two groups exactly (what the
    two groups' kept sums become), then applies the best swap of as many disjoint group
    pairs as improve, best first. Deterministic: no sampling, ties go to the lower index.
    """
    score = score.float()
    channels = score.shape[1]
    groups = channels // m
    perm = torch.arange(channels)
    pairs = torch.triu_indices(groups, groups, offset=1)
    negligible = 1e-6 * score.sum()
    for _ in range(rounds):
        grouped = score[:, perm].reshape(-1, groups, m).transpose(0, 1)  # (groups, rows, m)
        best = torch.cat(
            [
                _best_swaps(grouped, pairs[:, start : start + PAIRS_PER_CHUNK], n)
                for start in range(0, pairs.shape[1], PAIRS_PER_CHUNK)
            ]
        )
        gain, choice = best.max(1)
        order = torch.sort(gain, descending=True, stable=True).indices
        used: set[int] = set()
        swapped = False
        for index in order.tolist():
            if gain[index] <= negligible:
                break
            a, b = pairs[:, index].tolist()
            if a in used or b in used:
                continue
            used.update((a, b))
            i, j = divmod(choice[index].item(), m)
            perm[[a * m + i, b * m + j]] = perm[[b * m + j, a * m + i]]
            swapped = True
        if not swapped:
            break
    return perm


def _best_swaps(grouped: torch.Tensor, pairs: torch.Tensor, n: int) -> torch.Tensor:
    """(pairs, m*m) gain in kept score of swapping channel i of group a with channel j of group b."""
    a, b = grouped[pairs[0]], grouped[pairs[1]]  # (P, rows, m)
    gain_a = _replacement_gain(a, b, n)  # a's channel i replaced by b's channel j: (P, rows, i, j)
    gain_b = _replacement_gain(b, a, n).transpose(-1, -2)
    return (gain_a + gain_b).sum(1).flatten(1)


def _replacement_gain(group: torch.Tensor, incoming: torch.Tensor, n: int) -> torch.Tensor:
    """Change of a group's top-n sum when its channel i is replaced by ``incoming``'s channel j, per row."""
    top = torch.topk(group, n + 1, dim=-1).values  # n < m
    lowest_kept, best_dropped = top[..., n - 1 : n], top[..., n : n + 1]
    kept = group >= lowest_kept  # ties change nothing: equal values give equal sums
    v = incoming.unsqueeze(-2)  # (P, rows, 1, j)
    out = group.unsqueeze(-1)  # (P, rows, i, 1)
    return torch.where(
        kept.unsqueeze(-1),
        torch.maximum(v, best_dropped.unsqueeze(-1)) - out,
        (v - lowest_kept.unsqueeze(-1)).clamp_min(0),
    )
