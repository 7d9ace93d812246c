"""Compressed linears as one TIR kernel each: the weight decoded next to the multiply (issue 25).

A weight format whose codes are a bit stream of 1, 2, 4 or 8 bits per weight (integer blocks,
``graphpress::int_weight``; palettes, ``graphpress::lut_weight``; powers of two,
``graphpress::shift_weight``) describes itself as :class:`graphpress.ir.ops.bitstream.PackedRows`:
``value(n, j, slot)``, the weight in slot ``slot`` of byte ``j`` of row ``n``. From that, ``y = x W^T + b`` for x (M, K) is one PrimFunc whose
path is chosen by M at run time (one decode graph serves the prompt and every step):

- **M <= ``FUSED_ROWS``** (a decoding step, a small batch): each output row n decodes its weights
  a vector of bytes at a time, in registers, and multiplies them into R rows of x at once
  (R = 1 for a single row, ``TILE_ROWS`` otherwise). x is first laid out as
  ``xs[m, chunk, slot, lane]`` = x[m, (chunk * lanes + lane) * per + slot] (per codes per
  byte), so the products read x with unit stride. Each slot, and every other chunk, has its own
  vector accumulator (independent FMA chains), reduced with constant indices only so they stay
  in registers. The weight is never written out: a step reads the packed bytes, not float32.
- **M > ``FUSED_ROWS``** (a prompt): the weight is decoded once into a workspace and multiplied
  with BLAS's ``sgemm``; its cost is amortised over the M rows.

The prompt path decodes on TVM's thread pool (``TVM_NUM_THREADS``); the register paths' output rows run in
parallel from ``PARALLEL_WEIGHTS`` weights on,
in tasks of ``TASK_ROWS`` rows whose accumulators are allocated once per call. Bits that straddle bytes
(3, 5, 6, 7) keep the rebuild-then-matmul form.
"""

from __future__ import annotations

import functools

import torch
from torch import fx
from tvm import relax
from tvm import tirx as tir
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..ir import ops
from ..ir.ops.bitstream import PackedRows
from ..ir.ops.fused import FUSED
from .tvm_blas import NO_TRANS, ROW_MAJOR, TRANS, Blas
from .tvm_tune import SCHEDULED

FUSED_ROWS = 8
"""Largest M decoded in registers; above it the weight is decoded once and BLAS multiplies."""

TILE_ROWS = 4
"""Rows of x multiplied into one decoded vector of weights (when M > 1)."""

PARALLEL_WEIGHTS = 1 << 20
"""Weights from which a kernel's output rows run on TVM's thread pool: waking it costs ~15 us a call, more than
the example LM's 256 x 704 linears take on one core (measured on 2 cores)."""

TASK_ROWS = 16
"""Output rows per parallel task. The tasks' accumulators are slices of one buffer allocated once per call: a
local buffer inside the parallel loop costs a workspace allocation and free per row (~60 ns each)."""


def decodes(weight: fx.Node) -> bool:
    """Whether a kernel here computes ``linear(x, weight)``: the weight format has a TIR form for these
    arguments and the linear is float32 throughout (the kernels' type)."""
    rows = ops.packed_rows().get(weight.target)
    linear = next(iter(weight.users))
    operands = [linear, linear.args[0], *(linear.args[2:3] if len(linear.args) > 2 else [])]
    float32 = all(isinstance(a, fx.Node) and a.meta["val"].dtype == torch.float32 for a in operands if a is not None)
    return rows is not None and float32 and rows(*_values(weight.args)) is not None


def relax_converters(blas: Blas) -> dict:
    """``from_exported_program(custom_convert_map=...)`` entries for the fused linears (``graphpress::<format>
    _linear``, :mod:`graphpress.ir.ops.fused`) of every format with a TIR form."""
    return {
        FUSED[weight].__name__: functools.partial(_convert, rows, blas) for weight, rows in ops.packed_rows().items()
    }


def _convert(rows_of, blas: Blas, node: fx.Node, importer) -> relax.Expr:
    x, *stored, bias = node.args
    rows = rows_of(*_values(stored))
    tensors = [importer.env[a] for a in stored if isinstance(a, fx.Node)]
    b = importer.env[bias] if bias is not None else None
    return fused_linear(importer.block_builder, importer.env[x], rows, tensors, b, blas)


def _values(args) -> list:
    return [a.meta["val"] if isinstance(a, fx.Node) else a for a in args]


