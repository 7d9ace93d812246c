"""Float32 softmax over the last axis as one hand-scheduled TIR kernel (issue 25).

TVM's default schedule of TOPI's softmax (even with the polynomial exp of :mod:`.tvm_math`) runs its
max, exp-and-sum and divide as serial scalar loops that reduce through memory: on the example LM's
256-token prompt the causal attention softmax over 1 x 8 x 256 x 256 scores took ~2 ms a layer, a
third of TVM's prompt. Here each row's three passes run over vectors of ``LANES`` values with
per-lane accumulators (reduced once, with constant indices, so they stay in registers), rows run in
parallel on TVM's pool from ``PARALLEL_VALUES`` values on, and a causal row stops at its diagonal:
keys after it are written as 0 and never read (half a square prompt's work).

``softmax(x * scale)`` over x (..., S, N); causal: key j of query i is kept when j <= i + N - S
(``BottomRight``: the last query sees every key) or j <= i (``TopLeft``), PyTorch's and Relax's
conventions. exp is TOPI's ``fast_exp`` polynomial (:func:`.tvm_math.exp_polynomial`).
"""

from __future__ import annotations

import functools

from tvm import relax
from tvm import tirx as tir
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .tvm_math import exp_polynomial
from .tvm_tune import SCHEDULED

LANES = 16
"""Values per vector: one AVX-512 register, two AVX2 ones."""

PARALLEL_VALUES = 1 << 16
"""Values from which rows run on TVM's thread pool (waking it costs ~15 us a call on 2 cores; a decoding step's
8 x 2048 scores take less than that on one core)."""

TASK_ROWS = 8
"""Rows per parallel task; the tasks' accumulators are slices of one buffer allocated once per call."""


@functools.cache
def softmax_kernel(rank: int, scale: float, causal: str | None) -> tir.PrimFunc:
    """The PrimFunc ``(x, y)`` over float32 tensors of ``rank`` dims (symbolic), described in the module's
    docstring."""
    f32 = "float32"
    with IRBuilder() as ib, T.prim_func():
        T.func_name("softmax_rows")
        T.func_attr({"tir.noalias": True, SCHEDULED: True})
        dims = [tir.Var(f"d{i}", "int64") for i in range(rank)]
        x = T.match_buffer(T.arg("x", T.handle()), dims, f32)
        y = T.match_buffer(T.arg("y", T.handle()), dims, f32)
        with T.sblock("root"):  # Relax's reshape detection reads a one-input kernel's root block
            length, keys = (dims[-2], dims[-1]) if rank >= 2 else (tir.const(1, "int64"), dims[-1])
            rows = functools.reduce(lambda a, b: a * b, dims[:-1], tir.const(1, "int64"))
            xs = T.decl_buffer((rows, keys), f32, data=x.data)
            ys = T.decl_buffer((rows, keys), f32, data=y.data)
            tasks = (rows + TASK_ROWS - 1) // TASK_ROWS
            lanes = T.alloc_buffer((tasks, 2 * LANES), f32)  # per task: max lanes, then sum lanes
            shift = keys - length if causal == "BottomRight" else tir.const(0, "int64")
            lowest = tir.min_value(f32)

            def row(task, r):
                kept = keys if causal is None else tir.max(tir.min(r % length + shift + 1, keys), 0)
                full = kept // LANES * LANES

                def value(j):
                    return xs[r, j] * tir.const(scale, f32) if scale != 1.0 else xs[r, j]

                def reduce(first, op):
                    return functools.reduce(op, (lanes[task, first + p] for p in range(1, LANES)), lanes[task, first])

                with T.vectorized(LANES) as p:
                    T.buffer_store(lanes, lowest, [task, p])
                with T.serial(0, full // LANES) as c, T.vectorized(LANES) as p:
                    T.buffer_store(lanes, tir.max(lanes[task, p], value(c * LANES + p)), [task, p])
                with T.serial(full, kept) as j:
                    T.buffer_store(lanes, tir.max(lanes[task, 0], value(j)), [task, 0])
                top = T.bind(reduce(0, tir.max))
                with T.vectorized(LANES) as p:
                    T.buffer_store(lanes, tir.const(0, f32), [task, LANES + p])
                with T.serial(0, full // LANES) as c, T.vectorized(LANES) as p:
                    e = exp_polynomial(value(c * LANES + p) - top)
                    T.buffer_store(ys, e, [r, c * LANES + p])
                    T.buffer_store(lanes, lanes[task, LANES + p] + e, [task, LANES + p])
                with T.serial(full, kept) as j:
                    e = exp_polynomial(value(j) - top)
                    T.buffer_store(ys, e, [r, j])
                    T.buffer_store(lanes, lanes[task, LANES] + e, [task, LANES])
                inverse = T.bind(tir.const(1, f32) / reduce(LANES, lambda a, b: a + b))
                with T.serial(0, full // LANES) as c, T.vectorized(LANES) as p:
                    T.buffer_store(ys, ys[r, c * LANES + p] * inverse, [r, c * LANES + p])
                with T.serial(full, kept) as j:
                    T.buffer_store(ys, ys[r, j] * inverse, [r, j])
                with T.serial(kept, keys) as j:
                    T.buffer_store(ys, tir.const(0, f32), [r, j])

            def all_rows(across):
                with across(0, tasks) as task, T.serial(0, TASK_ROWS) as k, T.If(task * TASK_ROWS + k < rows), T.Then():
                    row(task, task * TASK_ROWS + k)

            with T.If(rows * keys >= PARALLEL_VALUES):
                with T.Then():
                    all_rows(T.parallel)
                with T.Else():
                    all_rows(T.serial)
    return ib.get()


def emit_softmax_rows(bb: relax.BlockBuilder, x: relax.Expr, scale: float, causal: str | None, name: str):
    """``call_tir`` of :func:`softmax_kernel` on ``x`` (float32, its shape kept), the kernel added to ``bb``'s
    module as ``name``."""
    gv = bb.add_func(softmax_kernel(x.ty.ndim, float(scale), causal), name)
    return relax.call_tir(gv, [x], relax.TensorType(x.ty.shape, "float32"))
