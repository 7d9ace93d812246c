"""N:M sparse weights: the N kept values of every group of M input columns, plus their positions.

A weight W (out, in) with at most N non-zeros in every run of M consecutive columns of a
row is stored as ``values`` (out, in / M * N), the kept weights in column order, and
``positions``: each kept value's column within its group (log2 M bits: 2 for 2:4),
packed as a bit stream per row (:mod:`.bitstream`). For 2:4 in fp32 that is
0.5 + 1/64 of the dense bytes.

``graphpress::nm_weight`` rebuilds the dense weight (zeros elsewhere); an N:M linear is
``linear(x, nm_weight(...))``. ONNX: unpack the positions, add each group's first
column, ScatterElements the values into zeros.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .bitstream import onnx_const, unpack_bits, unpack_bits_onnx


def position_bits(m: int) -> int:
    return int(math.log2(m))


def _group_starts(kept: int, n: int, m: int) -> Tensor:
    return (torch.arange(kept) // n * m).unsqueeze(0)


@torch.library.custom_op("graphpress::nm_weight", mutates_args=())
def nm_weight(values: Tensor, positions: Tensor, n: int, m: int, in_features: int) -> Tensor:
    """The dense weight (out, in) with ``values`` at their recorded columns."""
    kept = values.shape[1]
    columns = unpack_bits(positions, position_bits(m), kept) + _group_starts(kept, n, m).to(values.device)
    return values.new_zeros(values.shape[0], in_features).scatter(1, columns, values)


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


ONNX_TRANSLATIONS = {torch.ops.graphpress.nm_weight.default: nm_weight_onnx}
