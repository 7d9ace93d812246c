"""Palettized (look-up table) weights: a codebook per group of output rows + packed indices.

A weight W (out, in) is stored as ``codebook`` (groups, 2^bits) and ``indices``: the
b-bit index of every weight into its row group's codebook (rows ``g * group_rows`` to
``(g + 1) * group_rows - 1`` share codebook ``g``). Indices are a bit stream: each run
of 8 indices along a row fills exactly ``bits`` bytes (index k in bits [k * bits,
(k + 1) * bits) of their little-endian concatenation), rows padded to a multiple of 8
indices; 8-bit indices are plain bytes.

``graphpress::lut_weight`` rebuilds the dense weight; a palettized linear is
``linear(x, lut_weight(...))``. ONNX: bytes -> int64 words (Mul + ReduceSum) -> indices
(Div + Mod) -> Gather from the flattened codebooks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def packed_width(n: int, bits: int) -> int:
    """Bytes per row for ``n`` indices of ``bits`` bits."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    return n if bits == 8 else -(-n // 8) * bits


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """(..., n) indices < 2^bits -> (..., packed_width(n, bits)) uint8."""
    if bits == 8:
        return codes.to(torch.uint8)
    n = codes.shape[-1]
    padded = torch.nn.functional.pad(codes.long(), (0, -n % 8))
    runs = padded.reshape(*codes.shape[:-1], -1, 8)
    words = (runs << (bits * torch.arange(8))).sum(-1)  # < 2^56: fits int64
    out = (words.unsqueeze(-1) >> (8 * torch.arange(bits))) & 255
    return out.reshape(*codes.shape[:-1], -1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """(..., packed_width(n, bits)) uint8 -> (..., n) int64 indices."""
    if bits == 8:
        return packed.long()
    runs = packed.long().reshape(*packed.shape[:-1], -1, bits)
    words = (runs << (8 * torch.arange(bits))).sum(-1)
    codes = (words.unsqueeze(-1) >> (bits * torch.arange(8))) & (2**bits - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n]


def _row_offsets(out_features: int, group_rows: int, entries: int) -> Tensor:
    return (torch.arange(out_features) // group_rows * entries).unsqueeze(1)


@torch.library.custom_op("graphpress::lut_weight", mutates_args=())
def lut_weight(indices: Tensor, codebook: Tensor, bits: int, in_features: int, group_rows: int) -> Tensor:
    """The dense weight (out, in): codebook[row // group_rows, index]."""
    codes = unpack_bits(indices, bits, in_features)
    flat = codes + _row_offsets(indices.shape[0], group_rows, codebook.shape[1]).to(codes.device)
    return codebook.reshape(-1)[flat]


@lut_weight.register_fake
def _(indices, codebook, bits, in_features, group_rows):
    return codebook.new_empty((indices.shape[0], in_features))


def lut_weight_onnx(indices, codebook, bits: int, in_features: int, group_rows: int):
    from onnxscript import ir
    from onnxscript import opset18 as op

    def const(values, dtype):
        return op.Constant(value=ir.tensor(np.asarray(values, dtype=dtype)))

    out_features = indices.shape[0]
    entries = codebook.shape[1]
    codes = op.Cast(indices, to=ir.DataType.INT64)
    if bits != 8:
        runs = op.Reshape(codes, const([out_features, -1, bits], np.int64))
        words = op.ReduceSum(op.Mul(runs, const(256 ** np.arange(bits), np.int64)), const([-1], np.int64), keepdims=0)
        codes = op.Mod(
            op.Div(op.Unsqueeze(words, const([-1], np.int64)), const(2 ** (bits * np.arange(8)), np.int64)),
            const(2**bits, np.int64),
        )
        codes = op.Slice(
            op.Reshape(codes, const([out_features, -1], np.int64)),
            const([0], np.int64),
            const([in_features], np.int64),
            const([1], np.int64),
        )
    offsets = const(_row_offsets(out_features, group_rows, entries).numpy(), np.int64)
    return op.Gather(op.Reshape(codebook, const([-1], np.int64)), op.Add(codes, offsets), axis=0)


ONNX_TRANSLATIONS = {torch.ops.graphpress.lut_weight.default: lut_weight_onnx}
