"""Pass infrastructure: a pass is a small class with a Config, requires/ensures and apply.

Passes are *functional* from the outside: :meth:`Pass.run` hands ``apply`` a private
clone of the graph, so the caller's graph (and the user's model behind it) never
changes. ``apply`` mutates that clone freely and returns its report.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from ..errors import PassPreconditionError
from ..ir import AttentionBlock, Graph, Linear, StoredLinear, matches
from ..ir.blocks import split_heads
from ..schema import PassConfig
from .context import PassContext


@dataclass
class LayerReport:
    """What a pass did to one layer (module path)."""

    path: str
    action: str
    params_before: int
    params_after: int
    details: dict[str, Any] = field(default_factory=dict)
    bytes_before: int | None = None
    bytes_after: int | None = None
    """Stored bytes of the tensors under ``path``; None where another layer of the same report lies
    under it (a block whose linears are reported too) or it owns no tensors (a cache entry)."""


@dataclass
class PassReport:
    name: str
    config: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    verification: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    children: list[PassReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PassResult:
    graph: Graph
    report: PassReport
    modified: bool


def bytes_under(graph: Graph, paths: list[str]) -> list[int]:
    """Bytes of the stored tensors named ``path`` or ``path.*``, per path."""
    sizes = {name: t.numel() * t.element_size() for name, t in graph.tensors().items()}
    return [sum(n for name, n in sizes.items() if name == path or name.startswith(path + ".")) for path in paths]


class Pass(ABC):
    """A graph rewrite. Subclasses set ``name`` and ``Config`` and implement ``apply``.

    ``after`` states ordering as data: the names of passes that, when they appear in
    the same pipeline, must run before this one.
    """

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]]
    after: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: PassConfig):
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} takes a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        """Raise PassPreconditionError if the graph is not one this pass can rewrite."""

    def ensures(self, graph: Graph, ctx: PassContext) -> None:
        """Raise PassPostconditionError if the rewritten graph breaks a promise of this pass."""

    @abstractmethod
    def apply(self, graph: Graph, ctx: PassContext) -> PassReport:
        """Rewrite ``graph`` (a private copy) in place; return what changed."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        self.requires(graph, ctx)
        work = graph.clone()
        before = graph.summary()
        start = time.perf_counter()
        report = self.apply(work, ctx)
        report.seconds = time.perf_counter() - start
        self.ensures(work, ctx)
        after = work.summary()
        report.params_before, report.params_after = before.params, after.params
        report.bytes_before, report.bytes_after = before.bytes, after.bytes
        paths = [layer.path for layer in report.layers]
        leaves = [not any(other.startswith(path + ".") for other in paths) for path in paths]
        for layer, leaf, old, new in zip(report.layers, leaves, bytes_under(graph, paths), bytes_under(work, paths)):
            if leaf and (old or new):
                layer.bytes_before, layer.bytes_after = old, new
        modified = any(layer.action != "skipped" for layer in report.layers)
        return PassResult(work if modified else graph, report, modified)

    # helpers shared by passes that select linears
    accepts_stored: ClassVar[tuple[str, ...]] = ()
    """Compressed weight formats (op names) this pass can rewrite further; others are refused."""

    def selected_linears(self, graph: Graph, ctx: PassContext) -> list[Linear]:
        return graph.linears(self.config.targets, self.config.exclude)

    def selected_stored(self, graph: Graph, ctx: PassContext) -> list[StoredLinear]:
        stored = graph.stored_linears(self.config.targets, self.config.exclude)
        return [lin for lin in stored if lin.format in self.accepts_stored]

    def require_linears(self, graph: Graph, ctx: PassContext) -> None:
        stored = graph.stored_linears(self.config.targets, self.config.exclude)
        refused = [lin for lin in stored if lin.format not in self.accepts_stored]
        if refused:
            shown = ", ".join(f"{lin.path} ({lin.format})" for lin in refused[:4]) + (
                ", ..." if len(refused) > 4 else ""
            )
            raise PassPreconditionError(
                f"{ctx.spec_path}.targets: {self.name} needs dense weights, but these already store theirs compressed: "
                f"{shown}; run {self.name} before the pass that compressed them, or exclude them"
            )
        if self.selected_linears(graph, ctx) or stored:
            return
        available = sorted({lin.path for lin in graph.linears()})
        shown = ", ".join(available[:8]) + (", ..." if len(available) > 8 else "")
        raise PassPreconditionError(
            f"{ctx.spec_path}.targets: {self.config.targets!r} (exclude {self.config.exclude!r}) matches no "
            f"linear layer; linear layers in this graph: {shown or 'none'}"
        )

    def selected_attention(self, graph: Graph, ctx: PassContext, field: str = "targets") -> list[AttentionBlock]:
        """Attention blocks whose path matches config field ``field`` (and not ``exclude``); an error names it if none."""
        targets, exclude = getattr(self.config, field), self.config.exclude
        blocks = [b for b in graph.attention_blocks(targets) if not (exclude and matches(b.path, exclude))]
        if not blocks:
            found = ", ".join(b.path for b in graph.attention_blocks())
            raise PassPreconditionError(
                f"{ctx.spec_path}.{field}: {targets!r} matches no attention block; attention blocks recognised in "
                f"this graph: {found or 'none (no scaled_dot_product_attention fed by q/k/v linears)'}"
            )
        return blocks

    @staticmethod
    def store_weight_as(graph: Graph, lin: Linear, op, tensors: dict, *args) -> None:
        """Make ``lin`` read its weight from ``op(*stored tensors, *args)``; the dense weight is dropped."""
        import torch

        def build(b, x):
            weight = stored_call(graph, b, lin.path, op, tensors, *args)
            bias = lin.node.args[2] if len(lin.node.args) > 2 else None
            return b.call(torch.ops.aten.linear.default, x, weight, *([bias] if bias is not None else []))

        graph.replace_linear(lin, build)

    @staticmethod
    def data_free(report: PassReport, lin, reached: bool, instead: str, signal: str = "input") -> bool:
        """True (and a warning naming ``lin``) when no calibration ``signal`` reached it: use ``instead``.

        A data-aware criterion has nothing to weigh there (a zero X^T X would whiten by zero,
        score every weight 0, refit every weight to 0), so the data-free form is used.
        """
        if reached:
            return False
        report.warnings.append(
            f"{lin.path}: no calibration {signal} reached it (an expert no calibration token was routed to?), "
            f"so {instead}; add calibration data that reaches it"
        )
        return True

    def new_report(self) -> PassReport:
        return PassReport(self.name, self.config.model_dump(mode="json", by_alias=True))


def stored_call(graph: Graph, b, path: str, op, tensors: dict, *args):
    """``op(*tensors, *args)`` with the tensors stored as buffers '<path>.<name>': a compressed format's storage."""
    stored = [graph.add_buffer(f"{path}.{name}", value) for name, value in tensors.items()]
    return b.call(op, *stored, *args)


def split_qkv_heads(block: AttentionBlock, where: str) -> tuple:
    """The (B, heads, S, head_dim) q, k, v nodes of a block; an error if its heads are not contiguous rows."""
    heads = [
        split_heads(lin.node, n, block.head_dim)
        for lin, n in (
            (block.q_proj, block.num_heads),
            (block.k_proj, block.num_kv_heads),
            (block.v_proj, block.num_kv_heads),
        )
    ]
    if any(h is None for h in heads):
        raise PassPreconditionError(
            f"{where}: q/k/v are not split into heads as view(B, S, heads, head_dim).transpose(1, 2)"
        )
    return tuple(heads)
