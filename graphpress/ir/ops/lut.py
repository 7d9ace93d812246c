"""Palettized (look-up table) weights: a codebook per group of output rows + packed indices.

A weight W (out, in) is stored as ``codebook`` (groups, 2^bits) and ``indices``: the
b-bit index of every weight into its row group's codebook (rows ``g * group_rows`` to
``(g + 1) * group_rows - 1`` share codebook ``g``), packed as a bit stream per row
(:mod:`.bitstream`).

``graphpress::lut_weight`` rebuilds the dense weight; a palettized linear is
``linear(x, lut_weight(...))``. ONNX: unpack the bit stream, then Gather from the
flattened codebooks. TVM Relax: the same, with shifts and ``take``. TIR (:func:`lut_weight_rows`):
the per-byte decode the TVM backend's fused ``lut_linear`` kernel runs in registers
(:mod:`graphpress.backends.tvm_linear`).
"""

from __future__ import annotations

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


def _row_offsets(out_features: int, group_rows: int, entries: int) -> Tensor:
    return (torch.arange(out_features) // group_rows * entries).unsqueeze(1)


def lut_weight_reference(indices: Tensor, codebook: Tensor, bits: int, in_features: int, group_rows: int) -> Tensor:
    """The dense weight (out, in): codebook[row // group_rows, index]."""
    codes = unpack_bits(indices, bits, in_features)
    flat = codes + _row_offsets(indices.shape[0], group_rows, codebook.shape[1]).to(codes.device)
    return codebook.reshape(-1)[flat]


lut_weight = torch.library.custom_op("graphpress::lut_weight", lut_weight_reference, mutates_args=())


@lut_weight.register_fake
def _(indices, codebook, bits, in_features, group_rows):
    return codebook.new_empty((indices.shape[0], in_features))


def lut_weight_onnx(indices, codebook, bits: int, in_features: int, group_rows: int):
    from onnxscript import opset18 as op

    out_features = indices.shape[0]
    codes = unpack_bits_onnx(indices, bits, out_features, in_features)
    offsets = onnx_const(_row_offsets(out_features, group_rows, codebook.shape[1]).numpy(), np.int64)
    return op.Gather(op.Reshape(codebook, onnx_const([-1], np.int64)), op.Add(codes, offsets), axis=0)


def lut_weight_relax(node, importer):
    """TVM Relax converter (``from_exported_program(custom_convert_map=...)``)."""
    from tvm.relax import op

    bb, (indices, codebook) = importer.block_builder, (importer.env[a] for a in node.args[:2])
    bits, in_features, group_rows = node.args[2:]
    out_features, entries = node.args[0].meta["val"].shape[0], node.args[1].meta["val"].shape[1]
    codes = unpack_bits_relax(bb, indices, bits, out_features, in_features)
    flat = bb.emit(op.add(codes, relax_const(_row_offsets(out_features, group_rows, entries).numpy(), "int64")))
    return bb.emit(op.take(bb.emit(op.reshape(codebook, (-1,))), flat, axis=0))


def lut_weight_rows(indices, codebook, bits: int, in_features: int, group_rows: int) -> PackedRows | None:
    """The TIR form (:class:`PackedRows`) of the stored tensors (fake ones do), or None where indices straddle
    bytes: a code in row n is codebook[n // group_rows, code]."""
    if not whole_bytes(bits):
        return None
    out_features, width = indices.shape
    params = (Param.of("indices", indices), Param.of("codebook", codebook))

    def decoder(buffers):
        from tvm import tirx as tir

        indices_b, codebook_b = buffers
        return lambda row, j, slot: tir.Cast(
            "float32", codebook_b[row // group_rows, code_tir(indices_b[row, j], slot, bits)]
        )

    return PackedRows("lut", out_features, in_features, 8 // bits, width, params, decoder)


ONNX_TRANSLATIONS = {torch.ops.graphpress.lut_weight.default: lut_weight_onnx}
RELAX_CONVERTERS = {torch.ops.graphpress.lut_weight.default: lut_weight_relax}
DECOMPOSITIONS = {torch.ops.graphpress.lut_weight.default: lut_weight_reference}
PACKED_ROWS = {torch.ops.graphpress.lut_weight.default: lut_weight_rows}
