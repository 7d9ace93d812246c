"""The ONNX backend's stored-tensor folds: a weight's transpose becomes a lazy initializer, computed only when the
file is written; a fold that would grow the file (a shared weight, an expanding op) is left alone."""

from __future__ import annotations

import numpy as np
import pytest

from graphpress.backends.onnx_store import fold_stored

ir = pytest.importorskip("onnxscript").ir


class Counted:
    """A stored tensor whose reads are counted."""

    def __init__(self, array: np.ndarray):
        self.array, self.reads = array, 0

    def tensor(self, name: str):
        def read():
            self.reads += 1
            return ir.tensor(self.array, name=name)

        return ir.LazyTensor(read, dtype=ir.DataType.FLOAT, shape=ir.Shape(self.array.shape), name=name)


def initializer(name: str, stored: Counted):
    value = ir.Value(name=name, shape=ir.Shape(stored.array.shape), type=ir.TensorType(ir.DataType.FLOAT))
    value.const_value = stored.tensor(name)
    return value


def model_of(x, nodes, outputs, initializers):
    graph = ir.Graph([x], outputs, nodes=nodes, initializers=initializers, opset_imports={"": 18})
    return ir.Model(graph, ir_version=10)


def test_a_weights_transpose_is_folded_lazily_and_a_growing_fold_is_not():
    """Before: y = x @ Transpose(w); z = x @ Transpose(s) + x @ s' (s read twice); t = Tile(e, [4, 1]).
    Expected: Transpose(w) an initializer read once, when asked for; the others untouched."""
    rng = np.random.default_rng(0)
    w, s, e = (Counted(rng.standard_normal(shape).astype(np.float32)) for shape in [(48, 32), (32, 32), (8, 32)])
    x = ir.Value(name="x", shape=ir.Shape([2, 32]), type=ir.TensorType(ir.DataType.FLOAT))
    vw, vs, ve = initializer("w", w), initializer("s", s), initializer("e", e)
    repeats = ir.Value(name="repeats", shape=ir.Shape([2]), type=ir.TensorType(ir.DataType.INT64))
    repeats.const_value = ir.tensor(np.array([4, 1], dtype=np.int64), name="repeats")
    tw = ir.Node("", "Transpose", [vw], attributes=[ir.AttrInt64s("perm", [1, 0])])
    y = ir.Node("", "MatMul", [x, tw.outputs[0]])
    ts = ir.Node("", "Transpose", [vs], attributes=[ir.AttrInt64s("perm", [1, 0])])
    a, b = ir.Node("", "MatMul", [x, ts.outputs[0]]), ir.Node("", "MatMul", [x, vs])
    z = ir.Node("", "Add", [a.outputs[0], b.outputs[0]])
    tile = ir.Node("", "Tile", [ve, repeats])
    model = model_of(
        x, [tw, y, ts, a, b, z, tile], [y.outputs[0], z.outputs[0], tile.outputs[0]], [vw, vs, ve, repeats]
    )

    assert fold_stored(model, always=set()) == 1
    ops = [n.op_type for n in model.graph]
    assert ops == ["MatMul", "Transpose", "MatMul", "MatMul", "Add", "Tile"]  # s is shared; Tile grows e 4x
    folded = model.graph.node(0).inputs[1]
    assert folded.is_initializer() and folded.shape == ir.Shape([32, 48]) and folded.dtype == ir.DataType.FLOAT
    assert w.reads == 0  # nothing read until the bytes are wanted
    assert np.array_equal(folded.const_value.numpy(), w.array.T) and w.reads == 1
    assert s.reads == e.reads == 0


def test_an_integer_weights_unpacking_is_folded_whatever_its_intermediate_sizes():
    """Nodes named in ``always`` (the cone feeding a DequantizeLinear) fold even where one step grows the data."""
    codes = Counted(np.arange(8 * 64, dtype=np.float32).reshape(8, 64) % 16)
    x = ir.Value(name="x", shape=ir.Shape([2, 64]), type=ir.TensorType(ir.DataType.FLOAT))
    vc = initializer("codes", codes)
    repeats = ir.Value(name="repeats", shape=ir.Shape([2]), type=ir.TensorType(ir.DataType.INT64))
    repeats.const_value = ir.tensor(np.array([2, 1], dtype=np.int64), name="repeats")
    tile = ir.Node("", "Tile", [vc, repeats])
    y = ir.Node("", "MatMul", [x, ir.Node("", "Transpose", [tile.outputs[0]]).outputs[0]])
    transpose = y.inputs[1].producer()
    model = model_of(x, [tile, transpose, y], [y.outputs[0]], [vc, repeats])
    assert fold_stored(model, always={tile}) == 2  # the tile (asked for), then its transpose (no bigger)
    assert [n.op_type for n in model.graph] == ["MatMul"] and codes.reads == 0
    assert np.array_equal(model.graph.node(0).inputs[1].const_value.numpy(), np.tile(codes.array, (2, 1)).T)
