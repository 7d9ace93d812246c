"""weight_quant: b-bit integer weights with a scale (and zero point) per block of input columns.

Every block of ``group_size`` columns of a row gets an affine grid: asymmetric, codes
0 .. 2^b - 1 over [min(w, 0), max(w, 0)] with an integer zero point; symmetric, codes
centred on 2^(b-1) with the block's signed extreme on the lowest code (llama.cpp's Q4_0
choice; ``MatMulNBits``' default zero point). ``clip: mse`` shrinks each range to the
factor in [0.8, 1] with the lowest squared error (GPTQ's ``mse`` grid), weighted by the
input channels' calibration energy.

Methods:

- ``rtn``: every weight rounded to its block's nearest code.
- ``gptq`` (Frantar et al. 2022, Algorithm 1): columns quantized in order; the error of
  column j, divided by [H^-1]_jj, is pushed onto the remaining columns along row j of
  the upper Cholesky factor of H^-1 (H = X^T X + damping), batched ``lazy_block``
  columns at a time. A block's grid is fixed when its first column is reached, from
  the updated weights; with ``act_order`` columns go by decreasing H_jj and the grids
  come first from the unquantized weight (static groups), so blocks stay contiguous.
- ``awq`` (Lin et al. 2023, eq. 4-5), before either: per input channel s = mean|x|^alpha,
  alpha from a grid minimising ||X W^T - (X/s) Q(W s)^T|| over the calibration rows, for
  all linears reading the same input at once; 1/s folds into the op producing x
  (:func:`graphpress.ir.channels.channel_scale_site`), so the graph is exact before
  rounding.

The linear becomes ``linear(x, graphpress::int_weight(codes, scales, zeros))``
(:mod:`graphpress.ir.ops.int_weight`: ``MatMulNBits``' layout). An N:M linear keeps its
sparsity: its kept values are quantized (round to nearest: GPTQ's column sweep needs the
same columns in every row), and ``nm_weight`` reads them through ``int_weight``.

Invariants (tested): every rebuilt weight lies on its block's grid; a weight already on
the grid is reproduced exactly; GPTQ's calibration objective tr(dW H dW^T) is no worse
than round-to-nearest's; AWQ's scaling alone leaves the function unchanged.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor, fx

from ..errors import PassPreconditionError
from ..execution import job_result
from ..ir import Graph, Linear
from ..ir.channels import channel_scale_site, scale_input_channels
from ..ir.ops import int_weight
from ..ir.ops.nm_sparse import kept_columns
from ..progress import track
from ..schema import WeightQuantConfig
from .base import LayerReport, Pass, PassReport, stored_call
from .context import LinearInputs, PassContext, by_input
from .low_rank import relative_error
from .registry import register

INT = torch.ops.graphpress.int_weight.default
SHRINKS = [1 - i / 100 for i in range(21)]  # clip "mse": range factors tried, 1.0 down to 0.8


@dataclass(frozen=True)
class Grid:
    """A weight's quantization grid: scales and integer zero points per (row, block); float64."""

    scales: Tensor
    zeros: Tensor
    bits: int
    block: int

    def codes(self, w: Tensor, cols: slice) -> Tensor:
        """Codes of the weights ``w`` (N, c) at columns ``cols``: nearest on their blocks' grids."""
        scale, zero = self._at(cols)
        return (torch.round(w / scale) + zero).clamp(0, 2**self.bits - 1)

    def values(self, codes: Tensor, cols: slice) -> Tensor:
        scale, zero = self._at(cols)
        return (codes - zero) * scale

    def _at(self, cols: slice):
        index = torch.arange(cols.start, cols.stop) // self.block
        return self.scales[:, index], self.zeros[:, index]


def block_size(cfg: WeightQuantConfig, in_features: int) -> int:
    """The configured group size, or (per channel) one block of the next power of two >= 16: MatMulNBits' rule."""
    return cfg.block_size or max(16, 1 << math.ceil(math.log2(in_features)))


def fit_blocks(w: Tensor, bits: int, symmetric: bool, clip: str, energy: Tensor, dtype) -> tuple[Tensor, Tensor]:
    """(scales, zeros) of blocks ``w`` (N, blocks, g), each block's range chosen per ``clip``.

    ``energy`` (broadcastable to w) weighs the squared error of the mse search. Scales are
    rounded to the stored dtype here, so the codes are chosen for the scales stored.
    """
    candidates = [_affine(w, bits, symmetric, shrink, dtype) for shrink in (SHRINKS if clip == "mse" else [1.0])]
    if len(candidates) == 1:
        return candidates[0]
    errors = torch.stack([(_error(w, s, z, bits) * energy).sum(-1) for s, z in candidates])
    best = errors.argmin(0)  # the first (widest) among equals
    scales = torch.stack([s for s, _ in candidates]).gather(0, best[None]).squeeze(0)
    zeros = torch.stack([z for _, z in candidates]).gather(0, best[None]).squeeze(0)
    return scales, zeros


