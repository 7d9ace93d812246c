"""N:M sparse weights: the N kept values of every group of M input columns, plus their positions.

A weight W (out, in) with at most N non-zeros in every run of M consecutive columns of a
row is stored as ``values`` (out, in / M * N), the kept weights in column order, and
``positions``: each kept value's column within its group (log2 M bits: 2 for 2:4),
packed as a bit stream per row (:mod:`.bitstream`). For 2:4 in fp32 that is
0.5 + 1/64 of the dense bytes.

``graphpress::nm_weight`` rebuilds the dense weight (zeros elsewhere); an N:M linear is
``linear(x, nm_weight(...))``. ONNX: unpack the positions, add each group's first
column, ScatterElements the values into zeros. TVM Relax: the same ops. TIR (:func:`nm_weight_rows`):
column s of group g is the kept value whose position is s, or 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .bitstream import (
    PackedRows,
    Param,
    code_tir,
    onnx_const,
    relax_const,
    unpack_bits,
    unpack_bits_onnx,
    unpack_bits_relax,
    whole_bytes,
)

GROUP_COLUMNS = 16
"""Largest M with a TIR form: its kernel keeps an accumulator per column of a group."""


def position_bits(m: int) -> int:
    return int(math.log2(m))


def _group_starts(kept: int, n: int, m: int) -> Tensor:
    return (torch.arange(kept) // n * m).unsqueeze(0)


def kept_columns(positions: Tensor, n: int, m: int, kept: int) -> Tensor:
    """The input column of every kept value (out, kept)."""
    return unpack_bits(positions, position_bits(m), kept) + _group_starts(kept, n, m).to(positions.device)


def nm_weight_reference(values: Tensor, positions: Tensor, n: int, m: int, in_features: int) -> Tensor:
    """The dense weight (out, in) with ``values`` at their recorded columns."""
    columns = kept_columns(positions, n, m, values.shape[1])
    return values.new_zeros(values.shape[0], in_features).scatter(1, columns, values)


nm_weight = torch.library.custom_op("graphpress::nm_weight", nm_weight_reference, mutates_args=())


@nm_weight.register_fake
def _(values, positions, n, m, in_features):
    return values.new_empty((values.shape[0], in_features))


def nm_weight_onnx(values, positions, n: int, m: int, in_features: int):
    from onnxscript import opset18 as op

    out_features, kept = values.shape
    within = unpack_bits_onnx(positions, position_bits(m), out_features, kept)
    columns = op.Add(within, onnx_const(_group_starts(kept, n, m).numpy(), np.int64))
    zeros = op.Expand(
        op.CastLike(onnx_const(0.0, np.float32), values), onnx_const([out_features, in_features], np.int64)
    )
    return op.ScatterElements(zeros, columns, values, axis=1)


def nm_weight_relax(node, importer):
    """TVM Relax converter (``from_exported_program(custom_convert_map=...)``)."""
    from tvm.relax import op

    bb, (values, positions) = importer.block_builder, (importer.env[a] for a in node.args[:2])
    n, m, in_features = node.args[2:]
    val = node.args[0].meta["val"]
    out_features, kept = val.shape
    within = unpack_bits_relax(bb, positions, position_bits(m), out_features, kept)
    columns = bb.emit(op.add(within, relax_const(_group_starts(kept, n, m).numpy(), "int64")))
    zeros = bb.emit(op.zeros((out_features, in_features), str(val.dtype).removeprefix("torch.")))
    return bb.emit(op.scatter_elements(zeros, columns, values, axis=1))


def nm_weight_rows(values, positions, n: int, m: int, in_features: int) -> PackedRows | None:
    """The TIR form (:class:`PackedRows`) of the stored tensors (fake ones do), one group of M columns per
    element; None where positions straddle bytes (M not 2, 4 or 16) or a group is cut. Column s of group g
    is sum_t [position(g * N + t) == s] * value(g * N + t): the positions of a group are distinct (the
    top N of its M), so at most one term is not zero, as the reference's scatter writes."""
    bits = position_bits(m)
    if not whole_bytes(bits) or m > GROUP_COLUMNS or in_features % m:
        return None
    per_byte = 8 // bits

    def decoder(buffers):
        from tvm import tirx as tir

        values_b, positions_b = buffers
        zero = tir.const(0.0, "float32")

        def value(row, group, column):
            total = zero
            for t in range(n):
                kept = group * n + t
                position = code_tir(positions_b[row, kept // per_byte], kept % per_byte, bits)
                kept_value = tir.Cast("float32", values_b[row, kept])
                total = total + tir.Select(position == column, kept_value, zero)
            return total

        return value

    params = (Param.of("values", values), Param.of("positions", positions))
    return PackedRows("nm", values.shape[0], in_features, m, in_features // m, params, decoder)


ONNX_TRANSLATIONS = {torch.ops.graphpress.nm_weight.default: nm_weight_onnx}
RELAX_CONVERTERS = {torch.ops.graphpress.nm_weight.default: nm_weight_relax}
DECOMPOSITIONS = {torch.ops.graphpress.nm_weight.default: nm_weight_reference}
PACKED_ROWS = {torch.ops.graphpress.nm_weight.default: nm_weight_rows}
