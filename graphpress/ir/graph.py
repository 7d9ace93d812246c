"""Graph: a thin, typed wrapper over a ``torch.export`` ExportedProgram.

Passes speak a small vocabulary instead of raw FX surgery: select linears and
blocks by module-path glob, read weights, add parameters, replace a linear by a
subgraph. Every mutating method works on the Graph it is called on; passes get a
private copy from :meth:`Graph.clone` (the PassManager does this), so a pass
never changes its input.

Parameters stay *lifted* (graph inputs described by the graph signature), as
torch.export produces them: a new parameter is a new placeholder plus an
``InputSpec`` plus a ``state_dict`` entry, kept in that order.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
import torch.utils._pytree as pytree
from torch import fx
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputKind,
    OutputSpec,
    TensorArgument,
)
from torch.utils._sympy.numbers import int_oo

from .decode import STEP_INPUTS, CacheEntry, CacheLayout
from .store import SpillStore, is_lazy, materialize

ASSERT = torch.ops.aten._assert_tensor_metadata.default  # export's dtype checks: they compute nothing

aten = torch.ops.aten


def matches(path: str, patterns: str | Sequence[str]) -> bool:
    """Glob match of a module path; a pattern also matches any path that ends with it at a dot."""
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, "*." + p) for p in patterns)


def ancestors(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """``nodes`` and every node they are computed from."""
    found: set[fx.Node] = set()
    todo = list(nodes)
    while todo:
        node = todo.pop()
        if node not in found:
            found.add(node)
            todo.extend(node.all_input_nodes)
    return found


def module_path(node: fx.Node) -> str:
    """The innermost module a node was traced in ('' for the root module)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return next(reversed(stack.values()))[0]


@dataclass(frozen=True)
class Linear:
    """One ``aten.linear`` call whose weight is a parameter: y = x W^T + b."""

    node: fx.Node
    path: str
    weight: str
    bias: str | None
    in_features: int
    out_features: int

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class StoredLinear:
    """An ``aten.linear`` whose weight a ``graphpress::`` format op rebuilds: y = x op(...)^T + b."""

    node: fx.Node
    path: str
    op: fx.Node

    @property
    def format(self) -> str:
        """The op's qualified name, e.g. 'graphpress::nm_weight'."""
        return self.op.target.name()


_revisions = itertools.count()


