"""Fused linears over compressed weights: ``linear(x, <format>_weight(...), bias)`` as one op.

The passes emit the weight formats as rebuild ops feeding a plain ``linear`` (every
backend lowers that). A GPU kernel wants the pair fused, so the weight is decoded in
registers next to the multiply and never exists densely in memory:

    graphpress::lut_linear(x, indices, codebook, bits, in_features, group_rows, bias)
    graphpress::nm_linear(x, values, positions, n, m, in_features, bias)
    graphpress::shift_linear(x, codes, scale, min_exponent, max_exponent, in_features, bias)

Each reference is the unfused pair (so the fused graph computes exactly what the
unfused one did); the CUDA backend registers Triton kernels as their CUDA
implementations and rewrites the pairs into these ops (:mod:`graphpress.backends.cuda`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .lut import lut_weight_reference
from .nm_sparse import nm_weight_reference
from .shift import shift_weight_reference


def _out(x: Tensor, out_features: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def lut_linear_reference(
    x: Tensor, indices: Tensor, codebook: Tensor, bits: int, in_features: int, group_rows: int, bias: Tensor | None
) -> Tensor:
    """x @ lut_weight(...)^T + bias."""
    weight = lut_weight_reference(indices, codebook, bits, in_features, group_rows)
    return torch.nn.functional.linear(x, weight.to(x.dtype), bias)


lut_linear = torch.library.custom_op("graphpress::lut_linear", lut_linear_reference, mutates_args=())


@lut_linear.register_fake
def _(x, indices, codebook, bits, in_features, group_rows, bias):
    return _out(x, indices.shape[0])


def nm_linear_reference(
    x: Tensor, values: Tensor, positions: Tensor, n: int, m: int, in_features: int, bias: Tensor | None
) -> Tensor:
    """x @ nm_weight(...)^T + bias."""
    weight = nm_weight_reference(values, positions, n, m, in_features)
    return torch.nn.functional.linear(x, weight.to(x.dtype), bias)


nm_linear = torch.library.custom_op("graphpress::nm_linear", nm_linear_reference, mutates_args=())


@nm_linear.register_fake
def _(x, values, positions, n, m, in_features, bias):
    return _out(x, values.shape[0])


def shift_linear_reference(
    x: Tensor, codes: Tensor, scale: Tensor, min_exponent: int, max_exponent: int, in_features: int, bias: Tensor | None
) -> Tensor:
    """x @ shift_weight(...)^T + bias."""
    weight = shift_weight_reference(codes, scale, min_exponent, max_exponent, in_features)
    return torch.nn.functional.linear(x, weight.to(x.dtype), bias)


shift_linear = torch.library.custom_op("graphpress::shift_linear", shift_linear_reference, mutates_args=())


@shift_linear.register_fake
def _(x, codes, scale, min_exponent, max_exponent, in_features, bias):
    return _out(x, codes.shape[0])


FUSED = {
    torch.ops.graphpress.lut_weight.default: torch.ops.graphpress.lut_linear.default,
    torch.ops.graphpress.nm_weight.default: torch.ops.graphpress.nm_linear.default,
    torch.ops.graphpress.shift_weight.default: torch.ops.graphpress.shift_linear.default,
}
"""weight-format op -> the fused linear op taking the same arguments after x (and the bias last)."""

DECOMPOSITIONS = {
    torch.ops.graphpress.lut_linear.default: lut_linear_reference,
    torch.ops.graphpress.nm_linear.default: nm_linear_reference,
    torch.ops.graphpress.shift_linear.default: shift_linear_reference,
}
