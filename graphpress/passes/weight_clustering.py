"""weight_clustering: k-means palettization of linear weights (LUT + packed indices).

Each codebook group (the whole tensor, one output channel, or ``group_size`` output
channels) is clustered into 2^bits centroids by 1-D k-means: k-means++ initialisation
(seeded) and Lloyd iterations, assignment by binary search between sorted centroids
(O(n log k) time, O(n) memory, so 8-bit codebooks on large tensors are cheap). With
``weighting: "activation"`` every value counts in proportion to its input channel's
calibration energy E[x_j^2], so centroids follow the weights that move the output most.

The linear becomes ``linear(x, graphpress::lut_weight(indices, codebook))``: indices and
codebooks are buffers, the dense weight is dropped, and the ONNX file stores the packed
indices (``bits`` bits a weight) and the codebooks.

An N:M-sparse linear (``nm_sparsity`` ran first) keeps its sparsity: its kept values are
clustered and ``nm_weight`` reads them through the LUT, so 2:4 + 4-bit stores 3 bits per
dense weight (4-bit values at half density + 2-bit positions).

With ``error_feedback`` the codes are then assigned by GPTQ's sweep
(:func:`graphpress.passes.weight_quant.compensated_sweep`): column by column, each to its
row's nearest centroid after the corrections of the columns before, the error pushed on
through the inverse Hessian of the calibration inputs (GPTVQ, van Baalen et al. 2024, with
the codebooks kept from k-means).

Invariants (tested): every rebuilt weight is one of its group's centroids; a group with
at most 2^bits distinct values is reproduced exactly; error feedback does not raise the
calibration objective tr(dW H dW^T).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from ..errors import PassPreconditionError
from ..execution import job_result
from ..ir import Graph
from ..ir.ops.bitstream import pack_bits
from ..ir.ops.nm_sparse import kept_columns, nm_weight
from ..progress import track
from ..schema import WeightClusteringConfig
from .base import LayerReport, Pass, PassReport, stored_call
from .context import PassContext, layer_seed
from .low_rank import relative_error
from .registry import register
from .weight_quant import compensated_sweep, hessian

LUT = torch.ops.graphpress.lut_weight.default


@dataclass
class Palette:
    """One tensor's palettized storage (what lut_weight reads) and the tensor it rebuilds."""

    tensors: dict[str, torch.Tensor]
    args: tuple[int, int, int]
    rebuilt: torch.Tensor

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@register
class WeightClustering(Pass):
    name = "weight_clustering"
    Config = WeightClusteringConfig
    accepts_stored = ("graphpress::nm_weight",)

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        self.require_linears(graph, ctx)
        cfg: WeightClusteringConfig = self.config
        if cfg.granularity == "group":
            for lin in [*self.selected_linears(graph, ctx), *self.selected_stored(graph, ctx)]:
                out_features = lin.node.meta["val"].shape[-1]
                if out_features % cfg.group_size:
                    raise PassPreconditionError(
                        f"{ctx.spec_path}.group_size: {cfg.group_size} does not divide the {out_features} "
                        f"output channels of {lin.path}"
                    )

    def apply(self, graph: Graph, ctx: PassContext) -> PassReport:
        """Each dense linear's k-means is a pure job for ``ctx.engine`` (in-process or a Ray task; journaled in a
        streamed run), seeded by the layer's path so it does not depend on where or in which order it runs; the
        graph is rewritten here, in order, as results come back."""
        report = self.new_report()
        report.details["engine"] = ctx.engine.name
        dense, sparse = self.selected_linears(graph, ctx), self.selected_stored(graph, ctx)
        sparse_inputs = ctx.linear_inputs(graph, sparse)  # before the dense ones are rewritten
        pending: deque = deque()
        for lin, inputs in self.one_by_one(ctx.linear_input_groups(graph, dense, "weight_clustering: k-means")):
            x = inputs[lin.node.name]
            feedback = self.config.error_feedback and not self.data_free(
                report, lin, x.reached, "its codes are assigned without error feedback"
            )
            job = ClusterJob(
                lin.path,
                graph.weight(lin.weight),
                self.energy(report, lin, x),
                x.rows,
                x.gram if feedback else None,
                layer_seed(ctx.seed, lin.path),
                (lin.params, lin.out_features if lin.bias else 0),
            )
            pending.append((lin, ctx.engine.submit(cluster_layer, self.config, job)))
            while len(pending) > ctx.engine.in_flight:
                self.rewrite(graph, *pending.popleft(), ctx, report)
        while pending:
            self.rewrite(graph, *pending.popleft(), ctx, report)
        if sparse and self.config.error_feedback:
            report.warnings.append(
                "error_feedback: N:M-sparse linears are assigned without it (the sweep needs the same columns in "
                f"every row): {', '.join(lin.path for lin in sparse)}"
            )
        for lin in track(sparse, f"{ctx.spec_path} weight_clustering: k-means (N:M values)"):
            # an N:M weight: its kept values are clustered, and nm_weight reads them from the LUT
            values_node, positions_node, n, m, in_features = lin.op.args
            values = graph.weight(graph.tensor_name(values_node))
            positions = graph.weight(graph.tensor_name(positions_node))
            energy = self.energy(report, lin, sparse_inputs[lin.node.name])
            kept = None if energy is None else energy[kept_columns(positions, n, m, values.shape[1])]
            palette = self.palettize(values, kept, torch.Generator().manual_seed(layer_seed(ctx.seed, lin.path)))

            graph.replace_input(
                lin.op, 0, lin.path, lambda b, p=lin.path, s=palette: stored_call(graph, b, p, LUT, s.tensors, *s.args)
            )
            before = nm_weight(values, positions, n, m, in_features)
            after = nm_weight(palette.rebuilt, positions, n, m, in_features)
            report.layers.append(
                self.layer_report(lin.path, values, palette, sparse_inputs[lin.node.name].rows, before, after)
            )
        return report

    def rewrite(self, graph: Graph, lin, job, ctx: PassContext, report: PassReport) -> None:
        result = ctx.engine.result(job)
        self.store_weight_as(graph, lin, LUT, result.tensors, *result.args)
        report.layers.append(result.report)

    @staticmethod
    def one_by_one(groups):
        """(linear, inputs) pairs from ``linear_input_groups``: a group's statistics live until its last linear."""
        for group, inputs in groups:
            for lin in group:
                yield lin, inputs

    def energy(self, report: PassReport, lin, inputs) -> torch.Tensor | None:
        """E[x_j^2] per input channel under ``weighting: activation``; None: every value counts the same."""
        if self.config.weighting != "activation" or self.data_free(
            report, lin, inputs.reached, "it is clustered unweighted"
        ):
            return None
        return inputs.gram.diagonal().double()

    def palettize(self, weight: torch.Tensor, energy: torch.Tensor | None, gen: torch.Generator) -> Palette:
        """Cluster ``weight`` (out, in); ``energy`` (out, in), when given, weighs each value."""
        cfg: WeightClusteringConfig = self.config
        out, inp = weight.shape
        rows = {"tensor": out, "channel": 1, "group": cfg.group_size}[cfg.granularity]
        codes, codebook = cluster(weight.detach().double(), 2**cfg.bits, rows, cfg.iterations, gen, energy)
        codebook = codebook.to(weight.dtype)
        rebuilt = codebook.reshape(-1)[codes + (torch.arange(out) // rows * codebook.shape[1])[:, None]]
        tensors = {"lut_indices": pack_bits(codes, cfg.bits), "lut_codebook": codebook}
        return Palette(tensors, (cfg.bits, inp, rows), rebuilt)

    def compensate(self, palette: Palette, weight: torch.Tensor, gram: torch.Tensor) -> Palette:
        """Reassign codes with GPTQ's error feedback (GPTVQ, van Baalen et al. 2024): each column to its rows'
        nearest centroids after the corrections of the columns before; the codebooks stay."""
        cfg: WeightClusteringConfig = self.config
        codebook = palette.tensors["lut_codebook"].double()
        rows = palette.args[2]
        per_row = codebook.repeat_interleave(rows, 0)  # each row's group codebook
        codes = torch.zeros(weight.shape, dtype=torch.long)

        def round_column(col: int, values: torch.Tensor, peek) -> torch.Tensor:
            index = nearest(values.reshape(-1, rows), codebook).reshape(-1)
            codes[:, col] = index
            return per_row.gather(1, index[:, None])[:, 0]

        order = torch.arange(weight.shape[1])
        compensated_sweep(weight.detach().double(), hessian(gram), cfg.damping, 128, order, round_column)
        rebuilt = per_row.to(weight.dtype).gather(1, codes)
        tensors = {**palette.tensors, "lut_indices": pack_bits(codes, cfg.bits)}
        return Palette(tensors, palette.args, rebuilt)

    def layer_report(self, path, stored, palette, x, dense_before, dense_after) -> LayerReport:
        """``stored`` is the tensor clustered; ``dense_*`` the linear's weight before and after."""
        x = x.to(dense_before.dtype)
        return LayerReport(
            path,
            "clustered",
            stored.numel(),
            0,
            {
                "bits": self.config.bits,
                "codebooks": palette.tensors["lut_codebook"].shape[0],
                "weight_bytes": (stored.numel() * stored.element_size(), palette.bytes),
                "weight_error": relative_error(palette.rebuilt, stored),
                "output_error": relative_error(x @ dense_after.T, x @ dense_before.T),
            },
        )


@dataclass
class ClusterJob:
    """One dense linear's clustering and everything it reads: a pure job, picklable, that an engine may run
    elsewhere."""

    path: str
    weight: torch.Tensor
    energy: torch.Tensor | None
    """E[x_j^2] per input channel (``weighting: activation``); None: every value counts the same."""
    rows: torch.Tensor
    """Sampled calibration inputs, for the layer's output error."""
    gram: torch.Tensor | None
    """X^T X for error feedback; None: codes by nearest centroid."""
    seed: int
    params: tuple[int, int]


@dataclass
class ClusterResult:
    tensors: dict[str, torch.Tensor]
    args: tuple[int, int, int]
    report: LayerReport


job_result(ClusterResult, LayerReport)


def cluster_layer(config: WeightClusteringConfig, job: ClusterJob) -> ClusterResult:
    """A linear's palette and report (what an engine runs)."""
    clustering, weight = WeightClustering(config), job.weight
    energy = None if job.energy is None else job.energy.expand_as(weight)
    palette = clustering.palettize(weight, energy, torch.Generator().manual_seed(job.seed))
    if job.gram is not None:
        palette = clustering.compensate(palette, weight, job.gram)
    layer = clustering.layer_report(job.path, weight, palette, job.rows, weight, palette.rebuilt)
    layer.params_before, layer.params_after = job.params
    return ClusterResult(palette.tensors, palette.args, layer)


def cluster(
    weight: torch.Tensor,
    k: int,
    group_rows: int,
    iterations: int,
    gen: torch.Generator,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices (out, in) int64, codebooks (groups, k)) of a weight, one k-means per group of rows.

    ``importance`` (out, in): each value's weight in the k-means objective (uniform if None).
    Stops early once no value changes cluster (``iterations`` is an upper bound).
    """
    out, inp = weight.shape
    values = weight.reshape(out // group_rows, group_rows * inp)
    weights = (
        torch.ones_like(values)
        if importance is None
        else importance.to(values.dtype).clamp_min(1e-12).reshape(out // group_rows, group_rows * inp)
    )
    centroids = kmeans_plus_plus(values, weights, k, gen)
    previous = None
    for _ in range(iterations):
        assign = nearest(values, centroids)
        if previous is not None and torch.equal(assign, previous):
            break  # a fixed point of Lloyd's map: the update would give the same centroids again
        previous = assign
        total = torch.zeros_like(centroids).scatter_add_(1, assign, values * weights)
        mass = torch.zeros_like(centroids).scatter_add_(1, assign, weights)
        centroids = torch.where(mass > 0, total / mass.clamp_min(1e-300), centroids)
        centroids = centroids.sort(1).values
    return nearest(values, centroids).reshape(out, inp), centroids


def kmeans_plus_plus(values: torch.Tensor, weights: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding per row (D^2-weighted sampling); rows out of distinct values repeat a centroid."""
    groups = values.shape[0]
    first = torch.multinomial(weights.float(), 1, generator=gen)
    chosen = [values.gather(1, first)]
    dist = (values - chosen[0]).square()
    for _ in range(1, k):
        probs = dist * weights
        empty = probs.sum(1, keepdim=True) <= 0
        probs = torch.where(empty, torch.ones_like(probs), probs / probs.amax(1, keepdim=True).clamp_min(1e-300))
        pick = torch.multinomial(probs.float(), 1, generator=gen)
        chosen.append(values.gather(1, pick))
        dist = torch.minimum(dist, (values - chosen[-1]).square())
    return torch.cat(chosen, 1).reshape(groups, k).sort(1).values


def nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of each row's sorted centroids, by binary search on the midpoints."""
    mids = (centroids[:, 1:] + centroids[:, :-1]) / 2
    return torch.searchsorted(mids.contiguous(), values.contiguous())