class Graph:
    def __init__(self, program: ExportedProgram, cache: CacheLayout | None = None):
        self._program = program
        self.cache = cache
        """Decode graphs: what the cache inputs/outputs hold (None for forward graphs)."""
        self._stale_code = False
        self._module: torch.nn.Module | None = None
        self.revision = next(_revisions)
        """Names the graph's content: shared by a clone, new after every edit. A key for caches."""
        self.spill: SpillStore | None = None
        """Streaming: where tensors added to the graph are written (the graph keeps lazy stand-ins)."""

    # ------------------------------------------------------------------ reading
    @property
    def program(self) -> ExportedProgram:
        """The ExportedProgram, its generated Python code brought up to date with the graph.

        Edits only mark the code stale: regenerating it after every edit cost most of a
        pass's time on large graphs (it is O(nodes) per edit).
        """
        if self._stale_code:
            self._program.graph_module.recompile()
            self._stale_code = False
        return self._program

    @property
    def fx(self) -> fx.Graph:
        return self._program.graph

    @property
    def nodes(self) -> list[fx.Node]:
        return list(self.fx.nodes)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor by name: parameters, buffers and lifted constants (a lazy one as its meta
        stand-in: shape and dtype without data; :meth:`weight` reads it)."""
        return {
            **self._program.state_dict,
            **{k: v for k, v in self._program.constants.items() if isinstance(v, torch.Tensor)},
        }

    def weight(self, name: str) -> torch.Tensor:
        return materialize(self.stored(name))

    def stored(self, name: str) -> torch.Tensor:
        """The tensor as stored, a lazy one as its meta stand-in: its shape, dtype and size without reading it."""
        value = self._store_of(name).get(name)
        if not isinstance(value, torch.Tensor):
            raise KeyError(f"no tensor named {name!r} in the graph")
        return value

    def _store_of(self, name: str) -> dict:
        """The dict ``name`` is kept in: the state dict (parameters, buffers) or the lifted constants."""
        return self._program.state_dict if name in self._program.state_dict else self._program.constants

    @property
    def lazy(self) -> bool:
        """Whether some stored tensor is on disk (a lazily captured checkpoint, or spilled results)."""
        return any(is_lazy(t) for t in self.tensors().values())

    def tensor_name(self, node: Any) -> str | None:
        """The stored tensor a placeholder node stands for, or None for user inputs and computed values."""
        if not isinstance(node, fx.Node) or node.op != "placeholder":
            return None
        sig = self._program.graph_signature
        return (
            sig.inputs_to_parameters.get(node.name)
            or sig.inputs_to_buffers.get(node.name)
            or sig.inputs_to_lifted_tensor_constants.get(node.name)
        )

    def input_ranges(self) -> dict[str, list[int | list[int | None]]]:
        """Each user input's dimensions: an int where fixed, [min, max] where symbolic (max None: unbounded).

        What the capture promises: the graph runs on any shape inside these ranges.
        """
        ranges = self._program.range_constraints
        found = {}
        user = {s.arg.name for s in self._program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}
        for node in self.fx.nodes:
            if node.op != "placeholder" or node.name not in user or not isinstance(node.meta.get("val"), torch.Tensor):
                continue
            dims = []
            for size in node.meta["val"].shape:
                expr = size.node.expr if isinstance(size, torch.SymInt) else None
                if expr is None or expr not in ranges:
                    dims.append(int(size))
                    continue
                lo, hi = ranges[expr].lower, ranges[expr].upper
                dims.append([int(lo), None if hi == int_oo else int(hi)])
            found[node.name] = dims
        return found

    def linears(self, targets: str | Sequence[str] = "*", exclude: Sequence[str] = ()) -> list[Linear]:
        found = []
        for node in self.fx.nodes:
            if node.op != "call_function" or node.target is not aten.linear.default:
                continue
            weight = self.tensor_name(node.args[1])
            if weight is None:
                continue
            path = module_path(node)
            if not matches(path, targets) or (exclude and matches(path, exclude)):
                continue
            bias = self.tensor_name(node.args[2]) if len(node.args) > 2 and node.args[2] is not None else None
            out_features, in_features = self.stored(weight).shape
            found.append(Linear(node, path, weight, bias, in_features, out_features))
        return found

    def stored_linears(self, targets: str | Sequence[str] = "*", exclude: Sequence[str] = ()) -> list[StoredLinear]:
        """Linears whose weight is already stored in a compressed format (not a parameter)."""
        found = []
        for node in self.fx.nodes:
            if node.op != "call_function" or node.target is not aten.linear.default:
                continue
            op = node.args[1]
            if not (
                isinstance(op, fx.Node)
                and op.op == "call_function"
                and getattr(op.target, "namespace", None) == "graphpress"
            ):
                continue
            path = module_path(node)
            if matches(path, targets) and not (exclude and matches(path, exclude)):
                found.append(StoredLinear(node, path, op))
        return found

    def attention_blocks(self, targets: str | Sequence[str] = "*"):
        from .blocks import find_attention_blocks

        return [b for b in find_attention_blocks(self) if matches(b.path, targets)]

    def mlp_blocks(self, targets: str | Sequence[str] = "*"):
        from .blocks import find_mlp_blocks

        return [b for b in find_mlp_blocks(self) if matches(b.path, targets)]

    def summary(self):
        from .summary import summarize

        return summarize(self)

    def to_networkx(self):
        """A DiGraph of the FX nodes: node attributes op, target, module path, shape, dtype."""
        import networkx as nx

        g = nx.DiGraph()
        for node in self.fx.nodes:
            val = node.meta.get("val")
            g.add_node(
                node.name,
                op=node.op,
                target=str(node.target),
                path=module_path(node),
                shape=tuple(val.shape) if isinstance(val, torch.Tensor) else None,
                dtype=str(val.dtype) if isinstance(val, torch.Tensor) else None,
                tensor=self.tensor_name(node),
            )
            for inp in node.all_input_nodes:
                g.add_edge(inp.name, node.name)
        return g

    # ------------------------------------------------------------------ running
    def module(self) -> torch.nn.Module:
        """The graph as a runnable module (cached until the graph changes)."""
        if self._module is None:
            self._module = self.program.module()
            if self.lazy:  # everything read into memory: what a caller who asks for the module gets
                lazy = {n: materialize(t) for n, t in self.tensors().items() if is_lazy(t)}
                self._module.load_state_dict(lazy, strict=False, assign=True)
        return self._module

    def __call__(self, *args, **kwargs):
        return self.module()(*args, **kwargs)

    @torch.no_grad()
    def run_with_taps(self, args: tuple, taps: dict[str, Callable[[Any], None]], kwargs: dict | None = None) -> tuple:
        """Run the graph on one input and hand each tapped node's value to ``taps[node.name]``.

        Interprets the lifted graph directly, so taps see the nodes passes select. Returns the
        graph's flat outputs.
        """
        return tuple(_TapInterpreter(self._program.graph_module, taps).run(*self._feeds(args, kwargs)))

    @torch.no_grad()
    def evaluate(self, nodes: Sequence[fx.Node], args: tuple) -> list[Any]:
        """The values of ``nodes`` on one input, computing only what they depend on (a mask, a length:
        cheap even where the whole step would not be, e.g. at a long context)."""
        values: dict[fx.Node, Any] = {}
        _PartialInterpreter(self._program.graph_module, ancestors(nodes), values).run(*self._feeds(args, None))
        return [values[n] for n in nodes]

    def _feeds(self, args: tuple, kwargs: dict | None) -> list:
        """The lifted graph's placeholders' values: the user's inputs, then parameters, buffers, constants."""
        ep = self._program
        user_inputs = iter(pytree.tree_leaves((args, kwargs or {})))
        feeds = []
        for spec in ep.graph_signature.input_specs:
            if spec.kind == InputKind.USER_INPUT:
                feeds.append(next(user_inputs))
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                feeds.append(materialize(self._store_of(spec.target)[spec.target]))
            else:
                feeds.append(materialize(ep.constants[spec.target]))
        return feeds

    # ------------------------------------------------------------------ copying
    def clone(self) -> Graph:
        """A new Graph with its own FX graph, signature and state dict; tensors are shared, not copied.

        Sharing is safe because Graph never writes into a tensor: it only rebinds names.
        """
        ep = self._program
        graph = fx.Graph()
        val_map: dict[fx.Node, fx.Node] = {}
        out_val, out_node = graph.graph_copy(ep.graph, val_map, return_output_node=True)
        graph.output(out_val).meta.update(out_node.meta)
        root = fx.GraphModule(ep.graph_module, graph)
        renamed = {old.name: new.name for old, new in val_map.items() if old.name != new.name}
        sig = ep.graph_signature
        program = ExportedProgram(
            root=root,
            graph=root.graph,
            graph_signature=ExportGraphSignature(
                [_renamed(spec, renamed) for spec in sig.input_specs],
                [_renamed(spec, renamed) for spec in sig.output_specs],
            ),
            state_dict=dict(ep.state_dict),
            range_constraints=dict(ep.range_constraints),
            module_call_graph=list(ep.module_call_graph),
            example_inputs=ep.example_inputs,
            constants=dict(ep.constants),
            verifiers=list(ep.verifiers),
        )
        program._guards_code = list(ep._guards_code)  # not re-derived: a cache rewrite may have pruned them
        copy = Graph(program, cache=self.cache)
        copy.spill = self.spill
        copy.revision = self.revision  # same content, so cached statistics still apply
        return copy

    # ------------------------------------------------------------------ mutating
    def _changed(self) -> None:
        self._stale_code = True
        self._module = None
        self.revision = next(_revisions)

    def forget_pending_symbols(self) -> None:
        """Drop data-dependent sizes an earlier trace left pending in the shape environment this graph shares
        with every graph made from the same capture: a re-trace (an export) would otherwise look for them in
        its own outputs and fail (seen exporting one pass's graph after another's from one capture)."""
        mode = self._fake_mode()
        if mode is not None and mode.shape_env is not None:
            mode.shape_env.pending_fresh_unbacked_symbols.clear()

    def _fake_mode(self):
        vals = [n.meta["val"] for n in self.fx.nodes if n.op == "placeholder" and "val" in n.meta]
        return detect_fake_mode(vals)

    def _fake(self, value: torch.Tensor):
        """A placeholder's fake value for ``value`` (a lazy stand-in's: on the CPU, like the captured ones)."""
        mode = self._fake_mode()
        if is_lazy(value):
            with mode:
                return torch.empty(value.shape, dtype=value.dtype)
        return mode.from_tensor(value, static_shapes=True)

    def add_parameter(self, name: str, value: torch.Tensor) -> fx.Node:
        """A new trainable parameter ``name`` (a state_dict key, e.g. 'layers.0.mlp.up_proj.0.weight')."""
        if name in self.tensors():
            raise ValueError(f"the graph already has a tensor named {name!r}")
        specs = self._program.graph_signature.input_specs
        placeholders = [n for n in self.fx.nodes if n.op == "placeholder"]
        last_param = max((i for i, s in enumerate(specs) if s.kind == InputKind.PARAMETER), default=-1)
        anchor = placeholders[last_param + 1] if last_param + 1 < len(placeholders) else None
        node_name = "p_" + name.replace(".", "_")
        if anchor is None:
            with self.fx.inserting_after(placeholders[-1] if placeholders else None):
                node = self.fx.placeholder(node_name)
        else:
            with self.fx.inserting_before(anchor):
                node = self.fx.placeholder(node_name)
        if not is_lazy(value):
            value = torch.nn.Parameter(value.detach(), requires_grad=value.requires_grad or value.is_floating_point())
        node.meta["val"] = self._fake(value)
        specs.insert(last_param + 1, InputSpec(InputKind.PARAMETER, TensorArgument(node.name), target=name))
        self._program.state_dict[name] = self._kept(value)
        self._changed()
        return node

    def add_buffer(self, name: str, value: torch.Tensor) -> fx.Node:
        """A new persistent, non-trainable tensor ``name`` (e.g. an index table a rewrite needs)."""
        if name in self.tensors():
            raise ValueError(f"the graph already has a tensor named {name!r}")
        specs = self._program.graph_signature.input_specs
        placeholders = [n for n in self.fx.nodes if n.op == "placeholder"]
        last = max((i for i, s in enumerate(specs) if s.kind in (InputKind.PARAMETER, InputKind.BUFFER)), default=-1)
        with self.fx.inserting_before(placeholders[last + 1]):
            node = self.fx.placeholder("b_" + name.replace(".", "_"))
        node.meta["val"] = self._fake(value)
        specs.insert(last + 1, InputSpec(InputKind.BUFFER, TensorArgument(node.name), target=name, persistent=True))
        self._program.state_dict[name] = self._kept(value)
        self._changed()
        return node

    # ------------------------------------------------------------------ the decode cache
    def step_input(self, name: str) -> fx.Node:
        """The placeholder of a decode step's ``input_ids``, ``attention_mask`` or ``position_ids``."""
        return self.user_inputs()[STEP_INPUTS.index(name)]

    def cache_input(self, name: str) -> fx.Node:
        """The placeholder of cache entry ``name`` (decode graphs)."""
        return self.user_inputs()[len(STEP_INPUTS) + self._cache_layout().index(name)]

    def cache_output(self, name: str) -> fx.Node:
        return self.user_outputs()[1 + self._cache_layout().index(name)]

    def cache_entry_of(self, node: fx.Node) -> CacheEntry | None:
        """The cache entry a placeholder node feeds, if it is one."""
        if self.cache is None or node.op != "placeholder":
            return None
        inputs = self.user_inputs()
        first = len(STEP_INPUTS)
        return self.cache.entries[inputs.index(node) - first] if node in inputs[first:] else None

    def cache_append(self, name: str) -> tuple[fx.Node, fx.Node]:
        """(the node that grows cache entry ``name``, the value it appends): its output is
        ``cat([past, new], seq_axis)``, ``past`` the entry's input (seen through
        concatenation with an empty tensor, as transformers' DynamicCache starts a layer)."""
        entry = self._cache_layout().entries[self._cache_layout().index(name)]
        grown = self.cache_output(name)
        if grown.op == "call_function" and grown.target is aten.cat.default and len(grown.args[0]) == 2:
            past, new = grown.args[0]
            axis = grown.args[1] if len(grown.args) > 1 else 0
            rank = grown.meta["val"].dim()
            if axis % rank == entry.seq_axis and self.cache_source(past) is not None:
                return grown, new
        raise ValueError(f"cache entry {name}: its output is not cat([past, new]) on its sequence axis")

    def cache_source(self, node) -> CacheEntry | None:
        """The cache entry whose input ``node`` is, looking through concatenation with an empty tensor."""
        if not isinstance(node, fx.Node):
            return None
        if node.op == "placeholder":
            return self.cache_entry_of(node)
        if node.op == "call_function" and node.target is aten.cat.default and len(node.args[0]) == 2:
            empty = [a for a in node.args[0] if _is_empty(a)]
            rest = [a for a in node.args[0] if a not in empty]
            if len(empty) == 1 and len(rest) == 1:
                return self.cache_source(rest[0])
        return None

    def replace_cache_entries(
        self,
        old: Sequence[str],
        new: Sequence[CacheEntry],
        build: Callable[[list[fx.Node]], list[fx.Node]],
        same_length: bool = True,
        past_length: Callable[[SubgraphBuilder, list[fx.Node]], fx.Node] | None = None,
    ) -> None:
        """Replace cache entries ``old`` by ``new``, in place in the layout (inputs and outputs alike).

        ``build(placeholders)`` gets the new cache inputs and returns the new cache outputs
        (rewiring whatever read the old ones). Shape reads of the old inputs (``sym_size``)
        are redirected to the first new input: batch and length carry over, fixed axes
        become constants. Nothing else may read an old input or output once ``build`` returns.
        With ``same_length`` false the new inputs get lengths of their own (a quantized
        cache's codes, scales and residual window all differ in length), and
        ``past_length(builder, inputs)`` says how many past tokens they hold together.
        The layout still relates them: entries that are not bounded windows hold the same
        tokens, so they share one symbol, each scaled by how many of its slots one slot of
        the coarsest covers (codes ``32 * n``, their scales ``n``); a window has a symbol
        of its own. Entries like ones an earlier call made (same kinds, slots and windows: the
        same rewrite of another layer) reuse that call's symbols, as they hold as many tokens.
        Downstream shape reasoning (a reshape into groups; TVM, torch-mlir) then sees that
        codes and scales agree, and that every layer's attention spans one length.
        """
        layout = self._cache_layout()
        old = sorted(old, key=layout.index)
        first = layout.index(old[0])
        old_inputs = [self.cache_input(name) for name in old]
        sample = old_inputs[0].meta["val"]
        old_entry = layout.entries[first]
        batch, length = sample.shape[0], sample.shape[old_entry.seq_axis]
        placeholders = []
        coarsest = max(e.tokens_per_slot for e in new)
        shared = None  # the slots of the coarsest unbounded entry
        like = None if same_length else self._lengths_like(new, set(old))
        for i, entry in enumerate(new):
            with self.fx.inserting_before(old_inputs[0]):
                node = self.fx.placeholder(_fresh_name(self.fx, "cache_" + entry.name.replace(".", "_")))
            shape = [batch if d is None else d for d in entry.shape]
            scale = coarsest // entry.tokens_per_slot
            if same_length:
                shape[entry.seq_axis] = length
            elif like is not None:
                shape[entry.seq_axis] = like[i]
            elif entry.max_len is not None:
                shape[entry.seq_axis] = self._new_length(node.name)
            else:
                shared = shared if shared is not None else self._new_length(node.name)
                shape[entry.seq_axis] = shared * scale
            with self._fake_mode():
                node.meta["val"] = torch.empty(shape, dtype=getattr(torch, entry.dtype))
            placeholders.append(node)
        outputs = build(placeholders)

        out_positions = {1 + layout.index(name) for name in old}
        user_outs = [o for i, o in enumerate(self.user_outputs()) if i not in out_positions]
        user_outs[1 + first : 1 + first] = outputs
        self._set_user_outputs(user_outs)
        kept = [e for e in layout.entries if e.name not in old]
        self.cache = layout.with_entries(kept[:first] + list(new) + kept[first:])

        top = SubgraphBuilder(self, "", placeholders[0])
        with self.fx.inserting_before(next(n for n in self.fx.nodes if n.op != "placeholder")):
            sizes = {0: top.call(aten.sym_size.int, placeholders[0], 0)}
            if past_length is None:
                sizes[old_entry.seq_axis] = top.call(aten.sym_size.int, placeholders[0], new[0].seq_axis)
            else:
                sizes[old_entry.seq_axis] = past_length(top, placeholders)
        self._restate_length(length, sizes[old_entry.seq_axis].meta["val"], keep=placeholders)
        for old_node in old_inputs:
            for user in list(old_node.users):
                if user.op == "call_function" and user.target is aten.sym_size.int:
                    dim = user.args[1] % sample.dim()
                    user.replace_all_uses_with(sizes[dim] if dim in sizes else int(sample.shape[dim]))
                    self.fx.erase_node(user)
        self.eliminate_dead_code()
        for old_node in old_inputs:
            if old_node.users:
                raise ValueError(f"cache input {old_node.name} is still read by {[u.name for u in old_node.users]}")

        specs = self._program.graph_signature.input_specs
        old_names = {n.name for n in old_inputs}
        specs[:] = [s for s in specs if s.arg.name not in old_names]
        for node in old_inputs:
            self.fx.erase_node(node)
        user_positions = [i for i, s in enumerate(specs) if s.kind == InputKind.USER_INPUT]
        at = len(STEP_INPUTS) + first
        anchor = user_positions[at] if at < len(user_positions) else len(specs)
        specs[anchor:anchor] = [
            InputSpec(InputKind.USER_INPUT, TensorArgument(n.name), target=None) for n in placeholders
        ]
        self._sync_call_signature()
        # Export's shape guards address cache inputs by position, which just changed; the
        # relations they state (shared batch and length) live on in the placeholders' symbols.
        self._program._guards_code = [g for g in self._program._guards_code if "L['cache']" not in g]
        self._changed()

    def eliminate_dead_code(self) -> None:
        """Drop nodes nothing reads. Seeded-random ops count as pure here: SDPA (dropout 0 at
        inference) would otherwise keep a whole replaced attention alive; and export's dtype
        assertions on values nothing else reads go too (they would keep a replaced mask alive)."""
        live: set[fx.Node] = set()
        for node in reversed(self.fx.nodes):
            if any(
                u.op == "output" or (u.target is not ASSERT and (u in live or u.is_impure(impure_random=False)))
                for u in node.users
            ):
                live.add(node)
        for check in [n for n in self.fx.nodes if n.target is ASSERT and n.args[0] not in live]:
            self.fx.erase_node(check)
        self.fx.eliminate_dead_code(is_impure_node=lambda n: n.is_impure(impure_random=False))
        self._changed()

    def _lengths_like(self, new: Sequence[CacheEntry], old: set[str]) -> list | None:
        """The sequence lengths of existing cache inputs like ``new`` (entry by entry: same kind, shape, slots
        and window), or None if some entry has no such twin."""
        twins = []
        for entry in new:
            twin = next(
                (
                    e
                    for e in self.cache
                    if e.name not in old
                    and (e.kind, e.shape, e.tokens_per_slot, e.max_len)
                    == (entry.kind, entry.shape, entry.tokens_per_slot, entry.max_len)
                ),
                None,
            )
            if twin is None:
                return None
            twins.append(self.cache_input(twin.name).meta["val"].shape[twin.seq_axis])
        return twins

    def _restate_length(self, old, new, keep: list[fx.Node]) -> None:
        """Restate the other inputs' shapes (the attention mask's past + new tokens, the cache entries not
        replaced yet) with the new entries' past length: every entry holds the same tokens, and fake-tensor
        retracing (ONNX, TVM) must see one length where the graph relates them."""
        if not isinstance(old, torch.SymInt) or not isinstance(new, torch.SymInt) or old.node.expr == new.node.expr:
            return
        shape_env = self._fake_mode().shape_env
        before, after = old.node.expr, new.node.expr
        for node in self.user_inputs():
            val = node.meta.get("val")
            if node in keep or not isinstance(val, torch.Tensor):
                continue
            dims = [d.node.expr.subs(before, after) if isinstance(d, torch.SymInt) else d for d in val.shape]
            if all(not isinstance(d, torch.SymInt) or d.node.expr == e for d, e in zip(val.shape, dims)):
                continue
            shape = [
                shape_env.create_symintnode(e, hint=int(shape_env.size_hint(e))) if isinstance(d, torch.SymInt) else d
                for d, e in zip(val.shape, dims)
            ]
            with self._fake_mode():
                node.meta["val"] = torch.empty(shape, dtype=val.dtype)

    def _new_length(self, name: str) -> torch.SymInt:
        """A fresh symbolic size >= 0 for a new input's sequence axis."""
        from torch._dynamo.source import ConstantSource
        from torch.fx.experimental.symbolic_shapes import DimDynamic
        from torch.utils._sympy.numbers import int_oo
        from torch.utils._sympy.value_ranges import ValueRanges

        shape_env = self._fake_mode().shape_env
        source = ConstantSource(f"{name}_length")
        symbol = shape_env.create_symbol(3, source, dynamic_dim=DimDynamic.DYNAMIC, positive=None)
        self._program.range_constraints[symbol] = ValueRanges(0, int_oo)
        return shape_env.create_symintnode(symbol, hint=3, source=source)

    def _cache_layout(self) -> CacheLayout:
        if self.cache is None:
            raise ValueError("not a decode graph: it has no cache inputs/outputs")
        return self.cache

    def user_inputs(self) -> list[fx.Node]:
        by_name = {n.name: n for n in self.fx.nodes if n.op == "placeholder"}
        specs = self._program.graph_signature.input_specs
        return [by_name[s.arg.name] for s in specs if s.kind == InputKind.USER_INPUT]

    def _output_node(self) -> fx.Node:
        return next(n for n in reversed(self.fx.nodes) if n.op == "output")

    def user_outputs(self) -> list[fx.Node]:
        specs = self._program.graph_signature.output_specs
        flat = list(self._output_node().args[0])
        return [value for value, spec in zip(flat, specs) if spec.kind == OutputKind.USER_OUTPUT]

    def _set_user_outputs(self, values: list[fx.Node]) -> None:
        specs = self._program.graph_signature.output_specs
        others = [(v, s) for v, s in zip(self._output_node().args[0], specs) if s.kind != OutputKind.USER_OUTPUT]
        self._output_node().args = (tuple([v for v, _ in others] + values),)
        specs[:] = [s for _, s in others] + [
            OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(v.name), target=None) for v in values
        ]

    def _sync_call_signature(self) -> None:
        """The pytree specs of a decode step: ((input_ids, attention_mask, position_ids, [cache...]), {}) ->
        (logits, [cache...])."""
        n = len(self._cache_layout())
        entries = self._program._module_call_graph
        signature = dataclasses.replace(
            entries[0].signature,
            in_spec=pytree.tree_flatten(((*[0] * len(STEP_INPUTS), [0] * n), {}))[1],
            out_spec=pytree.tree_flatten((0, [0] * n))[1],
        )
        entries[0] = dataclasses.replace(entries[0], signature=signature)  # a new entry: clones share the old one

    def set_weight(self, name: str, value: torch.Tensor) -> None:
        """Rebind a stored tensor to a new value of the same shape and dtype."""
        old = self.stored(name)
        if old.shape != value.shape or old.dtype != value.dtype:
            raise ValueError(f"{name}: new value {tuple(value.shape)}/{value.dtype} != {tuple(old.shape)}/{old.dtype}")
        self._rebind(name, old, value)

    def replace_tensor(self, name: str, value: torch.Tensor) -> None:
        """Rebind a stored tensor to a value of any shape; its placeholder's fake value follows."""
        old = self.stored(name)
        placeholder = next(n for n in self.fx.nodes if n.op == "placeholder" and self.tensor_name(n) == name)
        placeholder.meta["val"] = self._fake(value)
        self._rebind(name, old, value)

    def _rebind(self, name: str, old: torch.Tensor, value: torch.Tensor) -> None:
        """Store ``value`` under ``name``, a parameter again if ``old`` was one (same requires_grad)."""
        self._store_of(name)[name] = self._kept(
            torch.nn.Parameter(value.detach(), old.requires_grad) if isinstance(old, torch.nn.Parameter) else value
        )
        self._changed()

    def _kept(self, value: torch.Tensor) -> torch.Tensor:
        """What the graph stores for a new tensor: itself, or while streaming, its stand-in once written to disk."""
        return value if self.spill is None or is_lazy(value) else self.spill.put(value)

    def replace_linear(self, linear: Linear, build: Callable[[SubgraphBuilder, fx.Node], fx.Node]) -> fx.Node:
        """Replace one linear by the subgraph ``build(builder, x)`` returns; drop weights left unused."""
        node = linear.node
        builder = SubgraphBuilder(self, linear.path, node)
        with self.fx.inserting_before(node):
            out = build(builder, node.args[0])
        old_val, new_val = node.meta["val"], out.meta["val"]
        if old_val.shape != new_val.shape or old_val.dtype != new_val.dtype:
            raise ValueError(f"replacement for {linear.path} changes its output {old_val.shape} -> {new_val.shape}")
        self.substitute(node, out)
        self.remove_unused_tensors()
        return out

    def substitute(self, node: fx.Node, out: fx.Node) -> None:
        """Let ``out`` stand for ``node`` everywhere, graph outputs included, and erase ``node``."""
        node.replace_all_uses_with(out)
        self._rename_outputs(node.name, out.name)
        self.fx.erase_node(node)
        self._changed()

    def substitute_output(self, node: fx.Node, out: fx.Node) -> None:
        """Let ``out`` stand for ``node`` as a graph output; ``node``'s other readers keep reading it."""
        node.replace_all_uses_with(out, delete_user_cb=lambda user: user.op == "output")
        self._rename_outputs(node.name, out.name)
        self._changed()

    def _rename_outputs(self, old: str, new: str) -> None:
        """Keep the output signature naming the node that now produces a graph output."""
        specs = self._program.graph_signature.output_specs
        specs[:] = [
            dataclasses.replace(s, arg=dataclasses.replace(s.arg, name=new))
            if getattr(s.arg, "name", None) == old
            else s
            for s in specs
        ]

    def replace_input(
        self, node: fx.Node, index: int, path: str, build: Callable[[SubgraphBuilder], fx.Node]
    ) -> fx.Node:
        """Make ``node`` read its ``index``-th argument from the subgraph ``build(builder)`` returns.

        For formats that nest (the kept values of an N:M weight, themselves palettized).
        Tensors left unused are dropped.
        """
        builder = SubgraphBuilder(self, path, node)
        with self.fx.inserting_before(node):
            new = build(builder)
        old_val, new_val = node.args[index].meta["val"], new.meta["val"]
        if old_val.shape != new_val.shape or old_val.dtype != new_val.dtype:
            raise ValueError(
                f"replacement for argument {index} of {node.name} changes it {old_val.shape} -> {new_val.shape}"
            )
        node.update_arg(index, new)
        self.remove_unused_tensors()
        return new

    def remove_unused_tensors(self) -> list[str]:
        """Drop stored tensors no node reads any more (so bytes shrink when a pass replaces a weight)."""
        removed = []
        specs = self._program.graph_signature.input_specs
        for node in [n for n in self.fx.nodes if n.op == "placeholder" and not n.users]:
            name = self.tensor_name(node)
            if name is None:
                continue
            specs[:] = [s for s in specs if s.arg.name != node.name]
            self._program.state_dict.pop(name, None)
            self._program.constants.pop(name, None)
            self.fx.erase_node(node)
            removed.append(name)
        self._changed()
        return removed


