"""Block-affine integer weights in onnxruntime's ``MatMulNBits`` layout: b-bit codes, a scale
and a zero point per block of ``block_size`` input columns.

A weight W (N, K) is stored as

- ``codes`` uint8 (N, blocks, block_size * bits / 8): every row cut into blocks of
  ``block_size`` columns (the last one padded), each block a bit stream
  (:mod:`.bitstream`: low bits first, so 4-bit codes are low nibble first);
- ``scales`` (N, blocks), the weight's dtype;
- ``zeros`` uint8 (N, ceil(blocks * bits / 8)): the zero points, packed the same way, or
  None (symmetric): every zero point is 2^(bits - 1), ``MatMulNBits``' default.

W[r, c] = (code[r, c] - zero[r, c // block_size]) * scale[r, c // block_size]. For
bits 2, 4 and 8 these are exactly ``MatMulNBits``' inputs B, scales and zero_points.

``graphpress::int_weight`` rebuilds the dense weight; a quantized linear is
``linear(x, int_weight(...))``, and ``graphpress::int_linear`` is the pair fused, which the
ONNX backend lowers to ``com.microsoft::MatMulNBits`` when asked (``ort_contrib_ops``) and
the CUDA backend runs as a Triton kernel. ONNX (standard ops): unpack, then a blocked
``DequantizeLinear`` (opset 21 and later) or Sub and Mul. TVM Relax: unpack, Sub, Mul. TIR
(:func:`int_weight_rows`): the per-byte decode the TVM backend's fused ``int_linear`` kernel
runs in registers (:mod:`graphpress.backends.tvm_linear`).
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
    pack_bits,
    packed_width,
    relax_const,
    unpack_bits,
    unpack_bits_onnx,
    unpack_bits_relax,
    whole_bytes,
)
from .contrib import contrib_op


def matmul_nbits_runs(bits: int, block_size: int) -> bool:
    """Whether onnxruntime's ``MatMulNBits`` takes this format: 2, 4 or 8 bits (not 3), 2-bit blocks of at
    most 256. Others lower to standard ops."""
    return bits in (2, 4, 8) and not (bits == 2 and block_size > 256)


def zero_width(blocks: int, bits: int) -> int:
    """Bytes per row of packed zero points: ceil(blocks * bits / 8), as ``MatMulNBits`` has them."""
    return -(-blocks * bits // 8)


def pack(codes: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, block_size: int) -> dict[str, Tensor]:
    """The stored tensors of codes (N, K) < 2^bits, scales and zero points (N, blocks)."""
    n, k = codes.shape
    blocks = scales.shape[1]
    padded = torch.nn.functional.pad(codes.long(), (0, blocks * block_size - k), value=2 ** (bits - 1))
    tensors = {"q_codes": pack_bits(padded.reshape(n, blocks, block_size), bits), "q_scales": scales}
    if zeros is not None:
        tensors["q_zeros"] = pack_bits(zeros.long(), bits)[:, : zero_width(blocks, bits)].contiguous()
    return tensors


def unpack_zeros(zeros: Tensor | None, bits: int, blocks: int) -> Tensor | int:
    """Zero points (N, blocks) int64, or the symmetric 2^(bits - 1)."""
    if zeros is None:
        return 2 ** (bits - 1)
    full = torch.nn.functional.pad(zeros, (0, packed_width(blocks, bits) - zeros.shape[1]))
    return unpack_bits(full, bits, blocks)


def int_weight_reference(
    codes: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, block_size: int, in_features: int
) -> Tensor:
    """The dense weight (N, K): (code - zero) * scale, block by block."""
    n, blocks, _ = codes.shape
    q = unpack_bits(codes, bits, block_size)
    z = unpack_zeros(zeros, bits, blocks)
    shifted = q - (z.unsqueeze(-1) if isinstance(z, Tensor) else z)
    return (shifted.to(scales.dtype) * scales.unsqueeze(-1)).reshape(n, -1)[:, :in_features]


int_weight = torch.library.custom_op("graphpress::int_weight", int_weight_reference, mutates_args=())


@int_weight.register_fake
def _(codes, scales, zeros, bits, block_size, in_features):
    return scales.new_empty((codes.shape[0], in_features))


PACKED_TYPES = {4: "UINT4", 8: "UINT8"}
"""Bits whose codes have an ONNX integer type (opset 21) that onnxruntime keeps packed under DequantizeLinear."""


def int_weight_onnx(codes, scales, zeros, bits: int, block_size: int, in_features: int, opset: int = 18):
    """Standard ONNX. Opset >= 21 with 4 or 8 bits: the transposed weight as a blocked ``DequantizeLinear``
    (axis 0) of uint4/uint8 codes, transposed back; the codes' unpacking is marked for folding into one packed
    initializer (:func:`graphpress.backends.onnx._optimize`), and onnxruntime fuses ``DequantizeLinear`` →
    ``MatMul`` into ``MatMulNBits`` at load, so the weight stays packed in memory. Other bits at opset >= 21:
    unpack, then a blocked ``DequantizeLinear`` along the rows; before opset 21: unpack, Sub and Mul."""
    from onnxscript import ir, opset21
    from onnxscript import opset18 as op

    n, blocks, _ = codes.shape
    q = unpack_bits_onnx(op.Reshape(codes, onnx_const([n, -1], np.int64)), bits, n, blocks * block_size)
    if zeros is None:
        z = onnx_const(np.full((n, blocks), 2 ** (bits - 1)), np.int64)
    else:
        full = op.Pad(zeros, onnx_const([0, 0, 0, packed_width(blocks, bits) - zeros.shape[1]], np.int64))
        z = unpack_bits_onnx(full, bits, n, blocks)
    if opset >= 21 and bits in PACKED_TYPES:
        packed = getattr(ir.DataType, PACKED_TYPES[bits])
        head = op.Slice(q, onnx_const([0], np.int64), onnx_const([in_features], np.int64), onnx_const([1], np.int64))
        codes_t = op.Cast(op.Transpose(head, perm=[1, 0]), to=packed)  # (K, N): MatMul's B, rows = inputs
        zeros_t = op.Cast(op.Transpose(z, perm=[1, 0]), to=packed)
        weight_t = opset21.DequantizeLinear(
            codes_t, op.Transpose(scales, perm=[1, 0]), zeros_t, axis=0, block_size=block_size
        )
        return op.Transpose(weight_t, perm=[1, 0])
    if opset >= 21:
        u8 = ir.DataType.UINT8
        dense = opset21.DequantizeLinear(op.Cast(q, to=u8), scales, op.Cast(z, to=u8), axis=1, block_size=block_size)
    else:
        grouped = op.Reshape(q, onnx_const([n, blocks, block_size], np.int64))
        shifted = op.CastLike(op.Sub(grouped, op.Unsqueeze(z, onnx_const([-1], np.int64))), scales)
        dense = op.Reshape(
            op.Mul(shifted, op.Unsqueeze(scales, onnx_const([-1], np.int64))), onnx_const([n, -1], np.int64)
        )
    return op.Slice(dense, onnx_const([0], np.int64), onnx_const([in_features], np.int64), onnx_const([1], np.int64))


def int_linear_onnx(x, codes, scales, zeros, bits: int, block_size: int, in_features: int, bias, accuracy_level=0):
    """``com.microsoft::MatMulNBits``: onnxruntime keeps the codes packed and decodes them in its kernel."""
    return contrib_op("MatMulNBits")(
        x,
        codes,
        scales,
        zeros,
        None,
        bias,
        K=in_features,
        N=codes.shape[0],
        bits=bits,
        block_size=block_size,
        accuracy_level=accuracy_level,
    )


def int_weight_relax(node, importer):
    """TVM Relax converter (``from_exported_program(custom_convert_map=...)``)."""
    from tvm.relax import op

    bb = importer.block_builder
    codes, scales = importer.env[node.args[0]], importer.env[node.args[1]]
    zeros = importer.env[node.args[2]] if node.args[2] is not None else None
    bits, block_size, in_features = node.args[3:]
    n, blocks, _ = node.args[0].meta["val"].shape
    q = unpack_bits_relax(bb, bb.emit(op.reshape(codes, (n, -1))), bits, n, blocks * block_size)
    if zeros is None:
        z = relax_const(np.full((n, blocks, 1), 2 ** (bits - 1)), "int64")
    else:
        width = node.args[2].meta["val"].shape[1]
        full = bb.emit(op.nn.pad(zeros, [0, 0, 0, packed_width(blocks, bits) - width]))
        z = bb.emit(op.expand_dims(unpack_bits_relax(bb, full, bits, n, blocks), -1))
    shifted = bb.emit(op.subtract(bb.emit(op.reshape(q, (n, blocks, block_size))), z))
    dtype = str(node.args[1].meta["val"].dtype).removeprefix("torch.")
    dense = bb.emit(op.multiply(bb.emit(op.astype(shifted, dtype)), bb.emit(op.expand_dims(scales, -1))))
    flat = bb.emit(op.reshape(dense, (n, -1)))
    return bb.emit(op.strided_slice(flat, axes=[1], begin=[0], end=[in_features]))


def int_weight_rows(codes, scales, zeros, bits: int, block_size: int, in_features: int) -> PackedRows | None:
    """The TIR form (:class:`PackedRows`) of the stored tensors (fake ones do), or None where codes straddle
    bytes. Byte j of a row is in block j // block_bytes; a code there is (code - zero) * scale."""
    if not whole_bytes(bits):
        return None
    n, blocks, block_bytes = codes.shape
    params = [Param.of("codes", codes), Param.of("scales", scales)]
    if zeros is not None:
        params.append(Param.of("zeros", zeros))

    def decoder(buffers):
        from tvm import tirx as tir

        codes_b, scales_b, *zeros_b = buffers

        def value(row, j, slot):
            block = j // block_bytes
            code = code_tir(codes_b[row, block, j % block_bytes], slot, bits)
            if zeros_b:
                zero = code_tir(zeros_b[0][row, block * bits // 8], block % (8 // bits), bits)
            else:
                zero = tir.const(2 ** (bits - 1), "int32")
            return tir.Cast("float32", code - zero) * tir.Cast("float32", scales_b[row, block])

        return value

    return PackedRows("int", n, in_features, 8 // bits, blocks * block_bytes, tuple(params), decoder)


RELAX_CONVERTERS = {torch.ops.graphpress.int_weight.default: int_weight_relax}
PACKED_ROWS = {torch.ops.graphpress.int_weight.default: int_weight_rows}
DECOMPOSITIONS = {torch.ops.graphpress.int_weight.default: int_weight_reference}
