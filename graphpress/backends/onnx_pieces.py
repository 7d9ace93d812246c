"""An ONNX file run in onnxruntime piece by piece, so that checking it never holds all of its weights.

A streamed run's model may not fit in memory, and an onnxruntime session holds every
initializer it reads. The file's nodes (in the topological order ONNX requires) are cut
into consecutive pieces of at most ``budget`` bytes of initializers each (a larger single
tensor is a piece of its own). A piece's inputs are the values it reads that the graph's
inputs or earlier pieces produce; its outputs, those that later pieces or the graph's
outputs read. The pieces run in order, one session at a time, each value dropped after its
last reader: the file's own computation, end to end in onnxruntime, with one piece's
weights resident. Only fusions across a cut are lost, so outputs agree with one session's
to rounding.

Each piece's session reads its weights where the file maps them, and makes no copy a check
does not need: no prepacked copy of a MatMul's weight (onnxruntime's default: 2 GB more for
an 8B model's fp32 lm_head), no constant folding at load, which rebuilds a LUT or N:M
weight dense from its codes with every intermediate held at once (measured: 2.5 GB
transient for one layer of an 8B shape's 4-bit attention). The same kernels run the same
ops at each run instead, without a memory arena, whose pages outlive the session that grew
it (measured: 2.2 GB kept across the pieces of that model; 0.3 GB without).

The cut is a dataflow rule, not a model's layer structure: any forward graph splits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BackendError


@dataclass
class Piece:
    nodes: list = field(default_factory=list)
    initializers: dict = field(default_factory=dict)
    """name -> TensorProto (external data stays a reference into the file's data)."""
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


class Pieces:
    """``path``'s model as consecutive pieces; ``sweep`` runs inputs through them, ``__call__`` one input."""

    def __init__(self, path: Path, budget: int, where: str = "onnx"):
        import onnx

        self.path, self.where = Path(path), where
        model = onnx.load(str(path), load_external_data=False)
        self.model = model
        graph = model.graph
        self.inputs = [i.name for i in graph.input]
        self.outputs = [o.name for o in graph.output]
        stored = {t.name: t for t in graph.initializer}
        self.pieces = _cut(graph.node, stored, budget)
        produced = {name: k for k, piece in enumerate(self.pieces) for n in piece.nodes for name in n.output}
        last_read: dict[str, int] = {}
        for k, piece in enumerate(self.pieces):
            for name in [r for n in piece.nodes for r in _reads(n) if r not in piece.initializers]:
                last_read[name] = k
                if produced.get(name, -1) != k and name not in piece.inputs:
                    piece.inputs.append(name)
        for name in self.outputs:
            last_read[name] = len(self.pieces)
        if len(self.pieces) == 1:  # run as the file itself, which takes every graph input
            self.pieces[0].inputs = list(self.inputs)
        for k, piece in enumerate(self.pieces):
            piece.outputs = [name for n in piece.nodes for name in n.output if name and last_read.get(name, k) > k]
        self.last_read = last_read
        self.infos = {
            i.name: i for i in [*graph.input, *graph.output, *graph.value_info] if i.type.tensor_type.elem_type
        }
        missing = set(self.outputs) - set(produced) - set(self.inputs)
        if missing:
            raise BackendError(f"{self.where}: {self.path.name} has outputs no node computes: {sorted(missing)}")

    def __len__(self) -> int:
        return len(self.pieces)

    def __call__(self, tensors: list) -> list:
        return self.sweep([tensors])[0][0]

    def sweep(self, inputs: list[list]) -> list[tuple[list, float]]:
        """Each input's outputs (torch tensors, in the graph's output order) and its seconds in onnxruntime
        (sessions' creation aside), every piece's session made once for all of them."""
        import torch

        live = []
        for tensors in inputs:
            if len(tensors) != len(self.inputs):
                raise BackendError(
                    f"{self.where}: the ONNX model takes {len(self.inputs)} tensor inputs, got {len(tensors)}"
                )
            live.append({n: t.detach().cpu().numpy() for n, t in zip(self.inputs, tensors)})
        seconds = [0.0] * len(inputs)
        for k, piece in enumerate(self.pieces):
            session = self._session(piece, live[0])
            for i, values in enumerate(live):
                start = time.perf_counter()
                results = session.run(piece.outputs, {name: values[name] for name in piece.inputs})
                seconds[i] += time.perf_counter() - start
                values.update(zip(piece.outputs, results))
                for name in [n for n in values if self.last_read.get(n, -1) <= k]:
                    del values[name]
            del session
        return [([torch.from_numpy(np.asarray(v[name])) for name in self.outputs], s) for v, s in zip(live, seconds)]

    def _session(self, piece: Piece, values: dict):
        """A session of one piece (of the file itself when it is the only one). Its values keep the file's types
        and shapes where the file records them (onnxruntime's fusions need them), else its inputs are typed as
        ``values`` (what earlier pieces computed) and its outputs left for onnxruntime to infer. Its file sits
        beside the model's for the external data's relative paths, and is removed once onnxruntime has read it."""
        import onnx

        if len(self.pieces) == 1:
            return lean_session(self.path)
        infos, typed = self.infos, onnx.helper.make_tensor_value_info
        inputs = [
            infos.get(n) or typed(n, onnx.helper.np_dtype_to_tensor_dtype(values[n].dtype), None) for n in piece.inputs
        ]
        outputs = [infos.get(n) or onnx.helper.make_value_info(n, onnx.TypeProto()) for n in piece.outputs]
        inside = [n for node in piece.nodes for n in node.output if n not in piece.outputs]
        graph = onnx.helper.make_graph(
            piece.nodes,
            f"{self.model.graph.name}.piece",
            inputs,
            outputs,
            list(piece.initializers.values()),
            value_info=[infos[n] for n in inside if n in infos],
        )
        proto = onnx.helper.make_model(
            graph,
            opset_imports=self.model.opset_import,
            ir_version=self.model.ir_version,
            functions=self.model.functions,
        )
        file = self.path.with_name(f".{self.path.stem}.piece.onnx")
        try:
            file.write_bytes(proto.SerializeToString())
            return lean_session(file)
        finally:
            file.unlink(missing_ok=True)


def lean_session(path: Path):
    """An onnxruntime session that makes no copy of its weights a check does not need (see above)."""
    import onnxruntime as ort

    from ..runtime import session_options

    options = session_options()
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=["ConstantFolding"]
    )


