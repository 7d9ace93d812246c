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

Invariants (tested): every rebuilt weight is one of its group's centroids; a group with
at most 2^bits distinct values is reproduced exactly.
"""

from __future__ import annotations

import torch

from ..errors import PassPreconditionError
from ..ir import Graph, Linear
from ..ir.ops.bitstream import pack_bits
from ..schema import WeightClusteringConfig
from .base import LayerReport, Pass, PassReport
from .context import PassContext
from .low_rank import relative_error
from .registry import register


@register
class WeightClustering(Pass):
    name = "weight_clustering"
    Config = WeightClusteringConfig

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        self.require_linears(graph, ctx)
        cfg: WeightClusteringConfig = self.config
        if cfg.granularity == "group":
            for lin in self.selected_linears(graph, ctx):
                if lin.out_features % cfg.group_size:
                    raise PassPreconditionError(
                        f"{ctx.spec_path}.group_size: {cfg.group_size} does not divide the {lin.out_features} "
                        f"output channels of {lin.path}"
                    )

    def apply(self, graph: Graph, ctx: PassContext) -> PassReport:
        cfg: WeightClusteringConfig = self.config
        report = self.new_report()
        linears = self.selected_linears(graph, ctx)
        inputs = ctx.linear_inputs(graph, linears)
        gen = torch.Generator().manual_seed(ctx.seed)
        for lin in linears:
            weight = graph.weight(lin.weight)
            rows = self.group_rows(lin)
            energy = inputs[lin.node.name].gram.diagonal().double() if cfg.weighting == "activation" else None
            codes, codebook = cluster(weight.detach().double(), 2**cfg.bits, rows, cfg.iterations, gen, energy)
            codebook = codebook.to(weight.dtype)
            rebuilt = codebook.reshape(-1)[
                codes + (torch.arange(lin.out_features) // rows * codebook.shape[1])[:, None]
            ]
            x = inputs[lin.node.name].rows.to(weight.dtype)
            packed = pack_bits(codes, cfg.bits)
            tensors = {"lut_indices": packed, "lut_codebook": codebook}
            self.store_weight_as(
                graph, lin, torch.ops.graphpress.lut_weight.default, tensors, cfg.bits, lin.in_features, rows
            )
            bytes_before = weight.numel() * weight.element_size()
            bytes_after = packed.numel() + codebook.numel() * codebook.element_size()
            report.layers.append(
                LayerReport(
                    lin.path,
                    "clustered",
                    lin.params,
                    lin.out_features if lin.bias else 0,
                    {
                        "bits": cfg.bits,
                        "codebooks": codebook.shape[0],
                        "weight_bytes": (bytes_before, bytes_after),
                        "weight_error": relative_error(rebuilt, weight),
                        "output_error": relative_error(x @ rebuilt.T, x @ weight.T),
                    },
                )
            )
        return report

    def group_rows(self, lin: Linear) -> int:
        cfg: WeightClusteringConfig = self.config
        return {"tensor": lin.out_features, "channel": 1, "group": cfg.group_size}[cfg.granularity]


def cluster(
    weight: torch.Tensor,
    k: int,
    group_rows: int,
    iterations: int,
    gen: torch.Generator,
    energy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices (out, in) int64, codebooks (groups, k)) of a weight, one k-means per group of rows."""
    out, inp = weight.shape
    values = weight.reshape(out // group_rows, group_rows * inp)
    weights = (
        torch.ones_like(values)
        if energy is None
        else energy.clamp_min(1e-12).repeat(group_rows)[None].expand_as(values)
    )
    centroids = kmeans_plus_plus(values, weights, k, gen)
    for _ in range(iterations):
        assign = nearest(values, centroids)
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
