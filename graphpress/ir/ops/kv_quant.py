"""Grouped integer quantization of cache tensors (KIVI family), packed into uint8.

A cache tensor is (..., T, C): T tokens of C channels. Two groupings, as KIVI uses them:

* ``per_channel`` (keys): every channel of every run of ``group_size`` consecutive tokens
  shares one scale and zero point: stats (..., T / group_size, C). T must be a multiple
  of ``group_size`` (the cache flushes whole groups).
* per-token (values): every run of ``group_size`` channels of one token shares them:
  stats (..., T, C / group_size).

Codes are ``round((x - zero) / scale)`` clipped to [0, 2^bits - 1]. Asymmetric:
zero = min, scale = (max - min) / (2^bits - 1). Symmetric: scale = absmax / (2^(bits-1) - 1)
and zero = -2^(bits-1) * scale, which dequantization recomputes (no zero point stored).
``8 // bits`` codes share a byte, the k-th in bits [k * bits, (k + 1) * bits): the
channel count must be a multiple of ``8 // bits``.

Both ops have an eager reference (this file defines the semantics), a fake
implementation for export, an ONNX lowering to standard ops (BitShift,
BitwiseAnd/Or, Reshape, ReduceMin/Max, Round, Clip, Cast, Mul, Add) and a TVM Relax
converter built from the same steps.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .bitstream import onnx_const, relax_const

EPS = 1e-8


def codes_per_byte(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
    return 8 // bits


def pack(codes: Tensor, bits: int) -> Tensor:
    """(..., C) uint8 codes < 2^bits -> (..., C * bits / 8) bytes (multiply-add: no bitwise ops, see unpack)."""
    per = codes_per_byte(bits)
    grouped = codes.long().reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    return sum(grouped[..., k] * 2 ** (bits * k) for k in range(per)).to(torch.uint8)


def unpack(packed: Tensor, bits: int) -> Tensor:
    """(..., Cp) bytes -> (..., Cp * 8 / bits) uint8 codes.

    Floor division and remainder by powers of two rather than shift and mask: the same
    values, and a decomposition every backend lowers (torch-mlir has no shift ops).
    """
    per = codes_per_byte(bits)
    wide = packed.long()
    codes = torch.stack([torch.div(wide, 2 ** (bits * k), rounding_mode="floor") % 2**bits for k in range(per)], -1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per).to(torch.uint8)


def _grouped(x: Tensor, group_size: int, per_channel: bool) -> tuple[Tensor, int]:
    """x viewed with its groups on one axis; the axis the stats reduce over."""
    *lead, t, c = x.shape
    size = t if per_channel else c
    # tells a tracer (a decomposition of this op over a symbolic length) that the groups divide
    torch._check(size % group_size == 0, lambda: f"{size} is not a multiple of the group size {group_size}")
    if per_channel:
        return x.reshape(*lead, t // group_size, group_size, c), -2
    return x.reshape(*lead, t, c // group_size, group_size), -1


def kv_quantize_reference(
    x: Tensor, bits: int, group_size: int, per_channel: bool, symmetric: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(packed codes, scale, zero) of x (..., T, C)."""
    g, dim = _grouped(x.float(), group_size, per_channel)
    if symmetric:
        scale = (g.abs().amax(dim, keepdim=True) / (2 ** (bits - 1) - 1)).clamp_min(EPS)
        zero = scale * -(2 ** (bits - 1))
    else:
        lo, hi = g.amin(dim, keepdim=True), g.amax(dim, keepdim=True)
        scale = ((hi - lo) / (2**bits - 1)).clamp_min(EPS)
        zero = lo
    codes = torch.clamp(torch.round((g - zero) / scale), 0, 2**bits - 1).to(torch.uint8)
    return pack(codes.reshape(x.shape), bits), scale.squeeze(dim), zero.squeeze(dim)


