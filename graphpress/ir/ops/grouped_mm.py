"""ONNX form of transformers' own ``transformers::grouped_mm_fallback`` (MoE experts).

transformers 5 runs a mixture of experts as one grouped matmul over the token-expert
rows sorted by expert: ``out[i] = input[i] @ weight[e(i)]`` where row i belongs to
expert e(i) = the number of cumulative counts ``offs`` that are <= i. The op is opaque to
the ONNX exporter, so a captured MoE model had no ONNX file. Lowered here to standard
ops: the expert of every row (a comparison with ``offs`` summed), its weight gathered,
one batched MatMul. It computes every row once, as the loop does; the gathered weights
are (rows, in, out) at run time, fine for the small expert counts of edge models.

Only registered when transformers defines the op (imported lazily by the model).
"""

from __future__ import annotations

import numpy as np
import torch

from .bitstream import onnx_const


def grouped_mm_onnx(input, weight, offs):
    from onnxscript import opset18 as op

    axis0, axis1 = onnx_const([0], np.int64), onnx_const([1], np.int64)
    count = op.Squeeze(op.Shape(input, start=0, end=1), axis0)
    rows = op.Range(onnx_const(0, np.int64), count, onnx_const(1, np.int64))  # (S,)
    ends = op.Unsqueeze(op.Cast(offs, to=7), axis0)  # (1, E) cumulative counts, int64
    passed = op.Cast(op.LessOrEqual(ends, op.Unsqueeze(rows, axis1)), to=7)  # (S, E): groups ended at or before row
    expert = op.ReduceSum(passed, axis1, keepdims=0)  # (S,)
    per_row = op.Gather(weight, expert, axis=0)  # (S, in, out)
    out = op.MatMul(op.Unsqueeze(input, axis1), per_row)  # (S, 1, out)
    return op.Squeeze(out, axis1)


def onnx_translations() -> dict:
    overload = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    return {overload.default: grouped_mm_onnx} if overload is not None else {}