def _affine(w: Tensor, bits: int, symmetric: bool, shrink: float, dtype) -> tuple[Tensor, Tensor]:
    if symmetric:
        extreme = w.gather(-1, w.abs().argmax(-1, keepdim=True)).squeeze(-1) * shrink
        scale = -extreme / 2 ** (bits - 1)  # the signed extreme lands on code 0 exactly
        scale = torch.where(scale == 0, torch.ones_like(scale), scale).to(dtype).double()
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    low = (w.amin(-1) * shrink).clamp(max=0)
    high = (w.amax(-1) * shrink).clamp(min=0)
    scale = (high - low) / (2**bits - 1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).to(dtype).double()
    return scale, torch.round(-low / scale).clamp(0, 2**bits - 1)


def _error(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    codes = (torch.round(w / scale[..., None]) + zero[..., None]).clamp(0, 2**bits - 1)
    return ((codes - zero[..., None]) * scale[..., None] - w).square()


def fit_grid(w: Tensor, bits: int, block: int, symmetric: bool, clip: str, energy: Tensor | None, dtype) -> Grid:
    """The grid of every block of ``w`` (N, K); padding columns are zeros, which every range holds."""
    n, k = w.shape
    blocks = -(-k // block)
    padded = torch.nn.functional.pad(w, (0, blocks * block - k)).reshape(n, blocks, block)
    weights = torch.ones(k, dtype=torch.float64) if energy is None else energy.double()  # (K,) or (N, K)
    weights = torch.nn.functional.pad(weights, (0, blocks * block - k))
    weights = weights.reshape(*weights.shape[:-1], blocks, block)
    scales, zeros = fit_blocks(padded, bits, symmetric, clip, weights, dtype)
    return Grid(scales, zeros, bits, block)


def rtn(w: Tensor, grid: Grid) -> Tensor:
    """Round to nearest: the codes (N, K) of ``w`` on ``grid``."""
    return grid.codes(w, slice(0, w.shape[1]))


def gptq(w: Tensor, gram: Tensor, cfg: WeightQuantConfig, block: int, dtype, act_order: bool) -> tuple[Tensor, Grid]:
    """GPTQ (Frantar et al. 2022, Algorithm 1) on a block grid; (codes (N, K), grid)."""
    h = hessian(gram)
    energy = h.diagonal().clone()
    order = torch.argsort(energy, descending=True, stable=True) if act_order else torch.arange(w.shape[1])
    state = {"grid": fit_grid(w, cfg.bits, block, cfg.symmetric, cfg.clip, energy, dtype)}  # static (act_order)
    codes = torch.zeros_like(w)

    def round_column(col: int, values: Tensor, peek) -> Tensor:
        if not act_order and col % block == 0:  # a block starts: its grid from the weights as corrected so far
            state["grid"] = _refit_block(state["grid"], cfg, peek(block), col, energy, dtype)
        grid = state["grid"]
        codes[:, col] = grid.codes(values[:, None], slice(col, col + 1))[:, 0]
        return grid.values(codes[:, col : col + 1], slice(col, col + 1))[:, 0]

    compensated_sweep(w, h, cfg.damping, cfg.lazy_block, order, round_column)
    return codes, state["grid"]


def hessian(gram: Tensor) -> Tensor:
    """X^T X (float64), with H_jj = 1 for inputs no calibration token reached: rounded, their error kept local."""
    h = gram.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    return h


def compensated_sweep(w: Tensor, h: Tensor, damping: float, lazy: int, order: Tensor, round_column) -> None:
    """GPTQ's error-feedback sweep with any rounding (an affine grid, a codebook).

    Columns go in ``order``; ``round_column(col, values, peek)`` returns column ``col``
    rounded, ``values`` being its weights after the corrections of the columns before, and
    ``peek(n)`` the next n columns as corrected so far. Its error, over [U]_jj, is pushed onto
    the later columns along U's row (U: upper Cholesky factor of (H + damping)^-1), the
    columns beyond the current ``lazy`` batch updated once per batch.
    """
    n, k = w.shape
    u = inverse_cholesky(h[order][:, order], damping)
    work = w[:, order].clone()
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        batch, errors = work[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=torch.float64)
        for i in range(i2 - i1):
            peek = functools.partial(_corrected, work, batch, errors, u, i1, i2, i)
            rounded = round_column(order[i1 + i].item(), batch[:, i], peek)
            err = (batch[:, i] - rounded) / u[i1 + i, i1 + i]
            batch[:, i:] -= err[:, None] * u[i1 + i, i1 + i : i2][None]
            errors[:, i] = err
        work[:, i2:] -= errors @ u[i1:i2, i2:]


def _corrected(work, batch, errors, u, i1: int, i2: int, i: int, count: int) -> Tensor:
    """Columns i1 + i .. i1 + i + count of the sweep as corrected so far: the batch's own, and past it the
    stored weights minus the batch's pending corrections."""
    end = min(i1 + i + count, work.shape[1])
    inside = batch[:, i : end - i1]
    if end <= i2:
        return inside
    return torch.cat([inside, work[:, i2:end] - errors[:, :i] @ u[i1 : i1 + i, i2:end]], 1)


def _refit_block(grid: Grid, cfg, columns: Tensor, col: int, energy: Tensor, dtype) -> Grid:
    b = col // grid.block
    weights = energy[col : col + columns.shape[1]]
    s, z = fit_blocks(columns[:, None], cfg.bits, cfg.symmetric, cfg.clip, weights, dtype)
    scales, zeros = grid.scales.clone(), grid.zeros.clone()
    scales[:, b], zeros[:, b] = s[:, 0], z[:, 0]
    return Grid(scales, zeros, grid.bits, grid.block)


def inverse_cholesky(h: Tensor, damping: float) -> Tensor:
    """Upper Cholesky factor of (H + damping * mean(diag H) I)^-1; more damping while H is not positive definite."""
    eye = torch.eye(len(h), dtype=h.dtype)
    ridge = damping * h.diagonal().mean().clamp_min(1e-12)
    for _ in range(8):
        lower, info = torch.linalg.cholesky_ex(h + ridge * eye)
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        ridge *= 10
    raise PassPreconditionError("gptq: the calibration Hessian is not positive definite even with damping")


def objective(dw: Tensor, gram: Tensor) -> float:
    """GPTQ's layer objective tr(dW H dW^T) = ||X dW^T||^2 over the calibration rows."""
    return float(((dw @ gram.double()) * dw).sum())


@register
class WeightQuant(Pass):
    name = "weight_quant"
    Config = WeightQuantConfig
    accepts_stored = ("graphpress::nm_weight",)

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        self.require_linears(graph, ctx)

    def apply(self, graph: Graph, ctx: PassContext) -> PassReport:
        """Each dense linear's quantization (GPTQ's sweep, or a grid fit) is a pure job for ``ctx.engine``; the graph
        is rewritten here, in order. Without AWQ the statistics come one input at a time (a streamed graph never
        holds every layer's X^T X); AWQ folds every input's scale into its producer before the first linear is
        quantized, so it reads them all first."""
        cfg: WeightQuantConfig = self.config
        report = self.new_report()
        report.details["engine"] = ctx.engine.name
        dense, sparse = self.selected_linears(graph, ctx), self.selected_stored(graph, ctx)
        if cfg.awq:
            inputs = ctx.linear_inputs(graph, [*dense, *sparse])
            scaled = self.activation_scales(graph, dense, inputs, report)
            groups = ((group, inputs) for group in track(by_input(graph, dense), f"{ctx.spec_path} weight_quant"))
        else:
            inputs, scaled = ctx.linear_inputs(graph, sparse), {}  # before the dense ones are rewritten
            groups = ctx.linear_input_groups(graph, dense, f"weight_quant: {cfg.method}")
        pending: deque = deque()
        for group, group_inputs in groups:
            for lin in group:
                s = scaled.get(lin.node.name)
                x = group_inputs[lin.node.name] if s is None else _scaled_inputs(group_inputs[lin.node.name], s)
                params = (lin.params, lin.out_features if lin.bias else 0)
                job = QuantJob(lin.path, graph.weight(lin.weight), x, self.blind(report, lin, x), s is not None, params)
                pending.append((lin, ctx.engine.submit(quantize_layer, cfg, job)))
                while len(pending) > ctx.engine.in_flight:
                    self.rewrite(graph, *pending.popleft(), ctx, report)
        while pending:
            self.rewrite(graph, *pending.popleft(), ctx, report)
        if sparse and cfg.method == "gptq":
            report.warnings.append(
                "N:M-sparse linears: their kept values are rounded to nearest (GPTQ's column sweep needs the same "
                f"columns in every row): {', '.join(lin.path for lin in sparse)}"
            )
        for lin in track(sparse, f"{ctx.spec_path} weight_quant: N:M values"):
            self.quantize_sparse(graph, lin, inputs[lin.node.name], report)
        return report

    def rewrite(self, graph: Graph, lin: Linear, job, ctx: PassContext, report: PassReport) -> None:
        result = ctx.engine.result(job)
        self.store_weight_as(graph, lin, INT, result.tensors, *result.args)
        report.layers.append(result.report)

    def blind(self, report: PassReport, lin: Linear, x: LinearInputs) -> bool:
        """No calibration input reached a linear whose method needs one: it is rounded to nearest (and warned)."""
        cfg: WeightQuantConfig = self.config
        aware = cfg.method == "gptq" or cfg.clip == "mse"
        return aware and self.data_free(report, lin, x.reached, "it is rounded to nearest with min/max ranges")

    def quantize(self, weight: Tensor, x: LinearInputs, blind: bool) -> tuple[Tensor, Grid]:
        """Codes and grid of a dense weight by the configured method (round to nearest with min/max if ``blind``)."""
        cfg: WeightQuantConfig = self.config
        block = block_size(cfg, weight.shape[1])
        w, dtype = weight.detach().double(), weight.dtype
        if cfg.method == "gptq" and not blind:
            return gptq(w, x.gram, cfg, block, dtype, cfg.act_order)
        energy = None if blind else x.gram.diagonal().double()
        grid = fit_grid(w, cfg.bits, block, cfg.symmetric, "minmax" if blind else cfg.clip, energy, dtype)
        return rtn(w, grid), grid

    def quantize_sparse(self, graph: Graph, lin, x: LinearInputs, report: PassReport) -> None:
        cfg: WeightQuantConfig = self.config
        values_node, positions_node, n, m, in_features = lin.op.args
        values = graph.weight(graph.tensor_name(values_node))
        positions = graph.weight(graph.tensor_name(positions_node))
        kept = values.shape[1]
        block = block_size(cfg, kept)
        energy = x.gram.diagonal().double()[kept_columns(positions, n, m, kept)] if x.reached else None
        grid = fit_grid(values.detach().double(), cfg.bits, block, cfg.symmetric, cfg.clip, energy, values.dtype)
        codes = rtn(values.detach().double(), grid)
        tensors = int_weight.pack(codes, grid.scales.to(values.dtype), self.zeros(grid), cfg.bits, block)
        args = self.args(block, kept)
        graph.replace_input(
            lin.op, 0, lin.path, lambda b, p=lin.path, t=tensors: stored_call(graph, b, p, INT, t, *args)
        )
        rebuilt = grid.values(codes, slice(0, kept)).to(values.dtype)
        before = torch.ops.graphpress.nm_weight(values, positions, n, m, in_features)
        after = torch.ops.graphpress.nm_weight(rebuilt, positions, n, m, in_features)
        rows = x.rows.to(values.dtype)
        layer = self.layer_report(lin.path, values, rebuilt, rows @ before.T, rows @ after.T)
        layer.details["bytes"] = _bytes(tensors)
        report.layers.append(layer)

    def zeros(self, grid: Grid) -> Tensor | None:
        return None if self.config.symmetric else grid.zeros.long()

    def args(self, block: int, in_features: int) -> tuple:
        """int_weight's arguments after the stored tensors (a symmetric weight stores no zero points)."""
        return (*([None] if self.config.symmetric else []), self.config.bits, block, in_features)

    def layer_report(self, path: str, before: Tensor, after: Tensor, out_before: Tensor, out_after: Tensor):
        cfg: WeightQuantConfig = self.config
        return LayerReport(
            path,
            "quantized",
            before.numel(),
            0,
            {
                "bits": cfg.bits,
                "group_size": cfg.group_size,
                "method": cfg.method + ("+awq" if cfg.awq else ""),
                "weight_error": relative_error(after, before),
                "output_error": relative_error(out_after, out_before),
            },
        )

    # ---------------------------------------------------------------- AWQ
    def activation_scales(
        self, graph: Graph, linears: list[Linear], inputs: dict[str, LinearInputs], report: PassReport
    ) -> dict[str, Tensor]:
        """Search and fold AWQ's per-channel scales, one per input shared by the selected linears; {node: s}."""
        cfg: WeightQuantConfig = self.config
        by_input: dict[fx.Node, list[Linear]] = {}
        for lin in linears:
            by_input.setdefault(lin.node.args[0], []).append(lin)
        plain = {lin.node: lin for lin in graph.linears()}
        scaled, unscaled = {}, []
        for x_node, group in track(list(by_input.items()), "weight_quant: awq scales"):
            consumers = [plain.get(user) for user in x_node.users]
            site = channel_scale_site(graph, x_node)
            x = inputs[group[0].node.name]
            if site is None or None in consumers or any(c.node.args[0] is not x_node for c in consumers):
                unscaled.append(", ".join(lin.path for lin in group))
                continue
            if not x.reached:
                continue
            weights = [graph.weight(lin.weight).detach().double() for lin in group]
            dtype = graph.stored(group[0].weight).dtype
            s, alpha = search_scale(weights, x.rows.double(), cfg, block_size(cfg, group[0].in_features), dtype)
            if alpha == 0:
                continue
            scale_input_channels(graph, site, consumers, s)
            for lin in group:
                scaled[lin.node.name] = s
            report.details.setdefault("awq_alpha", {})[group[0].path] = alpha
        if unscaled:
            report.warnings.append(
                "awq: not scaled (the input is not produced by a norm weight or a linear through casts and products "
                f"only, or is read by other ops, so 1/s cannot be folded): {'; '.join(unscaled)}"
            )
        return scaled


@dataclass
class QuantJob:
    """One dense linear's quantization and everything it reads: a pure job, picklable, that an engine may run
    elsewhere."""

    path: str
    weight: Tensor
    inputs: LinearInputs
    """Its calibration inputs (divided by AWQ's scale where one was folded)."""
    blind: bool
    """No calibration input reached it: round to nearest with min/max ranges."""
    awq_scaled: bool
    params: tuple[int, int]


@dataclass
class QuantResult:
    tensors: dict[str, Tensor]
    args: tuple
    report: LayerReport


job_result(QuantResult, LayerReport)


def quantize_layer(config: WeightQuantConfig, job: QuantJob) -> QuantResult:
    """A linear's packed codes, scales and zero points, and its report (what an engine runs)."""
    quant, weight = WeightQuant(config), job.weight
    codes, grid = quant.quantize(weight, job.inputs, job.blind)
    tensors = int_weight.pack(codes, grid.scales.to(weight.dtype), quant.zeros(grid), config.bits, grid.block)
    rebuilt = grid.values(codes, slice(0, weight.shape[1])).to(weight.dtype)
    rows = job.inputs.rows.to(weight.dtype)
    layer = quant.layer_report(job.path, weight, rebuilt, rows @ weight.T, rows @ rebuilt.T)
    layer.details.update({"bytes": _bytes(tensors), **({"awq_scaled": True} if job.awq_scaled else {})})
    layer.params_before, layer.params_after = job.params
    return QuantResult(tensors, quant.args(grid.block, weight.shape[1]), layer)


def search_scale(
    weights: list[Tensor], rows: Tensor, cfg: WeightQuantConfig, block: int, dtype
) -> tuple[Tensor, float]:
    """AWQ's search (eq. 5): s = mean|x|^alpha normalised, alpha on a grid in [0, 1); the best (s, alpha)."""
    magnitude = rows.abs().mean(0).clamp_min(1e-8)
    reference = [rows @ w.T for w in weights]
    best, best_alpha, best_loss = torch.ones_like(magnitude), 0.0, None
    for step in range(cfg.awq_grid):
        alpha = step / cfg.awq_grid
        s = magnitude**alpha
        s = s / (s.max() * s.min()).sqrt()
        loss = 0.0
        for w, ref in zip(weights, reference):
            grid = fit_grid(w * s, cfg.bits, block, cfg.symmetric, "minmax", None, dtype)
            loss += float(((rows / s) @ grid.values(rtn(w * s, grid), slice(0, w.shape[1])).T - ref).square().sum())
        if best_loss is None or loss < best_loss:
            best, best_alpha, best_loss = s, alpha, loss
    return best, best_alpha


def _scaled_inputs(x: LinearInputs, s: Tensor) -> LinearInputs:
    """The inputs a linear sees once AWQ divided its input channels by s: no second calibration sweep."""
    s = s.float()
    return LinearInputs(x.rows / s, x.gram / (s[:, None] * s[None, :]), x.total, x.count)


def _bytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
