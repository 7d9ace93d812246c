"""low_rank: factor a linear into two thin linears, y = B (A x) + b.

Every method truncates the SVD of a *scaled* weight M = D W S, the scaling chosen
so that the truncation error of M is the error the method cares about:

    svd           D = I, S = I               ||W - W'||_F                     (Eckart-Young)
    whitened_svd  D = I, S = chol(X^T X)     ||X (W - W')^T||_F = ||(W - W') S||_F
                                                                           (SVD-LLM; ASVD's aim)
    fisher_svd    D = diag(sqrt(I_i)), S = I  sum_i I_i ||W_i - W'_i||^2   (FWSVD, Hsu et al. 2022)

with X the calibration inputs of the layer and I_i the Fisher information of output
row i (sum of squared gradients of the LM loss). With M ~= U_r Sigma_r V_r^T,

    A = Sigma_r^1/2 V_r^T S^-1   (rank x in),     B = D^-1 U_r Sigma_r^1/2   (out x rank)

The factored layer is two ``aten.linear`` nodes, '<path>.0' and '<path>.1' (no custom op;
two MatMuls in ONNX). Ranks come from a fixed rank, a per-layer parameter ratio or
spectrum energy, or one budget for all targeted layers, allocated greedily by the
marginal gain of each singular value (its share of its layer's squared spectrum, per
parameter it costs).

Invariants (tested): at full rank the factored layer equals the original; whitened
output error <= plain output error on the calibration data; a budget is never exceeded.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from ..errors import PassPreconditionError
from ..execution import job_result
from ..ir import Graph, Linear
from ..progress import track
from ..schema import Energy, GlobalBudget, LowRankConfig, ParamRatio
from .base import LayerReport, Pass, PassReport
from .context import LinearInputs, PassContext, by_input
from .registry import register

SPECTRUM_POINTS = 512  # singular values kept in the report (enough to plot; evenly subsampled beyond)
FLOAT64_MAX_DIM = 1024  # scaled matrices up to this size are factored in float64; larger in float32


@dataclass
class Scaled:
    """M = D W S for one layer, and how to undo the scaling on the factors."""

    matrix: torch.Tensor
    row_scale: torch.Tensor | None  # D's diagonal, (out,)
    whitener: torch.Tensor | None  # S, lower-triangular (in, in)

    def factors(self, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) from the truncated SVD of M."""
        root = s.sqrt()
        a = root[:, None] * vh
        b = u * root[None, :]
        if self.whitener is not None:  # A = A' S^-1  <=>  S^T A^T = A'^T
            a = torch.linalg.solve_triangular(self.whitener.T, a.T, upper=True).T
        if self.row_scale is not None:
            b = b / self.row_scale[:, None]
        return a, b


@dataclass
class LayerJob:
    """One linear's factoring and everything it reads: a pure job, picklable, that an engine may run elsewhere."""

    path: str
    weight: torch.Tensor
    inputs: LinearInputs
    grad_sq: torch.Tensor | None
    rank: int | None
    """The rank (before rounding to ``rank_multiple``); None: the budget keeps the layer dense."""
    energy: float | None
    """Set: the rank comes from this layer's own spectrum instead."""
    plain: bool
    """No calibration signal reached the layer: plain SVD."""
    has_bias: bool

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.has_bias else 0)


@dataclass
class LayerResult:
    report: LayerReport
    factors: tuple[torch.Tensor, torch.Tensor] | None = None
    """(A, B), in the weight's dtype; None: the layer stays dense."""


job_result(LayerResult, LayerReport)


def factor_group(config: LowRankConfig, jobs: list[LayerJob], seed: int) -> list[LayerResult]:
    """The factors of linears that read one input (so one whitener serves them all): what an engine runs."""
    low_rank, whiteners = LowRank(config), {}
    return [low_rank.factor(job, seed, whiteners) for job in jobs]