def linear_kernel(rows: PackedRows, blas: Blas, bias: bool, name: str) -> tir.PrimFunc:
    """The PrimFunc ``(x (M, K), *rows.params, [bias (N,)], y (M, N))`` described in the module's docstring."""
    n_out, k_in, per, lanes, chunks = rows.out_features, rows.in_features, rows.per, rows.lanes, rows.chunks
    across = T.parallel if n_out * k_in >= PARALLEL_WEIGHTS else T.serial
    f32 = "float32"
    with IRBuilder() as ib, T.prim_func():
        T.func_name(name)
        T.func_attr({"tir.noalias": True, SCHEDULED: True})
        m_rows = tir.Var("m", "int64")
        x = T.match_buffer(T.arg("x", T.handle()), (m_rows, k_in), f32)
        params = [T.match_buffer(T.arg(p.name, T.handle()), p.shape, p.dtype) for p in rows.params]
        b = T.match_buffer(T.arg("bias", T.handle()), (n_out,), f32) if bias else None
        y = T.match_buffer(T.arg("y", T.handle()), (m_rows, n_out), f32)
        value = rows.decoder(params)

        def output(m, n, total):
            T.buffer_store(y, total + b[n] if bias else total, [m, n])

        def fused(tile: int):
            padded = (m_rows + tile - 1) // tile * tile
            xs = T.alloc_buffer((padded, chunks, per, lanes), f32)
            with T.grid(padded, chunks, per) as (m, c, s), T.vectorized(lanes) as p:
                k = (c * lanes + p) * per + s
                inside = tir.all(m < m_rows, k < k_in)
                load = x[tir.min(m, m_rows - 1), tir.min(k, k_in - 1)]
                T.buffer_store(xs, tir.if_then_else(inside, load, tir.const(0, f32)), [m, c, s, p])
            ways = 2 if chunks % 2 == 0 else 1  # independent accumulator chains per slot: FMA latency
            width = ways * per * lanes
            tasks = -(-n_out // TASK_ROWS)
            accumulators = T.alloc_buffer((tasks, tile * width), f32)  # one allocation, a slice per task
            with across(0, tasks) as task, T.serial(0, TASK_ROWS) as r:
                n = task * TASK_ROWS + r
                with T.If(n < n_out), T.Then(), T.serial(0, padded // tile) as t:
                    with T.vectorized(tile * width) as p:
                        T.buffer_store(accumulators, tir.const(0, f32), [task, p])
                    with (
                        T.serial(0, chunks // ways) as outer,
                        T.unroll(ways) as w,
                        T.unroll(per) as s,
                        T.unroll(tile) as i,
                        T.vectorized(lanes) as p,
                    ):
                        c = outer * ways + w
                        j = c * lanes + p
                        product = xs[t * tile + i, c, s, p] * value(n, j, s)
                        slot = i * width + (w * per + s) * lanes + p
                        T.buffer_store(accumulators, accumulators[task, slot] + product, [task, slot])
                    with T.unroll(tile) as i:
                        with T.unroll(1, ways * per) as chain, T.vectorized(lanes) as p:
                            first, other = i * width + p, i * width + chain * lanes + p
                            T.buffer_store(
                                accumulators, accumulators[task, first] + accumulators[task, other], [task, first]
                            )
                        total = functools.reduce(
                            lambda a, p: a + accumulators[task, i * width + p],
                            range(1, lanes),
                            accumulators[task, i * width],
                        )
                        with T.If(t * tile + i < m_rows), T.Then():
                            output(t * tile + i, n, total)

        def decoded_then_blas():
            dense = T.alloc_buffer((n_out, k_in), f32)
            with T.parallel(0, n_out) as n, T.grid(chunks * lanes, per) as (j, s):  # a prompt's: worth the pool
                k = j * per + s
                with T.If(k < k_in), T.Then():
                    T.buffer_store(dense, value(n, j, s), [n, k])
            if bias:
                with T.grid(m_rows, n_out) as (m, n):
                    T.buffer_store(y, b[n], [m, n])
            i32 = [tir.Cast("int32", v) for v in (m_rows, n_out, k_in)]
            T.evaluate(
                tir.call_extern(
                    "int32",
                    f"{blas.prefix}cblas_sgemm",
                    ROW_MAJOR,
                    NO_TRANS,
                    TRANS,
                    *i32,
                    tir.const(1.0, f32),
                    x.access_ptr("r"),
                    i32[2],
                    dense.access_ptr("r"),
                    i32[2],
                    tir.const(1.0 if bias else 0.0, f32),
                    y.access_ptr("w"),
                    i32[1],
                )
            )

        with T.If(m_rows == 1):
            with T.Then():
                fused(1)
            with T.Else(), T.If(m_rows <= FUSED_ROWS):
                with T.Then():
                    fused(TILE_ROWS)
                with T.Else():
                    decoded_then_blas()
    return ib.get().without_attr("global_symbol")  # the module names it (one kernel per distinct shape)


def fused_linear(bb: relax.BlockBuilder, x: relax.Expr, rows: PackedRows, tensors, bias, blas: Blas) -> relax.Expr:
    """Emit ``x @ W^T (+ bias)`` over x (..., K) as a call of :func:`linear_kernel`."""
    from tvm.relax import op

    lead = list(x.ty.shape.values[:-1])
    flat = bb.emit(op.reshape(x, (-1, rows.in_features)))
    kernel = linear_kernel(rows, blas, bias is not None, f"{rows.name}_linear")
    gv = bb.add_func(kernel, f"{rows.name}_linear")
    m_rows = flat.ty.shape.values[0]
    args = [flat, *tensors, *([bias] if bias is not None else [])]
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType((m_rows, rows.out_features), "float32")))
    return bb.emit(op.reshape(y, (*lead, rows.out_features)))
