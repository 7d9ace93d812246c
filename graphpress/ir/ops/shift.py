"""Power-of-two (shift) weights: W_ij = scale_i * sign_ij * 2^p_ij, or 0.

Every weight is one code: ``sign << exponent_bits | e``, with ``e = 0`` for a zero weight
and ``e = 1 .. count`` for exponent ``p = min_exponent + e - 1``. Codes are a bit stream
per row (:mod:`.bitstream`), ``exponent_bits + 1`` bits a weight. A product with such a
weight is a shift of the input (and a sign flip); the per-output-channel ``scale`` is the
one multiplication left per output.

``graphpress::shift_weight`` rebuilds the dense weight; a shift linear is
``linear(x, shift_weight(...))``. ONNX and TVM: unpack, split sign and exponent, 2^p by
Pow, times the scale. TIR (:func:`shift_weight_rows`, codes of whole bytes: 4 bits for the
default exponents): the per-byte decode the TVM backend's fused ``shift_linear`` kernel runs in
registers, 2^p built as the float whose exponent field is p (exact, no ``exp2``).
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


def exponent_bits(min_exponent: int, max_exponent: int) -> int:
    """Bits for the exponent codes 0 (zero weight) and 1 .. max - min + 1."""
    return max(1, math.ceil(math.log2(max_exponent - min_exponent + 2)))


def encode(weight: Tensor, scale: Tensor, min_exponent: int, max_exponent: int) -> Tensor:
    """Codes (out, in) of the nearest scale * (+-2^p or 0) to every weight, p in [min, max]."""
    bits = exponent_bits(min_exponent, max_exponent)
    ratio = (weight.abs() / scale[:, None].clamp_min(torch.finfo(weight.dtype).tiny)).double()
    low = torch.floor(torch.log2(ratio.clamp_min(2.0 ** (min_exponent - 1)))).clamp(min_exponent, max_exponent)
    p = torch.where((ratio >= 1.5 * 2.0**low) & (low < max_exponent), low + 1, low)  # nearest of 2^low, 2^(low+1)
    zero = ratio < 2.0 ** (min_exponent - 1)  # nearer to 0 than to the smallest power
    e = torch.where(zero, 0, p.long() - min_exponent + 1)
    sign = ((weight < 0) & ~zero).long()
    return (sign << bits) | e


def decode(codes: Tensor, scale: Tensor, min_exponent: int, max_exponent: int) -> Tensor:
    bits = exponent_bits(min_exponent, max_exponent)
    e = codes % 2**bits  # arithmetic, not masks and shifts: see bitstream.unpack_bits
    sign = 1 - 2 * torch.div(codes, 2**bits, rounding_mode="floor")
    magnitude = torch.where(e == 0, 0.0, torch.exp2((e + min_exponent - 1).to(scale.dtype)))
    return scale[:, None] * sign.to(scale.dtype) * magnitude


def shift_weight_reference(
    codes: Tensor, scale: Tensor, min_exponent: int, max_exponent: int, in_features: int
) -> Tensor:
    """The dense weight (out, in) of packed shift codes and per-row scales."""
    bits = exponent_bits(min_exponent, max_exponent) + 1
    return decode(unpack_bits(codes, bits, in_features), scale, min_exponent, max_exponent)


shift_weight = torch.library.custom_op("graphpress::shift_weight", shift_weight_reference, mutates_args=())


@shift_weight.register_fake
def _(codes, scale, min_exponent, max_exponent, in_features):
    return scale.new_empty((codes.shape[0], in_features))


def shift_weight_onnx(codes, scale, min_exponent: int, max_exponent: int, in_features: int):
    from onnxscript import opset18 as op

    bits = exponent_bits(min_exponent, max_exponent)
    out_features = codes.shape[0]
    unpacked = unpack_bits_onnx(codes, bits + 1, out_features, in_features)
    e = op.Mod(unpacked, onnx_const(2**bits, np.int64))
    negative = op.Div(unpacked, onnx_const(2**bits, np.int64))
    sign = op.Sub(onnx_const(1, np.int64), op.Mul(negative, onnx_const(2, np.int64)))
    power = op.Pow(onnx_const(2.0, np.float32), op.Cast(op.Add(e, onnx_const(min_exponent - 1, np.int64)), to=1))
    magnitude = op.Where(op.Equal(e, onnx_const(0, np.int64)), onnx_const(0.0, np.float32), power)
    signed = op.Mul(op.Cast(sign, to=1), magnitude)
    return op.Mul(op.CastLike(signed, scale), op.Unsqueeze(scale, onnx_const([1], np.int64)))


def shift_weight_relax(node, importer):
    """TVM Relax converter (``from_exported_program(custom_convert_map=...)``)."""
    from tvm.relax import op

    bb, (codes, scale) = importer.block_builder, (importer.env[a] for a in node.args[:2])
    min_exponent, max_exponent, in_features = node.args[2:]
    bits = exponent_bits(min_exponent, max_exponent)
    out_features = node.args[0].meta["val"].shape[0]
    dtype = str(node.args[1].meta["val"].dtype).removeprefix("torch.")
    unpacked = unpack_bits_relax(bb, codes, bits + 1, out_features, in_features)
    e = bb.emit(op.bitwise_and(unpacked, relax_const(2**bits - 1, "int64")))
    negative = bb.emit(op.right_shift(unpacked, relax_const(bits, "int64")))
    sign = bb.emit(op.subtract(relax_const(1, "int64"), bb.emit(op.multiply(negative, relax_const(2, "int64")))))
    exponent = bb.emit(op.astype(bb.emit(op.add(e, relax_const(min_exponent - 1, "int64"))), dtype))
    power = bb.emit(op.power(relax_const(2.0, dtype), exponent))
    is_zero = bb.emit(op.equal(e, relax_const(0, "int64")))
    magnitude = bb.emit(op.where(is_zero, relax_const(0.0, dtype), power))
    signed = bb.emit(op.multiply(bb.emit(op.astype(sign, dtype)), magnitude))
    return bb.emit(op.multiply(signed, bb.emit(op.expand_dims(scale, 1))))


ONNX_TRANSLATIONS = {torch.ops.graphpress.shift_weight.default: shift_weight_onnx}
RELAX_CONVERTERS = {torch.ops.graphpress.shift_weight.default: shift_weight_relax}
DECOMPOSITIONS = {torch.ops.graphpress.shift_weight.default: shift_weight_reference}


def shift_weight_rows(codes, scale, min_exponent: int, max_exponent: int, in_features: int) -> PackedRows | None:
    """The TIR form (:class:`PackedRows`) of the stored tensors (fake ones do), or None where codes straddle
    bytes: a code is scale[n] * (-1)^sign * 2^(min_exponent + e - 1), or 0 for e = 0."""
    bits = exponent_bits(min_exponent, max_exponent)
    if not whole_bytes(bits + 1):
        return None
    out_features, width = codes.shape
    params = (Param.of("codes", codes), Param.of("scale", scale))

    def decoder(buffers):
        from tvm import tirx as tir

        codes_b, scale_b = buffers

        def value(row, j, slot):
            code = code_tir(codes_b[row, j], slot, bits + 1)
            e = tir.bitwise_and(code, tir.const(2**bits - 1, "int32"))
            sign = tir.const(1, "int32") - 2 * tir.shift_right(code, tir.const(bits, "int32"))
            power = tir.reinterpret("float32", tir.shift_left(e + (min_exponent - 1 + 127), tir.const(23, "int32")))
            magnitude = tir.if_then_else(e == 0, tir.const(0.0, "float32"), power)
            return tir.Cast("float32", scale_b[row]) * tir.Cast("float32", sign) * magnitude

        return value

    return PackedRows("shift", out_features, in_features, 8 // (bits + 1), width, params, decoder)


PACKED_ROWS = {torch.ops.graphpress.shift_weight.default: shift_weight_rows}