@register
class LowRank(Pass):
    name = "low_rank"
    Config = LowRankConfig

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        self.require_linears(graph, ctx)

    # ------------------------------------------------------------------ scaling
    def scaled(
        self,
        weight: torch.Tensor,
        inputs: LinearInputs,
        grad_sq: torch.Tensor | None,
        whiteners: dict[int, torch.Tensor],
    ) -> Scaled:
        """M = D W S for this pass's method; ``whiteners`` caches S for consecutive linears of one input."""
        dtype = torch.float64 if min(weight.shape) <= FLOAT64_MAX_DIM else torch.float32
        w = weight.detach().to(dtype)
        if not self.has_data(inputs, grad_sq):  # no X to whiten by, no gradient to weigh by
            return Scaled(w, None, None)
        if self.config.method == "whitened_svd":
            key = id(inputs.gram)  # q/k/v (and gate/up) share one X^T X object, so one S
            if key not in whiteners:
                whiteners.clear()  # linears of one input come together: keep one S, not one per input
                whiteners[key] = whitener(inputs.gram.to(torch.float64), self.config.damping)
            s = whiteners[key].to(dtype)
            return Scaled(w @ s, None, s)
        if self.config.method == "fisher_svd":
            importance = grad_sq.sum(dim=1)  # I_i: Fisher information of output row i
            importance = importance / importance.mean()  # D's scale cancels in B A; kept O(1) for fp32 factors
            d = (importance + 1e-6).sqrt().to(dtype)  # rows with no gradient keep a small weight
            return Scaled(d[:, None] * w, d, None)
        return Scaled(w, None, None)

    def has_data(self, inputs: LinearInputs, grad_sq: torch.Tensor | None) -> bool:
        """Whether the method's scaling has calibration signal to work with (plain SVD always does)."""
        method = self.config.method
        return method == "svd" or (inputs.reached if method == "whitened_svd" else bool(grad_sq.any()))

    # ------------------------------------------------------------------ ranks
    def fixed_rank(self, linear: Linear) -> int | None:
        """The rank a per-layer policy gives without looking at the spectrum (None: it must look)."""
        rank = self.config.rank
        if isinstance(rank, int):
            return rank
        if isinstance(rank, ParamRatio):
            return int(
                rank.param_ratio * linear.in_features * linear.out_features / (linear.in_features + linear.out_features)
            )
        return None

    def clamp(self, linear: Linear | LayerJob, rank: int) -> int:
        return max(self.config.min_rank, min(rank, linear.in_features, linear.out_features))

    def round(self, linear: Linear | LayerJob, rank: int | None) -> int | None:
        """Down to a multiple of ``rank_multiple``, so budgets still hold; a smaller rank is raised to it."""
        multiple = self.config.rank_multiple
        if rank is None or multiple == 1:
            return rank
        return min(max(multiple, rank - rank % multiple), linear.in_features, linear.out_features)

    def budget_ranks(
        self,
        graph: Graph,
        linears: list[Linear],
        spectra: dict[str, torch.Tensor],
        ctx: PassContext,
        report: PassReport,
    ) -> dict[str, int | None]:
        """Greedy: grow ranks by the singular value with the largest (share of its layer's squared
        spectrum) / (cost of one more rank). A layer's last step, from its largest useful rank to
        staying dense (None), is an item too: gain the whole tail, cost the remaining parameters.
        """
        budget = self.config.rank.budget
        unit = {lin.node.name: graph.stored(lin.weight).element_size() if budget.bytes else 1 for lin in linears}
        target = budget.bytes or budget.params or int(budget.param_ratio * sum(lin.params for lin in linears))
        ranks: dict[str, int | None] = {}
        caps = {lin.node.name: max_useful_rank(lin) for lin in linears}
        spent, items = 0, []
        for order, lin in enumerate(linears):
            name, cap = lin.node.name, caps[lin.node.name]
            if cap < self.config.min_rank:  # too small to factor
                ranks[name], spent = None, spent + lin.params * unit[name]
                continue
            per_rank = (lin.in_features + lin.out_features) * unit[name]
            ranks[name] = self.config.min_rank
            spent += (lin.params - lin.in_features * lin.out_features) * unit[name] + self.config.min_rank * per_rank
            energy = spectra[name].double().square()
            share = (energy / energy.sum().clamp_min(torch.finfo(torch.float64).tiny)).tolist()
            items += [(-share[k] / per_rank, order, k, name, per_rank) for k in range(self.config.min_rank, cap)]
            to_dense = (lin.in_features * lin.out_features - cap * (lin.in_features + lin.out_features)) * unit[name]
            items.append((-sum(share[cap:]) / to_dense, order, cap, name, to_dense))
        if spent > target:
            raise PassPreconditionError(
                f"{ctx.spec_path}.rank.budget: {target:,} is below the least these layers can take "
                f"({spent:,} at min_rank {self.config.min_rank}); raise the budget or lower min_rank"
            )
        blocked = set()
        for _, _, k, name, cost in sorted(items, key=lambda item: item[:3]):
            if name in blocked or k != ranks[name]:
                continue
            if spent + cost > target:
                blocked.add(name)
                continue
            ranks[name] = None if k == caps[name] else k + 1
            spent += cost
        for lin in linears:
            rank = ranks[lin.node.name]
            if rank is not None:
                ranks[lin.node.name] = self.round(lin, rank)
                spent += (ranks[lin.node.name] - rank) * (lin.in_features + lin.out_features) * unit[lin.node.name]
        report.details["budget"] = {"target": target, "spent": spent, "unit": "bytes" if budget.bytes else "params"}
        return ranks

    # ------------------------------------------------------------------ the pass
    def apply(self, graph: Graph, ctx: PassContext) -> PassReport:
        """Jobs per group of linears reading one input, run by ``ctx.engine`` while the sweep goes on; the
        graph is rewritten here, in order, as their results come back."""
        report = self.new_report()
        report.details["method"] = self.config.method
        report.details["engine"] = ctx.engine.name
        linears = self.selected_linears(graph, ctx)
        grads = ctx.weight_grad_squares(graph, linears) if self.config.method == "fisher_svd" else {}
        ranks = None
        if isinstance(self.config.rank, GlobalBudget):  # every layer's spectrum before the first is factored
            inputs = ctx.linear_inputs(graph, linears)
            whiteners: dict[int, torch.Tensor] = {}
            spectra = {
                lin.node.name: torch.linalg.svdvals(
                    self.scaled(
                        graph.weight(lin.weight), inputs[lin.node.name], grads.get(lin.weight), whiteners
                    ).matrix
                )
                for lin in track(linears, f"{ctx.spec_path} low_rank: spectra")
            }
            ranks = self.budget_ranks(graph, linears, spectra, ctx, report)
            groups = (
                (group, inputs) for group in track(by_input(graph, linears), f"{ctx.spec_path} low_rank: factoring")
            )
        else:  # one input's statistics at a time: a streamed graph never holds every layer's X^T X
            groups = ctx.linear_input_groups(graph, linears, "low_rank: factoring")
        pending: deque = deque()
        for group, inputs in groups:
            jobs = [self.job(graph, lin, inputs[lin.node.name], grads.get(lin.weight), ranks, report) for lin in group]
            pending.append((group, ctx.engine.submit(factor_group, self.config, jobs, ctx.seed)))
            while len(pending) > ctx.engine.in_flight:
                self.rewrite(graph, *pending.popleft(), ctx, report)
        while pending:
            self.rewrite(graph, *pending.popleft(), ctx, report)
        return report

    def job(self, graph: Graph, lin: Linear, inputs: LinearInputs, grad_sq, ranks, report: PassReport) -> LayerJob:
        plain = self.data_free(
            report,
            lin,
            self.has_data(inputs, grad_sq),
            f"plain SVD factors it, not {self.config.method}",
            "input" if self.config.method == "whitened_svd" else "gradient",
        )
        energy = self.config.rank.energy if isinstance(self.config.rank, Energy) else None
        if ranks is not None:
            rank = ranks[lin.node.name]
        else:
            rank = None if energy is not None else self.clamp(lin, self.fixed_rank(lin))
        return LayerJob(lin.path, graph.weight(lin.weight), inputs, grad_sq, rank, energy, plain, lin.bias is not None)

    def rewrite(self, graph: Graph, group: list[Linear], job, ctx: PassContext, report: PassReport) -> None:
        for lin, result in zip(group, ctx.engine.result(job), strict=True):
            if result.factors is not None:
                bias = graph.weight(lin.bias) if lin.bias else None
                graph.replace_linear(lin, two_linears(*result.factors, bias))
            report.layers.append(result.report)

    def factor(self, job: LayerJob, seed: int, whiteners: dict) -> LayerResult:
        """One linear's factors and report (pure: what a job runs)."""
        rank = job.rank
        if job.energy is not None:  # this layer's own spectrum
            spectrum = torch.linalg.svdvals(self.scaled(job.weight, job.inputs, job.grad_sq, whiteners).matrix)
            rank = self.clamp(job, energy_rank(spectrum, job.energy))
        rank = self.round(job, rank)
        if rank is None:
            reason = "the budget keeps this layer dense (its whole spectrum is worth the parameters)"
            return LayerResult(
                LayerReport(job.path, "skipped", job.params, job.params, {"rank": None, "reason": reason})
            )
        factored = rank * (job.in_features + job.out_features)
        if factored >= job.in_features * job.out_features and self.config.only_if_smaller:
            reason = f"rank {rank} x (in + out) = {factored} >= in x out = {job.in_features * job.out_features}"
            return LayerResult(
                LayerReport(job.path, "skipped", job.params, job.params, {"rank": rank, "reason": reason})
            )
        scaled = self.scaled(job.weight, job.inputs, job.grad_sq, whiteners)
        kind = self.svd_kind(job, rank)
        if kind == "randomized":
            gen = torch.Generator().manual_seed(seed)
            u, s, vh = randomized_svd(scaled.matrix, rank + self.config.oversample, self.config.power_iters, gen)
        else:
            u, s, vh = torch.linalg.svd(scaled.matrix, full_matrices=False)
        a, b = scaled.factors(u[:, :rank], s[:rank], vh[:rank])
        approx, exact = (b @ a).float(), job.weight.detach().float()
        x = job.inputs.rows
        details = {
            "rank": rank,
            "full_rank": min(job.in_features, job.out_features),
            "method": "svd" if job.plain else self.config.method,
            "svd": kind,
            "weight_error": relative_error(approx, exact),
            "output_error": relative_error(x @ approx.T, x @ exact.T),
            "spectrum": subsample(s, SPECTRUM_POINTS),
            "spectrum_complete": kind == "exact",
        }
        params = rank * (job.in_features + job.out_features) + (job.out_features if job.has_bias else 0)
        dtype = job.weight.dtype
        factors = (a.to(dtype).contiguous(), b.to(dtype).contiguous())
        return LayerResult(LayerReport(job.path, "factored", job.params, params, details), factors)

    def svd_kind(self, lin: Linear | LayerJob, rank: int) -> str:
        if self.config.svd != "auto":
            return self.config.svd
        smaller = min(lin.in_features, lin.out_features)
        return "randomized" if smaller >= 1024 and rank + self.config.oversample <= smaller // 2 else "exact"