def _is_empty(node) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.numel() == 0


def _fresh_name(graph: fx.Graph, base: str) -> str:
    taken = {n.name for n in graph.nodes}
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def _renamed(spec, renamed: dict[str, str]):
    """A signature spec pointing at the copied node (FX may rename a node on copy, e.g. 'input')."""
    name = getattr(spec.arg, "name", None)
    if name not in renamed:
        return spec
    return dataclasses.replace(spec, arg=dataclasses.replace(spec.arg, name=renamed[name]))


class _TapInterpreter(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, taps: dict[str, Callable[[Any], None]]):
        super().__init__(module)
        self.taps = taps

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        if node.name in self.taps:
            self.taps[node.name](value)
        return value


class _PartialInterpreter(fx.Interpreter):
    """Runs only the ``needed`` nodes, storing their values."""

    def __init__(self, module: fx.GraphModule, needed: set[fx.Node], values: dict[fx.Node, Any]):
        super().__init__(module)
        self.needed, self.values = needed, values

    def run_node(self, node: fx.Node) -> Any:
        if node.op == "output" or (node.op != "placeholder" and node not in self.needed):
            return None
        value = self.values[node] = super().run_node(node)
        return value


class SubgraphBuilder:
    """Builds replacement nodes in the graph, each with fake-tensor metadata and a module path.

    Paths of new modules extend the replaced module's path (``up_proj`` -> ``up_proj.0``),
    as if the linear had become an ``nn.Sequential``; later passes select them like any module.
    """

    def __init__(self, graph: Graph, path: str, origin: fx.Node):
        self.graph, self.path, self.origin = graph, path, origin
        self._fake_mode = graph._fake_mode()

    def parameter(self, suffix: str, value: torch.Tensor) -> fx.Node:
        """A new parameter stored as '<path>.<suffix>' (e.g. '0.weight')."""
        return self.graph.add_parameter(f"{self.path}.{suffix}" if self.path else suffix, value)

    def call(self, op, *args, module: str | None = None, meta_val: Callable | None = None, **kwargs) -> fx.Node:
        """Insert ``op(*args, **kwargs)``; ``module`` is a sub-path for nn_module_stack. ``meta_val``: computes the
        node's value instead of the op on the fake arguments, where the rewrite knows it and the fake kernel
        could not check it (two lengths the graph keeps equal under different symbols)."""
        node = self.graph.fx.call_function(op, tuple(args), kwargs)
        fake_args = fx.map_arg((args, kwargs), self._value)
        # Size-oblivious, as at capture: otherwise a size-1 example dimension would be
        # guarded (Eq(s0, 1)) here and specialised by the next re-trace (e.g. ONNX export).
        # Sizes read from data at run time (``item``) get fresh unbacked symbols here; they are
        # not left pending, or the next re-trace (ONNX export) would expect to find them.
        shape_env = self._fake_mode.shape_env
        with self._fake_mode, fx_config.patch(backed_size_oblivious=True), shape_env.ignore_fresh_unbacked_symbols():
            node.meta["val"] = meta_val() if meta_val is not None else op(*fake_args[0], **fake_args[1])
        stack = dict(self.origin.meta.get("nn_module_stack", {}))
        if module is not None:
            full = f"{self.path}.{module}" if self.path else module
            stack[f"graphpress.{full}"] = (full, "torch.nn.modules.linear.Linear")
        node.meta["nn_module_stack"] = stack
        for key in ("stack_trace", "source_fn_stack", "torch_fn"):
            if key in self.origin.meta:
                node.meta[key] = self.origin.meta[key]
        return node

    def size(self, x: fx.Node, dim: int) -> fx.Node | int:
        """A dimension for a view: the int when it is static (as export writes it), else its sym_size node."""
        size = x.meta["val"].shape[dim]
        return size if isinstance(size, int) else self.call(aten.sym_size.int, x, dim)

    def _value(self, node: fx.Node):
        """What op calls see for ``node`` at build time: its fake value, or the submodule a get_attr names."""
        if node.op == "get_attr":
            return getattr(self.graph._program.graph_module, node.target)
        return node.meta["val"]

    def linear(self, x: fx.Node, module: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> fx.Node:
        """A new linear module '<path>.<module>' with its own weight (and bias)."""
        w = self.parameter(f"{module}.weight", weight)
        args: Iterable[Any] = (x, w) if bias is None else (x, w, self.parameter(f"{module}.bias", bias))
        return self.call(aten.linear.default, *args, module=module)
