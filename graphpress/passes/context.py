"""What every pass can read: calibration inputs, the seed, and statistics collected on demand.

Statistics are collected in one sweep over the calibration data per request and
cached by (graph revision, node), so passes that ask again, or ask for linears that
share an input (q/k/v, gate/up), pay nothing more.

A *lazy* graph (a checkpoint opened without reading its weights) is calibrated by a
:class:`~graphpress.ir.stream.Sweep`: all calibration inputs in lockstep, each weight read
once. :meth:`PassContext.linear_input_groups` then hands a pass one input's statistics at a
time, as the sweep reaches it, and forgets them when the pass moves on: a pass that works
group by group holds one layer's statistics, not the model's.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import PassPreconditionError
from ..execution import InProcess, RayEngine
from ..ir import Graph, Linear
from ..ir.stream import Sweep, give_back_freed_memory
from ..metrics import logits_of
from ..progress import track


def run_calibration_sample(graph: Graph, args: tuple, taps: dict | None = None):
    """Run ``graph`` on one calibration sample: its outputs (forward graphs) or its logits (decode graphs).

    A decode graph is fed the sample's input ids one token per step (teacher forcing), so
    statistics cover every position and the cache a pass rewrote is the one it reads back.
    """
    if graph.cache is not None:
        from ..runtime import TorchDecoder, teacher_forced_logits

        return teacher_forced_logits(TorchDecoder(graph, taps), args[0])
    if taps is not None:
        return graph.run_with_taps(args, taps)
    return graph.module()(*args)


@dataclass(frozen=True)
class LinearInputs:
    """A linear's input on the calibration data.

    ``gram`` is X^T X over *all* calibration rows (in x in, float32): what activation-aware
    factorizations need. ``rows`` is a seeded sample of at most ``max_rows`` rows of X,
    enough to measure output error. ``total`` (sum of all rows) and ``count`` complete the
    second moments of the affine input [x; 1], for maps with a bias.
    """

    rows: torch.Tensor
    gram: torch.Tensor
    total: torch.Tensor | None = None
    count: int = 0

    @property
    def reached(self) -> bool:
        """Whether any calibration signal reached the linear (an expert no token was routed to: none)."""
        return bool(self.gram.diagonal().any())

    def affine_gram(self) -> torch.Tensor:
        """Second moments of [x; 1] (float64): [[X^T X, X^T 1], [1^T X, n]]."""
        gram, total = self.gram.double(), self.total.double()
        top = torch.cat([gram, total[:, None]], 1)
        return torch.cat([top, torch.cat([total, torch.tensor([float(self.count)], dtype=torch.float64)])[None]])


def calibration_rows(args: tuple) -> int:
    """Token rows one calibration sample feeds each linear: B x S for ids (B, S) or activations (B, S, D)."""
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if first is None or first.dim() == 0:
        return 1
    return first.numel() if not first.is_floating_point() else first.numel() // first.shape[-1]


def available_memory() -> int | None:
    """Bytes of memory available to this process now (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def by_input(graph: Graph, linears: Sequence[Linear]) -> list[list[Linear]]:
    """The linears grouped by the value they read (q/k/v, gate/up), groups and members in graph order."""
    order = {node: i for i, node in enumerate(graph.fx.nodes)}
    groups: dict[object, list[Linear]] = {}
    for lin in sorted(linears, key=lambda lin: (order[lin.node.args[0]], order[lin.node])):
        groups.setdefault(lin.node.args[0], []).append(lin)
    return list(groups.values())


class _InputCollector:
    """Taps that gather the rows and X^T X of each named value, one calibration input after another."""

    def __init__(self, producers: set[str]):
        self.rows: dict[str, list[torch.Tensor]] = {p: [] for p in producers}
        self.grams: dict[str, torch.Tensor] = {}
        self.taps = {p: self._tap(p) for p in producers}

    def _tap(self, producer: str):
        def record(value):
            x = value.detach().reshape(-1, value.shape[-1]).float()
            self.rows[producer].append(x)
            self.grams[producer] = self.grams[producer] + x.T @ x if producer in self.grams else x.T @ x

        return record

    def inputs(self, producer: str, seed: int, max_rows: int, name: str | None = None) -> LinearInputs:
        """The gathered statistics (then forgotten here); at most ``max_rows`` rows, drawn with a generator
        seeded by ``seed`` and the value's ``name``, so the same rows are drawn however the graph was run."""
        x = torch.cat(self.rows.pop(producer))
        total, count = x.double().sum(0), len(x)
        if len(x) > max_rows:
            gen = torch.Generator().manual_seed(layer_seed(seed, name or producer))
            x = x[torch.randperm(len(x), generator=gen)[:max_rows].sort().values]
        return LinearInputs(x, self.grams.pop(producer), total, count)


def layer_seed(seed: int, name: str) -> int:
    """A seed for one layer's random choices, from the run's seed and the layer's name: the same whatever the
    order layers are visited in or the process that draws."""
    return seed * 1_000_003 + zlib.crc32(name.encode())


@dataclass
class PassContext:
    """Shared by all passes of one run. ``calibration_inputs`` are positional-argument tuples."""

    calibration_inputs: list[tuple]
    seed: int = 0
    max_rows: int = 2048
    spec_path: str = "passes"
    engine: InProcess | RayEngine = field(default_factory=InProcess)
    """Where passes' per-layer jobs run (``execution.engine``)."""
    reference: Graph | None = None
    """The original graph, before any pass (a teacher for passes that train against it)."""
    tokenize: Callable[[str], list[int]] | None = None
    """The model's tokenizer, for a pass that reads text of its own (distill's ``data.text``)."""
    _inputs: dict[tuple[int, str], LinearInputs] = field(default_factory=dict, repr=False)
    _grad_squares: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict, repr=False)
    _means: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict, repr=False)

    def linear_inputs(self, graph: Graph, linears: Sequence[Linear]) -> dict[str, LinearInputs]:
        """Inputs of each linear (keyed by the linear's node name) on the calibration data."""
        producers = {lin.node.name: lin.node.args[0].name for lin in linears}
        missing = {p for p in producers.values() if (graph.revision, p) not in self._inputs}
        if missing:
            widths = {lin.node.args[0].name: int(lin.node.args[0].meta["val"].shape[-1]) for lin in linears}
            self._check_memory([widths[p] for p in missing], "linear inputs")
            collector = _InputCollector(missing)
            if graph.lazy:
                Sweep(graph, self.calibration_inputs, collector.taps).finish()
            else:
                for args in track(self.calibration_inputs, f"{self.spec_path}: calibrating linear inputs"):
                    run_calibration_sample(graph, args, collector.taps)
            for producer in sorted(missing):
                self._inputs[(graph.revision, producer)] = collector.inputs(producer, self.seed, self.max_rows)
        return {name: self._inputs[(graph.revision, p)] for name, p in producers.items()}

    def linear_input_groups(
        self, graph: Graph, linears: Sequence[Linear], what: str
    ) -> Iterator[tuple[list[Linear], dict[str, LinearInputs]]]:
        """The linears grouped by the value they read (q/k/v, gate/up), in graph order, each group with its inputs.

        In memory, all groups' inputs come from one sweep (and stay cached). On a lazy graph, each
        group's come from a sweep of the graph as it was when asked, paused where the group's input
        has been computed for every calibration input, and are dropped when the next group is asked
        for: the caller may rewrite the graph between groups. ``what`` names the work in the progress bar.
        """
        groups = by_input(graph, linears)
        if not graph.lazy:
            inputs = self.linear_inputs(graph, linears)
            for group in track(groups, f"{self.spec_path} {what}"):
                yield group, {lin.node.name: inputs[lin.node.name] for lin in group}
            return
        snapshot = graph.clone()  # node for node the same graph: the sweep reads it while the caller rewrites
        same = dict(zip(graph.fx.nodes, snapshot.fx.nodes))
        collector = _InputCollector({same[group[0].node.args[0]].name for group in groups})
        sweep = Sweep(snapshot, self.calibration_inputs, collector.taps)
        for group in track(groups, f"{self.spec_path} {what} (streamed)"):
            producer = group[0].node.args[0]
            sweep.run_until([same[producer].name])
            inputs = collector.inputs(same[producer].name, self.seed, self.max_rows, name=producer.name)
            yield group, {lin.node.name: inputs for lin in group}
            del inputs
            give_back_freed_memory()

    def _check_memory(self, widths: list[int], what: str) -> None:
        """Refuse, before the sweep, a collection that cannot fit: every row of every input is held
        (float32) until the sweep ends, plus one Gram matrix per input."""
        rows = sum(calibration_rows(args) for args in self.calibration_inputs)
        need = 4 * (rows * sum(widths) + sum(w * w for w in widths))
        available = available_memory()
        if available is not None and need > 0.8 * available:
            raise PassPreconditionError(
                f"{self.spec_path}: collecting {what} of {len(widths)} layers over {rows:,} calibration rows needs "
                f"about {need / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB available; lower "
                "calibration.samples or calibration.seq_len, or select fewer targets"
            )

    def column_means(self, graph: Graph, nodes: Sequence[str]) -> dict[str, torch.Tensor]:
        """Mean of each node's value over every axis but the last, on the calibration data."""
        missing = [n for n in nodes if (graph.revision, n) not in self._means]
        if missing:
            sums: dict[str, torch.Tensor] = {}
            counts = dict.fromkeys(missing, 0)

            def tap(name):
                def record(value):
                    rows = value.detach().reshape(-1, value.shape[-1]).double()
                    sums[name] = sums[name] + rows.sum(0) if name in sums else rows.sum(0)
                    counts[name] += len(rows)

                return record

            for args in track(self.calibration_inputs, f"{self.spec_path}: calibrating activations"):
                run_calibration_sample(graph, args, {n: tap(n) for n in missing})
            for name in missing:
                self._means[(graph.revision, name)] = sums[name] / counts[name]
        return {n: self._means[(graph.revision, n)] for n in nodes}

    def weight_grad_squares(self, graph: Graph, linears: Sequence[Linear]) -> dict[str, torch.Tensor]:
        """Sum over calibration samples of (dL/dW)^2 for each linear's weight (keyed by weight name).

        L is the causal-LM loss (next-token cross-entropy of the logits against the input
        ids shifted by one), computed per calibration batch: the empirical Fisher
        information of the weights, as Fisher-weighted SVD uses it.
        """
        missing = [lin.weight for lin in linears if (graph.revision, lin.weight) not in self._grad_squares]
        if missing and graph.cache is not None:
            raise PassPreconditionError(
                f"{self.spec_path}: Fisher weights are computed on forward graphs; capture with mode 'forward'"
            )
        if missing:
            module = graph.module()
            params = dict(module.named_parameters())
            sums = {name: torch.zeros_like(params[name], dtype=torch.float64) for name in missing}
            for args in track(self.calibration_inputs, f"{self.spec_path}: Fisher gradients"):
                ids = args[0]
                if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point()):
                    raise PassPreconditionError(
                        f"{self.spec_path}: the Fisher weights use the causal-LM loss, which needs integer "
                        "input ids (batch, seq) as the first model input"
                    )
                module.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    logits = logits_of(module(*args))
                    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
                        raise PassPreconditionError(
                            f"{self.spec_path}: the Fisher weights need logits (batch, seq, vocab) as the model "
                            f"output; got shape {tuple(logits.shape)}"
                        )
                    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                    loss.backward()
                for name in missing:
                    sums[name] += params[name].grad.double().square()
            module.zero_grad(set_to_none=True)
            for name in missing:
                self._grad_squares[(graph.revision, name)] = sums[name]
        return {lin.weight: self._grad_squares[(graph.revision, lin.weight)] for lin in linears}