def _cut(nodes, stored: dict, budget: int) -> list[Piece]:
    pieces, held = [Piece()], 0  # held: the last piece's initializer bytes
    for node in nodes:
        new = {n: stored[n] for n in _reads(node) if n in stored and n not in pieces[-1].initializers}
        size = sum(_tensor_bytes(t) for t in new.values())
        if pieces[-1].nodes and held + size > budget and size:
            pieces.append(Piece())
            new = {n: stored[n] for n in _reads(node) if n in stored}
            held, size = 0, sum(_tensor_bytes(t) for t in new.values())
        pieces[-1].nodes.append(node)
        pieces[-1].initializers.update(new)
        held += size
    return pieces


def _reads(node) -> list[str]:
    """The values ``node`` reads, its subgraphs' reads from the enclosing scope included."""
    import onnx

    names = [n for n in node.input if n]
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
        for graph in graphs:
            inner = {n for x in graph.node for n in x.output} | {i.name for i in graph.input}
            inner |= {t.name for t in graph.initializer}
            names += [n for x in graph.node for n in _reads(x) if n not in inner]
    return list(dict.fromkeys(names))


def _tensor_bytes(tensor) -> int:
    import onnx

    count = int(np.prod(tensor.dims, dtype=np.int64))
    return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize if count else 0
