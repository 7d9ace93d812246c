"""Float32 matmuls of the TVM backend's module offloaded to OpenBLAS (issue 25).

TVM's untuned CPU schedules leave a matmul as plain loops (the example LM's 256-token
forward is ~46x onnxruntime), and this TVM wheel registers no cblas/dnnl BYOC. A matmul is
instead rewritten as a TE ``extern`` whose body calls ``cblas_sgemm`` (one GEMM: a
weight-only right operand, the left's leading dimensions folded into M) or
``cblas_sgemm_batch_strided`` (attention's batched products; a side of batch size 1 has
stride 0). The call is compiled into the library as an ordinary C call, so shapes stay
symbolic: the same function serves every prompt length and decode context. A transpose
feeding either operand (``permute_dims`` swapping the last two axes: ``linear``'s weight,
attention's keys) becomes the GEMM's transpose flag and is not materialised.

Attention the importer keeps whole (``R.nn.attention``: a causal prefill) is spelled out as
its two products, which go to BLAS, around a scaled, masked softmax: TVM's own kernel for
it was ~70 % of the example LM's 256-token forward.

The BLAS is ``scipy-openblas32`` (PyPI; OpenBLAS with 32-bit indices and ``scipy_``-prefixed
symbols, so it cannot clash with numpy's own OpenBLAS). Its library is copied beside the
artifact, which links it with ``rpath=$ORIGIN``: the folder loads with ``tvm`` alone.
OpenBLAS threads: ``OPENBLAS_NUM_THREADS`` (default: every core).
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import tvm
from tvm import relax, te
from tvm import tirx as tir
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.sym.analyzer import Analyzer

from .tvm_tune import SCHEDULED

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112


@dataclass(frozen=True)
class Blas:
    """An installed BLAS to link against: its library file, link name and symbol prefix."""

    library: Path
    prefix: str
    version: str

    @property
    def link_name(self) -> str:
        return self.library.name.removeprefix("lib").removesuffix(".so")

    def export_options(self) -> list[str]:
        """``export_library`` options linking the library copied beside the artifact."""
        return ["-Wl,--no-as-needed", f"-L{self.library.parent}", f"-l{self.link_name}", "-Wl,-rpath,$ORIGIN"]

    def describe(self) -> dict:
        """What a runtime needs to reach the copy beside the artifact (its soname, the symbols' prefix)."""
        return {"library": self.library.name, "prefix": self.prefix, "version": self.version}

    def copy_beside(self, artifact: Path) -> Path:
        target = artifact.parent / self.library.name
        shutil.copyfile(self.library, target)
        return target


@functools.cache
def find() -> Blas | None:
    """The installed ``scipy-openblas32``, or None."""
    try:
        import scipy_openblas32 as sob
    except ImportError:
        return None
    library = Path(sob.get_lib_dir()) / sob.get_library(fullname=True)
    return Blas(library, "scipy_", importlib.metadata.version("scipy-openblas32"))


def offload(mod: tvm.IRModule, blas: Blas) -> tuple[tvm.IRModule, int]:
    """Every float32 matmul BLAS can compute in place (see the module's docstring) as an extern GEMM call;
    returns the module and how many matmuls were offloaded."""
    rewriter = _Offload(mod, blas)
    mod = rewriter.transform()
    return relax.transform.DeadCodeElimination()(mod), rewriter.count


_MATMUL = tvm.ir.Op.get("relax.matmul")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_ATTENTION = tvm.ir.Op.get("relax.nn.attention")


@mutator
class _Offload(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, blas: Blas) -> None:
        super().__init__(mod)
        self.mod_, self.blas, self.count = mod, blas, 0

    def transform(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.get()

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op == _ATTENTION:
            return self._attention(call)
        if call.op != _MATMUL or str(call.attrs.out_dtype) not in ("None", "", "float32"):
            return call
        (a, trans_a), (b, trans_b) = (self._untransposed(arg) for arg in call.args)
        offloaded = self._matmul(a, b, trans_a, trans_b)
        return call if offloaded is None else offloaded

    def _matmul(self, a: relax.Expr, b: relax.Expr, trans_a: bool, trans_b: bool) -> relax.Expr | None:
        gemm = _gemm(a.ty, b.ty, trans_a, trans_b)
        if gemm is None:
            return None
        self.count += 1
        call = self.builder_.call_te(gemm(self.blas.prefix), a, b, primfunc_name_hint="blas_matmul")
        gv = call.args[0]  # an extern call: nothing for a tuner to schedule
        self.builder_.update_func(gv, self.builder_.get()[gv].with_attr(SCHEDULED, True))
        return call

    def _attention(self, call: relax.Call) -> relax.Expr:
        """``softmax(q k^T * scale + bias, causal) v`` over (batch, seq, heads, dim) operands, the products on
        BLAS (one key/value head is broadcast to every query head); the call unchanged where a product is not
        BLAS's (grouped heads, not float32) or a window is set."""
        q, k, v, *bias = call.args
        if call.attrs.window_size is not None or any(x.ty.dtype != "float32" for x in (q, k, v)):
            return call
        if not all(isinstance(x.ty.shape, relax.ShapeExpr) for x in (q, k, v)):
            return call
        heads, analyzer = [x.ty.shape.values[2] for x in (q, k, v)], Analyzer()
        if not all(analyzer.can_prove_equal(h, heads[0]) or analyzer.can_prove_equal(h, 1) for h in heads[1:]):
            return call  # grouped heads: TVM's kernel broadcasts them
        emit, op = self.builder_.emit, relax.op
        qt, kt, vt = (emit(op.permute_dims(x, [0, 2, 1, 3])) for x in (q, k, v))
        scores = self._matmul(qt, kt, False, True)
        dim = q.ty.shape.values[3]
        if call.attrs.scale is not None:
            scale = tir.const(call.attrs.scale.value, "float32")
        else:  # the head dim may be symbolic
            scale = tir.const(1.0, "float32") / tir.sqrt(tir.Cast("float32", dim))
        scores = emit(scores)
        if not bias and isinstance(dim, tir.IntImm):  # the hand-scheduled rows (scale and causal inside)
            from .tvm_softmax import emit_softmax_rows

            value = call.attrs.scale.value if call.attrs.scale is not None else 1 / math.sqrt(dim.value)
            probs = emit_softmax_rows(self.builder_, scores, value, call.attrs.causal_mask, "attention_softmax")
        else:
            probs = self.builder_.call_te(
                _masked_softmax,
                scores,
                *bias,
                scale=scale,
                causal=call.attrs.causal_mask,
                primfunc_name_hint="attention_softmax",
            )
        return op.permute_dims(emit(self._matmul(emit(probs), vt, False, False)), [0, 2, 1, 3])

    def _untransposed(self, arg: relax.Expr) -> tuple[relax.Expr, bool]:
        """``arg`` and False, or the operand of a last-two-axes ``permute_dims`` producing it and True."""
        bound = self.lookup_binding(arg) if isinstance(arg, relax.Var) else None
        if isinstance(bound, relax.Call) and bound.op == _PERMUTE and bound.args[0].ty.ndim >= 2:
            rank = bound.args[0].ty.ndim
            axes = [int(x) for x in bound.attrs.axes] if bound.attrs.axes is not None else list(range(rank))[::-1]
            if axes == [*range(rank - 2), rank - 1, rank - 2]:
                return bound.args[0], True
        return arg, False


def _gemm(a_ty, b_ty, trans_a: bool, trans_b: bool):
    """A TE builder computing ``op(a) @ op(b)`` with BLAS, or None where BLAS does not apply (not float32, a
    vector, batch dims neither equal nor 1).

    Batch dims broadcast one by one: the innermost run of dims in which each side is either whole or
    broadcast is one ``sgemm_batch_strided`` call (a broadcast side has stride 0); dims outside it are loops
    around the call (MQA's single key head under a symbolic batch: a loop over the batch, the heads strided).
    """
    if not all(isinstance(t, relax.TensorType) and t.dtype == "float32" and t.ndim >= 2 for t in (a_ty, b_ty)):
        return None
    if a_ty.shape is None or b_ty.shape is None:
        return None
    analyzer = Analyzer()
    rank = max(a_ty.ndim, b_ty.ndim) - 2
    a_batch = [1] * (rank - a_ty.ndim + 2) + list(a_ty.shape.values[:-2])
    b_batch = [1] * (rank - b_ty.ndim + 2) + list(b_ty.shape.values[:-2])
    whole: list[tuple[bool, bool]] = []  # per batch dim: (a has it, b has it); False: broadcast from 1
    for x, y in zip(a_batch, b_batch, strict=True):
        if analyzer.can_prove_equal(x, y):
            whole.append((True, True))
        elif analyzer.can_prove_equal(y, 1):
            whole.append((True, False))
        elif analyzer.can_prove_equal(x, 1):
            whole.append((False, True))
        else:
            return None
    inner = rank  # batch dims [inner:] share one pattern: one strided call
    while inner > 0 and whole[inner - 1] == whole[-1]:
        inner -= 1
    flat = not trans_a and all(not b for _, b in whole)  # b is one matrix: a's leading dims are GEMM rows

    def build(prefix: str):
        def compute(a: te.Tensor, b: te.Tensor) -> te.Tensor:
            m, k = (a.shape[-1], a.shape[-2]) if trans_a else (a.shape[-2], a.shape[-1])
            n = b.shape[-2] if trans_b else b.shape[-1]
            a_dims = [1] * (rank - len(a.shape) + 2) + list(a.shape[:-2])
            b_dims = [1] * (rank - len(b.shape) + 2) + list(b.shape[:-2])
            lead = [x if wa else y for x, y, (wa, _) in zip(a_dims, b_dims, whole, strict=True)]
            trans = [ROW_MAJOR, TRANS if trans_a else NO_TRANS, TRANS if trans_b else NO_TRANS]
            lda, ldb = (m if trans_a else k), (k if trans_b else n)
            one = tir.const(1.0, "float32"), tir.const(0.0, "float32")

            def body(ins, outs):
                x, w = ins
                (y,) = outs
                if flat:
                    rows = _product([*a.shape[:-2], m])
                    args = [*trans, _i32(rows), _i32(n), _i32(k), one[0], x.access_ptr("r"), _i32(lda)]
                    args += [w.access_ptr("r"), _i32(ldb), one[1], y.access_ptr("w"), _i32(n)]
                    return tir.call_extern("int32", f"{prefix}cblas_sgemm", *args)
                loops = [tir.Var(f"b{d}", "int64") for d in range(inner)]
                offsets = [tir.const(0, "int64")] * 3
                for d, var in enumerate(loops):
                    strides = (_product(a_dims[d + 1 :]) * m * k, _product(b_dims[d + 1 :]) * k * n)
                    strides += (_product(lead[d + 1 :]) * m * n,)
                    has = (*whole[d], True)
                    offsets = [o + var * st if h else o for o, st, h in zip(offsets, strides, has, strict=True)]
                a_step, b_step = (m * k if whole[-1][0] else 0), (k * n if whole[-1][1] else 0)
                group = _product(lead[inner:])
                args = [*trans, _i32(m), _i32(n), _i32(k), one[0]]
                args += [x.access_ptr("r", offset=offsets[0]), _i32(lda), _i32(a_step)]
                args += [w.access_ptr("r", offset=offsets[1]), _i32(ldb), _i32(b_step), one[1]]
                args += [y.access_ptr("w", offset=offsets[2]), _i32(n), _i32(m * n), _i32(group)]
                stmt = tir.Evaluate(tir.call_extern("int32", f"{prefix}cblas_sgemm_batch_strided", *args))
                for d in reversed(range(inner)):
                    stmt = tir.For(loops[d], tir.const(0, "int64"), lead[d], tir.ForKind.SERIAL, stmt)
                return stmt

            return te.extern([*lead, m, n], [a, b], body, name="blas_matmul", dtype="float32")

        return compute

    return build


def _masked_softmax(scores: te.Tensor, *bias: te.Tensor, scale: tir.PrimExpr, causal: str | None) -> te.Tensor:
    """Softmax over the last axis of ``scores * scale (+ bias)``, keys after the query's own position
    (``TopLeft``: key j <= query i; ``BottomRight``: j <= i + S - L) at the dtype's lowest; its exp a polynomial
    (:mod:`.tvm_math`)."""
    from tvm import topi

    length, keys = scores.shape[-2], scores.shape[-1]
    shift = 0 if causal == "TopLeft" else keys - length

    def logit(b, h, i, j):
        value = scores[b, h, i, j] * scale
        if bias:
            value = value + bias[0][b, h, i, j]
        if causal is None:
            return value
        return tir.if_then_else(j > i + shift, tir.min_value("float32"), value)

    return topi.nn.fast_softmax(te.compute(scores.shape, logit, name="logits"), axis=-1)  # see tvm_math


def _i32(value) -> tir.PrimExpr:
    return tir.Cast("int32", value) if not isinstance(value, int) else tir.const(value, "int32")


def _product(dims) -> tir.PrimExpr:
    result = tir.const(1, "int64")
    for d in dims:
        result = result * d
    return result
