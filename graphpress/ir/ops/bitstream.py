"""Sub-byte bit streams: rows of b-bit codes (b = 1..8) packed into bytes, and their ONNX and TVM unpacking.

Each run of 8 codes along a row fills exactly ``bits`` bytes: code k sits in bits
[k * bits, (k + 1) * bits) of the run's little-endian concatenation. Rows are padded to
a multiple of 8 codes; 8-bit codes are plain bytes. Shared by the palettized (LUT) and
N:M sparse weight formats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
    """(..., packed_width(n, bits)) uint8 -> (..., n) int64 indices.

    Written with multiplies, floor divisions and remainders by Python powers of two,
    not shifts, masks or constant tensors: this is also the op's decomposition for
    backends without bitwise ops (torch-mlir's lowerings have no ``aten.__rshift__``).
    """
    if bits == 8:
        return packed.long()
    runs = packed.long().reshape(*packed.shape[:-1], -1, bits)
    words = sum(runs[..., k] * 256**k for k in range(bits))
    codes = torch.stack([torch.div(words, 2 ** (bits * k), rounding_mode="floor") % 2**bits for k in range(8)], -1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n]


def onnx_const(values, dtype):
    from onnxscript import ir
    from onnxscript import opset18 as op

    return op.Constant(value=ir.tensor(np.asarray(values, dtype=dtype)))


def unpack_bits_onnx(packed, bits: int, rows: int, n: int):
    """ONNX for :func:`unpack_bits` on a (rows, width) uint8 tensor: bytes -> int64 words
    (Mul + ReduceSum) -> codes (Div + Mod) -> the first n per row, int64."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    codes = op.Cast(packed, to=ir.DataType.INT64)
    if bits == 8:
        return codes
    runs = op.Reshape(codes, onnx_const([rows, -1, bits], np.int64))
    words = op.ReduceSum(
        op.Mul(runs, onnx_const(256 ** np.arange(bits), np.int64)), onnx_const([-1], np.int64), keepdims=0
    )
    codes = op.Mod(
        op.Div(op.Unsqueeze(words, onnx_const([-1], np.int64)), onnx_const(2 ** (bits * np.arange(8)), np.int64)),
        onnx_const(2**bits, np.int64),
    )
    flat = op.Reshape(codes, onnx_const([rows, -1], np.int64))
    return op.Slice(flat, onnx_const([0], np.int64), onnx_const([n], np.int64), onnx_const([1], np.int64))


def relax_const(values, dtype: str):
    from tvm import relax

    return relax.const(np.asarray(values, dtype=dtype), dtype)


def unpack_bits_relax(bb, packed, bits: int, rows: int, n: int):
    """TVM Relax for :func:`unpack_bits` on a (rows, width) uint8 tensor, emitted into block builder ``bb``:
    bytes -> int64 words (shift + sum) -> codes (shift + mask) -> the first n per row."""
    from tvm.relax import op

    codes = bb.emit(op.astype(packed, "int64"))
    if bits == 8:
        return codes
    runs = bb.emit(op.reshape(codes, (rows, -1, bits)))
    words = bb.emit(op.sum(bb.emit(op.left_shift(runs, relax_const(8 * np.arange(bits), "int64"))), axis=-1))
    shifted = bb.emit(op.right_shift(bb.emit(op.expand_dims(words, -1)), relax_const(bits * np.arange(8), "int64")))
    codes = bb.emit(op.bitwise_and(shifted, relax_const(2**bits - 1, "int64")))
    return bb.emit(op.strided_slice(bb.emit(op.reshape(codes, (rows, -1))), axes=[1], begin=[0], end=[n]))


@dataclass(frozen=True)
class Param:
    """One stored tensor of a weight format, as a TIR kernel's parameter."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, name: str, tensor: Tensor) -> Param:
        """The parameter a (fake) stored tensor becomes."""
        return cls(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))


@dataclass(frozen=True)
class PackedRows:
    """A weight (out_features, in_features) stored row by row, ``per`` weights in each stored element
    (8 / bits codes in a byte of a bit stream; 1 for a plain float), described for a TIR kernel that decodes it
    (:mod:`graphpress.backends.tvm_linear`). ``decoder(buffers)`` (the kernel's buffers for ``params``) gives
    ``value(n, j, slot)``: the float32 weight in slot ``slot`` of element j of row n, which is weight
    ``j * per + slot``."""

    name: str
    out_features: int
    in_features: int
    per: int
    width: int
    params: tuple[Param, ...]
    decoder: Callable

    @property
    def lanes(self) -> int:
        """Elements decoded per vector: the largest of 16, 8, 4, 2, 1 dividing the row."""
        return next(n for n in (16, 8, 4, 2, 1) if self.width % n == 0)

    @property
    def chunks(self) -> int:
        return self.width // self.lanes


def whole_bytes(bits: int) -> bool:
    """Whether every code of a ``bits``-bit stream lies within one byte (so a kernel reads it with one load)."""
    return bits in (1, 2, 4, 8)


def code_tir(byte, slot, bits: int):
    """TIR: code ``slot`` of a byte of a whole-byte stream (low bits first), as int32."""
    from tvm import tirx as tir

    shifted = tir.shift_right(byte, tir.Cast("uint8", slot * bits))
    return tir.Cast("int32", tir.bitwise_and(shifted, tir.const(2**bits - 1, "uint8")))
