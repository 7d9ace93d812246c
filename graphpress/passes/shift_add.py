"""shift_add: ShiftAddViT (You et al. 2023): multiplications become shifts and additions.

Linears: every weight becomes ``scale_i * sign * 2^p`` (p in [min_exponent, max_exponent],
or 0), DeepShift-PS style with one scale per output channel, stored as
``graphpress::shift_weight(codes, scale)``: ``exponent_bits + 1`` bits a weight. The
exponent is the nearest power in the linear domain (not the log domain); the scale is the
channel's largest weight over 2^max_exponent, replaced by the least-squares scale for the
chosen codes where that fits the row better. A linear then needs one multiplication per
output (the scale); the rest are shifts and adds.

Attention (``attention: true``): queries and keys entering attention become binary codes,
``sign(x) * mean|x|`` per token and head, so Q.K is a Hamming-style count (additions) times
one product of magnitudes. ShiftAddViT fine-tunes after this; we do not, and the cost shows
in the verification figures and in each block's ``attention_error``.

Invariants (tested): a weight already of the form scale * sign * 2^p is reproduced
exactly; codes round-trip; the output error of a linear is what its report says.
"""

from __future__ import annotations

import torch

from ..errors import PassPreconditionError
from ..ir import Graph, Linear
from ..ir.blocks import AttentionBlock
from ..ir.ops.bitstream import pack_bits
from ..ir.ops.shift import decode, encode, exponent_bits
from ..progress import track
from ..schema import ShiftAddConfig
from .base import LayerReport, Pass, PassReport
from .context import PassContext, run_calibration_sample
from .low_rank import relative_error
from .registry import register

aten = torch.ops.aten
SHIFT = torch.ops.graphpress.shift_weight.default


@register
class ShiftAdd(Pass):
    name = "shift_add"
    Config = ShiftAddConfig

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        if self.config.linears:
            self.require_linears(graph, ctx)
        if self.config.attention:
            for block in self.selected_attention(graph, ctx, field="attention_targets"):
                if block.eager:
                    raise PassPreconditionError(
                        f"{ctx.spec_path}.attention: attention block '{block.path}' is written out as "
                        "matmul/softmax/matmul, not scaled_dot_product_attention; binarized Q/K needs the SDPA form "
                        "(load the model with attn_implementation='sdpa')"
                    )

    def apply(self, graph: Graph, ctx: PassContext) -> PassReport:
        cfg: ShiftAddConfig = self.config
        report = self.new_report()
        # attention first: its blocks are recognised by their q/k/v linears, which shifting replaces
        if cfg.attention:
            blocks = self.selected_attention(graph, ctx, field="attention_targets")
            before = self.attention_outputs(graph, blocks, ctx)
            for block in blocks:
                for index in (0, 1):  # q, k
                    graph.replace_input(
                        block.sdpa, index, block.path, lambda b, x=block.sdpa.args[index]: binarize(b, x)
                    )
            after = self.attention_outputs(graph, blocks, ctx)
            for block in blocks:
                removed = block.num_heads * (block.head_dim - 1)
                report.layers.append(
                    LayerReport(
                        block.path,
                        "binarized q/k",
                        0,
                        0,
                        {
                            "qk_multiplications_removed_per_pair": removed,
                            "attention_error": (
                                relative_error(after[block.path], before[block.path]) if before else None
                            ),
                        },
                    )
                )
        if cfg.linears:
            linears = self.selected_linears(graph, ctx)
            inputs = ctx.linear_inputs(graph, linears)
            for lin in track(linears, f"{ctx.spec_path} shift_add: linears"):
                report.layers.append(self.shift_linear(graph, lin, inputs[lin.node.name].rows))
        return report

    def shift_linear(self, graph: Graph, lin: Linear, x: torch.Tensor) -> LayerReport:
        cfg: ShiftAddConfig = self.config
        weight = graph.weight(lin.weight)
        w = weight.detach().double()
        scale = w.abs().amax(1) / 2.0**cfg.max_exponent
        codes = encode(w, scale, cfg.min_exponent, cfg.max_exponent)
        pattern = decode(codes, torch.ones_like(scale), cfg.min_exponent, cfg.max_exponent)
        fitted = (w * pattern).sum(1) / pattern.square().sum(1).clamp_min(1e-300)
        better = (w - fitted[:, None] * pattern).square().sum(1) < (w - scale[:, None] * pattern).square().sum(1)
        scale = torch.where(better, fitted, scale).to(weight.dtype)
        rebuilt = decode(codes, scale, cfg.min_exponent, cfg.max_exponent)
        bits = exponent_bits(cfg.min_exponent, cfg.max_exponent) + 1
        packed = pack_bits(codes, bits)
        tensors = {"shift_codes": packed, "shift_scale": scale}
        self.store_weight_as(graph, lin, SHIFT, tensors, cfg.min_exponent, cfg.max_exponent, lin.in_features)
        x = x.to(weight.dtype)
        return LayerReport(
            lin.path,
            "shift",
            lin.params,
            lin.out_features + (lin.out_features if lin.bias else 0),
            {
                "bits": bits,
                "zeros": float((codes & (2 ** (bits - 1) - 1) == 0).double().mean()),
                "weight_bytes": (weight.numel() * weight.element_size(), packed.numel() + scale.numel() * 4),
                "weight_error": relative_error(rebuilt, weight),
                "output_error": relative_error(x @ rebuilt.T, x @ weight.T),
                "multiplications_removed_per_token": lin.in_features * lin.out_features - lin.out_features,
            },
        )

    @staticmethod
    def attention_outputs(graph: Graph, blocks: list[AttentionBlock], ctx: PassContext) -> dict[str, torch.Tensor]:
        """Each block's attention output on the first calibration sample."""
        if not ctx.calibration_inputs:
            return {}
        outputs: dict[str, list[torch.Tensor]] = {b.path: [] for b in blocks}
        taps = {b.sdpa.name: (lambda v, p=b.path: outputs[p].append(v.detach().double())) for b in blocks}
        run_calibration_sample(graph, ctx.calibration_inputs[0], taps)
        return {path: torch.cat([v.flatten() for v in values]) for path, values in outputs.items()}


def binarize(b, x):
    """sign(x) * mean(|x|) over the last (head) dimension: a binary code and one magnitude per token and head."""
    magnitude = b.call(aten.mean.dim, b.call(aten.abs.default, x), [-1], True)
    return b.call(aten.mul.Tensor, b.call(aten.sign.default, x), magnitude)