kv_quantize = torch.library.custom_op("graphpress::kv_quantize", kv_quantize_reference, mutates_args=())


@kv_quantize.register_fake
def _(x, bits, group_size, per_channel, symmetric):
    *lead, t, c = x.shape
    stats = (*lead, t // group_size, c) if per_channel else (*lead, t, c // group_size)
    packed = x.new_empty((*lead, t, c // codes_per_byte(bits)), dtype=torch.uint8)
    return packed, x.new_empty(stats, dtype=torch.float32), x.new_empty(stats, dtype=torch.float32)


def kv_dequantize_reference(
    packed: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_size: int, per_channel: bool
) -> Tensor:
    """Float32 (..., T, C) from packed codes and their stats (zero None: symmetric)."""
    codes = unpack(packed, bits).float()
    g, dim = _grouped(codes, group_size, per_channel)
    zero = scale * -(2 ** (bits - 1)) if zero is None else zero
    return (g * scale.unsqueeze(dim) + zero.unsqueeze(dim)).reshape(codes.shape)


kv_dequantize = torch.library.custom_op("graphpress::kv_dequantize", kv_dequantize_reference, mutates_args=())


@kv_dequantize.register_fake
def _(packed, scale, zero, bits, group_size, per_channel):
    return packed.new_empty((*packed.shape[:-1], packed.shape[-1] * codes_per_byte(bits)), dtype=torch.float32)


# ------------------------------------------------- static scales (onnxruntime's quantized cache)
def kv_quantize_static_reference(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """x (..., T, C) with fixed per-channel ``scale`` (broadcast over T): ``clip(round(x / scale))`` to the signed
    range, int8 (bits 8) or, offset by 8, two 4-bit codes per uint8, the even channel low (bits 4)."""
    top = 2 ** (bits - 1) - 1
    codes = torch.clamp(torch.round(x.float() / scale), -top - 1, top)
    if bits == 8:
        return codes.to(torch.int8)
    return pack((codes + 8).to(torch.uint8), bits)


kv_quantize_static = torch.library.custom_op(
    "graphpress::kv_quantize_static", kv_quantize_static_reference, mutates_args=()
)


@kv_quantize_static.register_fake
def _(x, scale, bits):
    if bits == 8:
        return x.new_empty(x.shape, dtype=torch.int8)
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2), dtype=torch.uint8)


def kv_dequantize_static_reference(codes: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Float32 (..., T, C) from :func:`kv_quantize_static_reference`'s codes."""
    if bits == 8:
        return codes.float() * scale
    return (unpack(codes, bits).float() - 8) * scale


kv_dequantize_static = torch.library.custom_op(
    "graphpress::kv_dequantize_static", kv_dequantize_static_reference, mutates_args=()
)


@kv_dequantize_static.register_fake
def _(codes, scale, bits):
    channels = codes.shape[-1] * (1 if bits == 8 else 2)
    return codes.new_empty((*codes.shape[:-1], channels), dtype=torch.float32)


# ---------------------------------------------------------------------- ONNX
def _onnx_ops():
    from onnxscript import ir
    from onnxscript import opset18 as op

    return ir, op


def _shape_with(x, end: int, tail: list[int]):
    """Shape(x)[:end] followed by ``tail`` (a Reshape target for any leading rank)."""
    _, op = _onnx_ops()
    return op.Concat(op.Shape(x, end=end), onnx_const(tail, np.int64), axis=0)


def _grouped_onnx(t, shape_of, group_size: int, per_channel: bool, channels: int):
    """ONNX for :func:`_grouped`: ``t`` reshaped with its groups on one axis, and that axis."""
    _, op = _onnx_ops()
    if per_channel:
        return op.Reshape(t, _shape_with(shape_of, -2, [-1, group_size, channels])), -2
    return op.Reshape(t, _shape_with(shape_of, -1, [channels // group_size, group_size])), -1


def kv_quantize_onnx(x, bits: int, group_size: int, per_channel: bool, symmetric: bool):
    ir, op = _onnx_ops()
    channels = x.shape[-1]
    x = op.Cast(x, to=ir.DataType.FLOAT)
    g, axis = _grouped_onnx(x, x, group_size, per_channel, channels)
    axes = onnx_const([axis], np.int64)
    eps = onnx_const(EPS, np.float32)
    if symmetric:
        amax = op.ReduceMax(op.Abs(g), axes, keepdims=1)
        scale = op.Max(op.Div(amax, onnx_const(2 ** (bits - 1) - 1, np.float32)), eps)
        zero = op.Mul(scale, onnx_const(-(2 ** (bits - 1)), np.float32))
    else:
        lo, hi = op.ReduceMin(g, axes, keepdims=1), op.ReduceMax(g, axes, keepdims=1)
        scale = op.Max(op.Div(op.Sub(hi, lo), onnx_const(2**bits - 1, np.float32)), eps)
        zero = lo
    codes = op.Clip(
        op.Round(op.Div(op.Sub(g, zero), scale)), onnx_const(0, np.float32), onnx_const(2**bits - 1, np.float32)
    )
    packed = _pack_onnx(op.Cast(codes, to=ir.DataType.UINT8), x, bits, channels)
    return packed, op.Squeeze(scale, axes), op.Squeeze(zero, axes)


def _pack_onnx(codes, shape_of, bits: int, channels: int):
    """ONNX for :func:`pack`: uint8 codes (..., C) -> (..., C * bits / 8) bytes."""
    _, op = _onnx_ops()
    per = codes_per_byte(bits)
    codes = op.Reshape(codes, _shape_with(shape_of, -1, [channels // per, per]))
    shifted = op.BitShift(codes, onnx_const(np.arange(per) * bits, np.uint8), direction="LEFT")
    parts = op.Split(shifted, axis=-1, num_outputs=per) if per > 1 else [shifted]
    packed = parts[0]
    for part in parts[1:]:
        packed = op.BitwiseOr(packed, part)
    return op.Squeeze(packed, onnx_const([-1], np.int64))


def _unpack_onnx(packed, bits: int):
    """ONNX for :func:`unpack`, as float32 codes (..., Cp * 8 / bits)."""
    ir, op = _onnx_ops()
    per = codes_per_byte(bits)
    codes = op.BitwiseAnd(
        op.BitShift(
            op.Unsqueeze(packed, onnx_const([-1], np.int64)),
            onnx_const(np.arange(per) * bits, np.uint8),
            direction="RIGHT",
        ),
        onnx_const(2**bits - 1, np.uint8),
    )
    codes = op.Cast(codes, to=ir.DataType.FLOAT)
    return op.Reshape(codes, _shape_with(packed, -1, [packed.shape[-1] * per]))


def kv_dequantize_onnx(packed, scale, zero, bits: int, group_size: int, per_channel: bool):
    _, op = _onnx_ops()
    channels = packed.shape[-1] * codes_per_byte(bits)
    g, axis = _grouped_onnx(_unpack_onnx(packed, bits), packed, group_size, per_channel, channels)
    axes = onnx_const([axis], np.int64)
    scale = op.Unsqueeze(scale, axes)
    zero = op.Mul(scale, onnx_const(-(2 ** (bits - 1)), np.float32)) if zero is None else op.Unsqueeze(zero, axes)
    return op.Reshape(op.Add(op.Mul(g, scale), zero), _shape_with(packed, -1, [channels]))


def kv_quantize_static_onnx(x, scale, bits: int):
    ir, op = _onnx_ops()
    top = 2 ** (bits - 1) - 1
    levels = op.Round(op.Div(op.Cast(x, to=ir.DataType.FLOAT), scale))
    codes = op.Clip(levels, onnx_const(-top - 1, np.float32), onnx_const(top, np.float32))
    if bits == 8:
        return op.Cast(codes, to=ir.DataType.INT8)
    unsigned = op.Cast(op.Add(codes, onnx_const(8, np.float32)), to=ir.DataType.UINT8)
    return _pack_onnx(unsigned, x, bits, x.shape[-1])


def kv_dequantize_static_onnx(codes, scale, bits: int):
    ir, op = _onnx_ops()
    if bits == 8:
        return op.Mul(op.Cast(codes, to=ir.DataType.FLOAT), scale)
    return op.Mul(op.Sub(_unpack_onnx(codes, bits), onnx_const(8, np.float32)), scale)


# ---------------------------------------------------------------------- TVM Relax
def _grouped_shape(shape: list, group_size: int, per_channel: bool) -> tuple[list, int]:
    *lead, t, c = shape
    if per_channel:
        return [*lead, t // group_size, group_size, c], -2
    return [*lead, t, c // group_size, group_size], -1


def kv_quantize_relax(node, importer):
    """TVM Relax converter (``from_exported_program(custom_convert_map=...)``)."""
    from tvm import relax
    from tvm.relax import op

    bb, x = importer.block_builder, importer.env[node.args[0]]
    bits, group_size, per_channel, symmetric = node.args[1:]
    shape = list(importer.shape_of(x))
    grouped, axis = _grouped_shape(shape, group_size, per_channel)
    g = bb.emit(op.reshape(bb.emit(op.astype(x, "float32")), grouped))
    eps = relax_const(EPS, "float32")
    if symmetric:
        amax = bb.emit(op.max(bb.emit(op.abs(g)), axis=[axis], keepdims=True))
        scale = bb.emit(op.maximum(bb.emit(op.divide(amax, relax_const(2 ** (bits - 1) - 1, "float32"))), eps))
        zero = bb.emit(op.multiply(scale, relax_const(-(2 ** (bits - 1)), "float32")))
    else:
        lo = bb.emit(op.min(g, axis=[axis], keepdims=True))
        hi = bb.emit(op.max(g, axis=[axis], keepdims=True))
        scale = bb.emit(
            op.maximum(bb.emit(op.divide(bb.emit(op.subtract(hi, lo)), relax_const(2**bits - 1, "float32"))), eps)
        )
        zero = lo
    levels = bb.emit(op.round(bb.emit(op.divide(bb.emit(op.subtract(g, zero)), scale))))
    packed = _pack_relax(bb, bb.emit(op.clip(levels, 0, 2**bits - 1)), shape, bits)
    stats = [bb.emit(op.squeeze(t, axis=[axis])) for t in (scale, zero)]
    return bb.emit(relax.Tuple([packed, *stats]))


def _pack_relax(bb, codes, shape: list, bits: int):
    """Relax for :func:`pack`: float codes in [0, 2^bits) of ``shape`` (..., C) -> uint8 bytes."""
    from tvm.relax import op

    per = codes_per_byte(bits)
    codes = bb.emit(op.reshape(bb.emit(op.astype(codes, "int32")), [*shape[:-1], shape[-1] // per, per]))
    shifted = bb.emit(op.left_shift(codes, relax_const(np.arange(per) * bits, "int32")))
    return bb.emit(op.astype(bb.emit(op.sum(shifted, axis=[-1])), "uint8"))  # disjoint bits: sum == or


def _unpack_relax(bb, packed, shape: list, bits: int):
    """Relax for :func:`unpack`: uint8 bytes of ``shape`` (..., Cp) -> float32 codes (..., Cp * 8 / bits)."""
    from tvm.relax import op

    per = codes_per_byte(bits)
    shifted = bb.emit(op.right_shift(bb.emit(op.expand_dims(packed, -1)), relax_const(np.arange(per) * bits, "uint8")))
    codes = bb.emit(op.astype(bb.emit(op.bitwise_and(shifted, relax_const(2**bits - 1, "uint8"))), "float32"))
    return bb.emit(op.reshape(codes, [*shape[:-1], shape[-1] * per]))


def kv_dequantize_relax(node, importer):
    """TVM Relax converter (``from_exported_program(custom_convert_map=...)``)."""
    from tvm.relax import op

    bb = importer.block_builder
    packed, scale = importer.env[node.args[0]], importer.env[node.args[1]]
    zero = importer.env[node.args[2]] if node.args[2] is not None else None
    bits, group_size, per_channel = node.args[3:]
    *lead, t, cp = list(importer.shape_of(packed))
    codes = _unpack_relax(bb, packed, [*lead, t, cp], bits)
    channels = [*lead, t, cp * codes_per_byte(bits)]
    grouped, axis = _grouped_shape(channels, group_size, per_channel)
    g = bb.emit(op.reshape(codes, grouped))
    scale = bb.emit(op.expand_dims(scale, axis))
    if zero is None:
        zero = bb.emit(op.multiply(scale, relax_const(-(2 ** (bits - 1)), "float32")))
    else:
        zero = bb.emit(op.expand_dims(zero, axis))
    return bb.emit(op.reshape(bb.emit(op.add(bb.emit(op.multiply(g, scale)), zero)), channels))


def kv_quantize_static_relax(node, importer):
    """TVM Relax converter (``from_exported_program(custom_convert_map=...)``)."""
    from tvm.relax import op

    bb = importer.block_builder
    x, scale = importer.env[node.args[0]], importer.env[node.args[1]]
    bits = node.args[2]
    top = 2 ** (bits - 1) - 1
    levels = bb.emit(op.round(bb.emit(op.divide(bb.emit(op.astype(x, "float32")), scale))))
    codes = bb.emit(op.clip(levels, -top - 1, top))
    if bits == 8:
        return bb.emit(op.astype(codes, "int8"))
    unsigned = bb.emit(op.add(codes, relax_const(8, "float32")))
    return _pack_relax(bb, unsigned, list(importer.shape_of(x)), bits)


def kv_dequantize_static_relax(node, importer):
    """TVM Relax converter (``from_exported_program(custom_convert_map=...)``)."""
    from tvm.relax import op

    bb = importer.block_builder
    codes, scale = importer.env[node.args[0]], importer.env[node.args[1]]
    bits = node.args[2]
    if bits == 8:
        return bb.emit(op.multiply(bb.emit(op.astype(codes, "float32")), scale))
    unpacked = _unpack_relax(bb, codes, list(importer.shape_of(codes)), bits)
    return bb.emit(op.multiply(bb.emit(op.subtract(unpacked, relax_const(8, "float32"))), scale))


ONNX_TRANSLATIONS = {
    torch.ops.graphpress.kv_quantize.default: kv_quantize_onnx,
    torch.ops.graphpress.kv_dequantize.default: kv_dequantize_onnx,
    torch.ops.graphpress.kv_quantize_static.default: kv_quantize_static_onnx,
    torch.ops.graphpress.kv_dequantize_static.default: kv_dequantize_static_onnx,
}
RELAX_CONVERTERS = {
    torch.ops.graphpress.kv_quantize.default: kv_quantize_relax,
    torch.ops.graphpress.kv_dequantize.default: kv_dequantize_relax,
    torch.ops.graphpress.kv_quantize_static.default: kv_quantize_static_relax,
    torch.ops.graphpress.kv_dequantize_static.default: kv_dequantize_static_relax,
}
DECOMPOSITIONS = {
    torch.ops.graphpress.kv_quantize.default: kv_quantize_reference,
    torch.ops.graphpress.kv_dequantize.default: kv_dequantize_reference,
    torch.ops.graphpress.kv_quantize_static.default: kv_quantize_static_reference,
    torch.ops.graphpress.kv_dequantize_static.default: kv_dequantize_static_reference,
}
