"""ONNX initializers that stay on disk until the file is written, and the layout folds applied on the way.

A streamed graph's tensors live in the checkpoint and the run's spill store. The ONNX
backend exports its structure with untouched placeholders (``torch.empty``: address space,
no resident pages), then points each initializer back at its stored bytes through an
``onnx_ir.LazyTensor``. Folds of stored data (a weight's transpose, an integer weight's
unpacking into what ``DequantizeLinear`` reads) become lazy tensors too, computed from
their inputs when their bytes are written. Writing external data asks for one tensor at a
time, so the export holds one tensor, never the model.

Both paths fold the same nodes by the same rule (:func:`fold_stored`), so a streamed run's
file is the in-memory run's, byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..ir import Graph
from ..ir.store import is_lazy, materialize

LARGE = 1024
"""Bytes above which a constant is the fold rule's business rather than onnxscript's optimizer's."""


def with_placeholders(graph: Graph) -> tuple[Graph, dict[str, torch.Tensor]]:
    """A copy of ``graph`` whose lazy tensors are untouched empty tensors of their shape and dtype (what the
    exporter traces with), and those lazy stand-ins by name."""
    copy = graph.clone()
    copy.spill = None
    program, lazies = copy.program, {}
    for store in (program.state_dict, program.constants):
        for name, tensor in list(store.items()):
            if is_lazy(tensor):
                lazies[name] = tensor
                empty = torch.empty(tensor.shape, dtype=tensor.dtype)
                store[name] = (
                    torch.nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else empty
                )
    return copy, lazies


def read_lazily(model, lazies: dict[str, torch.Tensor]) -> None:
    """Point every initializer exported from a placeholder at its stored bytes (read when written)."""
    from onnxscript import ir
    from torch.onnx._internal.exporter._core import TorchTensor

    for name, stand_in in lazies.items():
        value = model.graph.initializers.get(name)
        if value is None:
            continue
        tensor = value.const_value
        value.const_value = ir.LazyTensor(
            lambda s=stand_in, n=name: TorchTensor(materialize(s).detach(), name=n),
            dtype=tensor.dtype,
            shape=tensor.shape,
            name=name,
        )


def fold_stored(model, always: set) -> int:
    """Fold, as lazy tensors, every node computed from constants alone that holds a large one, when the file
    does not grow by it (its result is no bigger than the constants only it reads: a weight's transpose) or it
    is in ``always`` (an integer weight's unpacking); returns how many. Smaller folds are left to onnxscript's
    optimizer, which evaluates them at once."""
    from onnxscript import ir

    graph, folded = model.graph, 0
    for node in list(graph):
        inputs = [v for v in node.inputs if v is not None]
        if not inputs or any(v.const_value is None or v.is_graph_input() for v in inputs):
            continue
        if not any(_nbytes(v) > LARGE for v in inputs) or any(v.is_graph_output() for v in node.outputs):
            continue
        _infer(node, model.opset_imports)
        if any(v.shape is None or not v.shape.is_static() or v.dtype is None for v in node.outputs):
            continue
        exclusive = sum(_nbytes(v) for v in inputs if len(v.uses()) == 1)
        if node not in always and sum(_nbytes(v) for v in node.outputs) > exclusive:
            continue
        for k, out in enumerate(node.outputs):
            value = ir.Value(name=out.name, shape=out.shape, type=out.type)
            value.const_value = ir.LazyTensor(_evaluator(node, k), dtype=out.dtype, shape=out.shape, name=out.name)
            out.replace_all_uses_with(value)
            graph.register_initializer(value)
        graph.remove(node, safe=True)
        folded += 1
    return folded


def holds_large_constant(node) -> bool:
    """Whether the fold rule above has decided ``node`` (it is no longer onnxscript's to fold)."""
    return any(v is not None and v.const_value is not None and _nbytes(v) > LARGE for v in node.inputs)


def _infer(node, opsets: dict) -> None:
    """Set the types and shapes of ``node``'s outputs (the exporter leaves those inside an op's decomposition
    unset) by onnx's shape inference, given its inputs' types and its small constant inputs' values."""
    import onnx
    from onnxscript import ir

    inputs = [v for v in node.inputs if v is not None]
    if any(v.type is None or v.shape is None for v in inputs):
        return
    types = {}
    for v in inputs:
        types[v.name] = ir.serde.serialize_type(v.type)
        ir.serde.serialize_shape_into(types[v.name], v.shape)
    data = {v.name: ir.serde.serialize_tensor(v.const_value) for v in inputs if _nbytes(v) <= LARGE}
    try:
        schema = onnx.defs.get_schema(node.op_type, opsets[node.domain], node.domain)
        inferred = onnx.shape_inference.infer_node_outputs(schema, ir.serde.serialize_node(node), types, data)
    except Exception:  # an op onnx cannot infer: the node is left to the optimizer
        return
    for out in node.outputs:
        if out.name in inferred:
            out.shape = ir.serde.deserialize_type_proto_for_shape(inferred[out.name])
            out.type = ir.serde.deserialize_type_proto_for_type(inferred[out.name])


def _evaluator(node, k: int) -> Callable:
    """A thunk computing ``node``'s output ``k`` from its inputs' (lazy) values with onnx's reference
    implementation of the op."""
    from onnx.reference import ReferenceEvaluator
    from onnxscript import ir

    proto = ir.serde.serialize_node(node)
    inputs = [(v.name, v.const_value) for v in node.inputs if v is not None]

    def compute():
        feeds = {name: tensor.numpy() for name, tensor in inputs}
        return ir.tensor(ReferenceEvaluator(proto).run(None, feeds)[k], name=node.outputs[k].name)

    return compute


def nbytes(value) -> int | None:
    """A value's bytes: its constant's, else its static shape's; None when its shape or type is unknown."""
    tensor = value.const_value
    if tensor is not None:
        return tensor.nbytes
    if value.shape is None or not value.shape.is_static() or value.dtype is None:
        return None
    count = 1
    for d in value.shape:
        count *= int(d)
    return count * value.dtype.itemsize


def _nbytes(value) -> int:
    return nbytes(value) or 0
