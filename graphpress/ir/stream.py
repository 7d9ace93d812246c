"""Run a graph over many inputs node by node, all inputs in lockstep, reading each weight once.

This is how a model bigger than memory is calibrated and verified (the "sequential
onloading" of llm-compressor, without knowing what a decoder block is): a node's weights
are read from disk when the node runs, used for every input, and dropped; a value is
dropped after its last reader has run. So at any moment memory holds one node's weights
and the values still live at that point of the graph (for a decoder, the hidden states of
every input at one block boundary), never the whole model.

Each op runs on each input exactly as ``graph.module()`` would run it, so the outputs and
every tapped value are bitwise those of running the inputs one by one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch.export.graph_signature import InputKind, OutputKind

from ..progress import track
from .graph import Graph
from .store import materialize

Taps = dict[str, Callable[[Any], None]]


class Sweep:
    """One pass over ``graph``'s nodes for all ``inputs`` (tuples of positional inputs); ``taps[name]`` sees
    the named node's value for each input, in input order. :meth:`run_until` stops early, so a caller can use
    the statistics of one layer before the next layer runs."""

    def __init__(self, graph: Graph, inputs: list[tuple], taps: Taps | None = None):
        self.graph, self.inputs, self.taps = graph, inputs, dict(taps or {})
        self.nodes = list(graph.fx.nodes)
        self.position = 0
        self.values: dict[fx.Node, list] = {}
        self.ran: set[str] = set()
        last: dict[fx.Node, int] = {}
        for i, node in enumerate(self.nodes):
            for source in node.all_input_nodes:
                last[source] = i
        self.dying: dict[int, list[fx.Node]] = {}
        for node, i in last.items():
            self.dying.setdefault(i, []).append(node)
        self.outputs: list | None = None
        self.stand_ins = graph.tensors()
        self.weights: dict[fx.Node, str] = {}
        specs = graph.program.graph_signature.input_specs
        users = [s.arg.name for s in specs if s.kind == InputKind.USER_INPUT]
        self.user_index = {name: k for k, name in enumerate(users)}
        self.leaves = [pytree.tree_leaves((args, {})) for args in inputs]

    def run_until(self, names: Collection[str] | None = None) -> None:
        """Run nodes in order until every node in ``names`` has run (None: to the end)."""
        wanted = set(names or ()) - self.ran
        while self.position < len(self.nodes) and (wanted or names is None):
            wanted.discard(self._step())

    def finish(self, description: str | None = None) -> list:
        """Each input's outputs, structured as ``graph.module()`` returns them; with a progress bar (ops run, and
        the time left) named ``description`` when a run's progress is on."""
        remaining = range(self.position, len(self.nodes))
        for _ in track(remaining, description) if description else remaining:
            self._step()
        return self.outputs

    @torch.no_grad()
    def _step(self) -> str:
        """Run the next node, drop the values it was the last reader of; its name."""
        node = self.nodes[self.position]
        self._run(node)
        self.ran.add(node.name)
        for dead in self.dying.pop(self.position, ()):
            self.values.pop(dead, None)
        self.position += 1
        return node.name

    def _run(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self._placeholder(node)
        elif node.op == "get_attr":
            self.values[node] = [getattr(self.graph.program.graph_module, node.target)] * len(self.inputs)
        elif node.op == "call_function":
            weights = {
                n: materialize(self.stand_ins[self.weights[n]]) for n in node.all_input_nodes if n in self.weights
            }
            results = []
            for i in range(len(self.inputs)):
                args, kwargs = fx.map_arg((node.args, node.kwargs), lambda n, i=i: self._value(n, i, weights))
                results.append(node.target(*args, **kwargs))
            del weights
            self.values[node] = results
            if node.name in self.taps:
                for value in results:
                    self.taps[node.name](value)
        elif node.op == "output":
            self._output(node)
        else:
            raise NotImplementedError(f"streamed run: node {node.name} has op {node.op!r}")

    def _value(self, node: fx.Node, i: int, weights: dict) -> Any:
        return weights[node] if node in weights else self.values[node][i]

    def _placeholder(self, node: fx.Node) -> None:
        name = self.graph.tensor_name(node)
        if name is not None:
            self.weights[node] = name
            return
        index = self.user_index[node.name]
        self.values[node] = [leaves[index] for leaves in self.leaves]

    def _output(self, node: fx.Node) -> None:
        specs = self.graph.program.graph_signature.output_specs
        flat = node.args[0]
        user = [flat[k] for k, s in enumerate(specs) if s.kind == OutputKind.USER_OUTPUT]
        tree = self.graph.program.call_spec.out_spec
        self.outputs = []
        for i in range(len(self.inputs)):
            leaves = [self._value(n, i, {}) if isinstance(n, fx.Node) else n for n in user]
            self.outputs.append(pytree.tree_unflatten(leaves, tree))


def give_back_freed_memory() -> None:
    """Return the C heap's free pages to the system (glibc's ``malloc_trim``; elsewhere nothing).

    A streamed run frees one layer's weights and statistics after another. glibc serves such
    tensors from its heap once its mmap threshold has grown, and keeps what they leave behind:
    measured, resident memory grew by about one layer per layer without this, and stayed flat with it.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