def whitener(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """Lower-triangular S with S S^T = X^T X / c + lambda I, c = mean diag, lambda = damping (grown until PD).

    The scale c cancels in B A (S and S^-1 both appear); dividing by it keeps S, and so the
    stored factors, O(1) whatever the activations' magnitude (a tiny S would overflow A in fp32).
    """
    eye = torch.eye(len(gram), dtype=gram.dtype)
    gram = gram / gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)
    ridge = damping
    for _ in range(8):
        s, info = torch.linalg.cholesky_ex(gram + ridge * eye)
        if info == 0:
            return s
        ridge = max(ridge * 10, torch.finfo(gram.dtype).eps)
    raise PassPreconditionError("the calibration inputs' covariance is not positive definite even with damping")


def randomized_svd(matrix: torch.Tensor, columns: int, power_iters: int, gen: torch.Generator):
    """Top singular triplets by a seeded randomized range finder (Halko, Martinsson, Tropp 2011)."""
    columns = min(columns, *matrix.shape)
    omega = torch.randn(matrix.shape[1], columns, generator=gen, dtype=matrix.dtype)
    q = torch.linalg.qr(matrix @ omega).Q
    for _ in range(power_iters):
        q = torch.linalg.qr(matrix.T @ q).Q
        q = torch.linalg.qr(matrix @ q).Q
    u_small, s, vh = torch.linalg.svd(q.T @ matrix, full_matrices=False)
    return q @ u_small, s, vh


def energy_rank(spectrum: torch.Tensor, energy: float) -> int:
    """Smallest r with sum_{k<r} s_k^2 >= energy * sum s_k^2."""
    cumulative = spectrum.double().square().cumsum(0)
    return int(torch.searchsorted(cumulative, energy * cumulative[-1] * (1 - 1e-12)).item()) + 1


def max_useful_rank(lin: Linear) -> int:
    """The largest rank at which two factors hold fewer parameters than the dense weight."""
    return (lin.in_features * lin.out_features - 1) // (lin.in_features + lin.out_features)


def factor(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain truncated SVD: (A, B, singular values) with B @ A the best rank-`rank` approximation."""
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    a, b = Scaled(weight, None, None).factors(u[:, :rank], s[:rank], vh[:rank])
    return a.to(weight.dtype).contiguous(), b.to(weight.dtype).contiguous(), s


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
