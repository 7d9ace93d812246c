"""Float32 transcendentals legalized as polynomials for the TVM backend (issue 25).

TVM's LLVM code generator turns ``exp``, ``tanh``, ``erf`` and ``sigmoid`` into one libm call per
element, so a loop over them cannot vectorise: the example LM's causal softmax over 1 x 8 x 256 x 256
scores took 2.9 ms (x 4 layers), more than a fifth of its 256-token prompt. TOPI's ``fast_exp`` /
``fast_tanh`` / ``fast_erf`` are polynomials (Cephes-style range reduction) that LLVM vectorises; on one
znver4 core, over 2^20 float32 values: exp 2.24 -> 0.24 ms, sigmoid 4.5 -> 0.64, tanh 6.7 -> 0.41,
erf 9.8 -> 0.32. Their errors against float64 (2^20 values over [-88, 88] and N(0, 16)): exp 4.1e-6
relative at worst (at |x| near 88; 1.1e-6 within |x| < 20, 5e-8 absolute where exp(x) <= 1, which is
all of a softmax's), tanh 3.4e-7 and erf 4.7e-7 absolute: well inside the backend's validation
(``max_error``).

Every Relax operator that legalizes into those intrinsics is mapped to its fast form here, each by the
same formula TVM's own legalization uses: softmax, exp, sigmoid, silu, tanh, erf, gelu, gelu_tanh. A
softmax over the last axis goes to the hand-scheduled rows of :mod:`.tvm_softmax` instead.
Other dtypes keep TVM's forms (TOPI's fast functions are float32 only).
"""

from __future__ import annotations

import math

import tvm
from tvm import relax, te, topi
from tvm import tirx as tir

_EXP_POLYNOMIAL = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def exp_polynomial(x: tir.PrimExpr) -> tir.PrimExpr:
    """``topi.fast_exp``'s float32 formula on one expression (for hand-written kernels): x = n ln 2 + f with
    n = round(x log2 e), exp(f) by its degree-7 Cephes polynomial, 2^n by writing n + 127 into the exponent bits."""
    f32 = "float32"
    clamped = tir.max(tir.min(x, tir.const(88.3762626647950, f32)), tir.const(-88.3762626647949, f32))
    n = tir.floor(clamped * tir.const(1.44269504088896341, f32) + tir.const(0.5, f32))
    f = clamped - n * tir.const(0.6931471805599453, f32)
    poly = tir.const(_EXP_POLYNOMIAL[0], f32)
    for c in _EXP_POLYNOMIAL[1:]:
        poly = poly * f + tir.const(c, f32)
    y = poly * f * f + f + tir.const(1.0, f32)
    scale = tir.reinterpret(f32, tir.shift_left(tir.Cast("int32", n + tir.const(127.0, f32)), 23))
    return tir.max(scale * y, x)


def _sigmoid(x: te.Tensor) -> te.Tensor:
    one = tir.const(1.0, x.dtype)
    return te.compute(x.shape, lambda *i: one / (one + topi.fast_exp(-x)(*i)), name="sigmoid")


def _gelu(x: te.Tensor) -> te.Tensor:
    half = tir.const(0.5, x.dtype)
    erf = topi.fast_erf(topi.multiply(x, tir.const(1 / math.sqrt(2), x.dtype)))
    return te.compute(x.shape, lambda *i: half * x(*i) * (tir.const(1.0, x.dtype) + erf(*i)), name="gelu")


def _gelu_tanh(x: te.Tensor) -> te.Tensor:
    c, a = tir.const(math.sqrt(2 / math.pi), x.dtype), tir.const(0.044715, x.dtype)
    inner = te.compute(x.shape, lambda *i: c * x(*i) * (tir.const(1.0, x.dtype) + a * x(*i) * x(*i)), name="inner")
    tanh = topi.fast_tanh(inner)
    half = tir.const(0.5, x.dtype)
    return te.compute(x.shape, lambda *i: half * x(*i) * (tir.const(1.0, x.dtype) + tanh(*i)), name="gelu_tanh")


FAST = {
    "relax.exp": topi.fast_exp,
    "relax.tanh": topi.fast_tanh,
    "relax.erf": topi.fast_erf,
    "relax.sigmoid": _sigmoid,
    "relax.nn.silu": lambda x: topi.multiply(x, _sigmoid(x)),
    "relax.nn.gelu": _gelu,
    "relax.nn.gelu_tanh": _gelu_tanh,
}
"""Relax operator -> TE of its float32 polynomial form (one argument, no attributes)."""


def _float32_only(op_name: str, fast):
    """``fast(bb, call)`` on float32 operands, TVM's registered legalization otherwise."""
    default = tvm.ir.Op.get(op_name).get_attr("FLegalize")

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        return fast(bb, call) if call.args[0].ty.dtype == "float32" else default(bb, call)

    return legalize


def legalize_map() -> dict:
    """``LegalizeOps``' ``customize_legalize_map``: the fast forms of float32 transcendentals."""

    def elementwise(name, compute):
        hint = name.rsplit(".", 1)[-1]
        return lambda bb, call: bb.call_te(compute, call.args[0], primfunc_name_hint=hint)

    def softmax(bb, call):
        x = call.args[0]
        if int(call.attrs.axis) in (-1, x.ty.ndim - 1):  # rows: the hand-scheduled kernel
            from .tvm_softmax import emit_softmax_rows

            return emit_softmax_rows(bb, x, 1.0, None, "softmax_rows")
        return bb.call_te(topi.nn.fast_softmax, x, call.attrs.axis, primfunc_name_hint="softmax")

    fast = {name: elementwise(name, compute) for name, compute in FAST.items()} | {"relax.nn.softmax": softmax}
    return {name: _float32_only(name, legalize) for name, legalize in fast.items()}


def legalize(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The module's operators as TIR, as ``tvm.compile``'s CPU pipeline starts (library dispatch, then
    ``LegalizeOps``), with :func:`legalize_map`; ``tvm.compile`` then finds nothing left to legalize. (Its CPU
    pipeline fuses no operators, and neither does this.)"""
    passes = [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.LegalizeOps(legalize_map()),
    ]
    with target:
        return tvm.transform.Sequential(passes)(mod)
