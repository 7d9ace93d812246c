"""Backend infrastructure: lower the final Graph to an artifact and validate it against eager."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any, ClassVar

from pydantic import BaseModel

from ..errors import BackendError
from ..ir import Graph
from ..progress import step

DECODE_VALIDATION_TOKENS = 32
"""Decode graphs are validated on this many teacher-forced tokens of the first calibration sample."""


@dataclass
class BackendRecord:
    """What a backend wrote and how well it matches eager execution of the same graph."""

    target: str
    artifact: str
    files: dict[str, int] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    tolerance: float = 0.0
    op_histogram: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    """Run time seen while validating, artifact vs eager side by side (see :class:`Comparison`)."""
    warnings: list[str] = field(default_factory=list)
    """What the user should know about the artifact at run time; the run's report lists them."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Comparison:
    """An artifact checked against eager execution of the same graph.

    ``latency`` holds what validation took per sample (forward: the median over the
    calibration inputs) or per decode step (the mean over the teacher-forced tokens), for
    the artifact and for eager PyTorch, measured in the same loop. It is a sanity figure
    for the report, not a benchmark: ``benchmarks/`` measures speed.
    """

    errors: dict[str, float]
    latency: dict[str, Any] = field(default_factory=dict)


class Backend(ABC):
    target: ClassVar[str]
    Config: ClassVar[type[BaseModel]]
    shape_hint: ClassVar[str] = ""
    """What to do when the artifact refuses a shape the graph takes (said in the warning)."""

    def __init__(self, config: BaseModel, spec_path: str = "backends"):
        self.config = config
        self.spec_path = spec_path
        """Where this backend's config sits in the spec (e.g. 'backends[0]'), for error messages."""
        self.source = None
        """The ModelSource compressed (set by ``compress``): its config and tokenizer files, for artifacts
        that carry them; None when a backend is built on a bare graph."""
        self.validated_shapes: list[str] = []
        """The input shapes :meth:`compare_with_eager` checked the artifact at (the report lists them)."""
        self.shape_warnings: list[str] = []
        """Shapes the captured graph takes and the artifact does not (the run's report lists them first)."""
        self.runners: tuple[Callable, Callable] | None = None
        """(run, decoder) of the built artifact, as :meth:`compare_with_eager` was given them; None before."""
        self.published_dir: Path | None = None
        """Where ``build``'s ``out_dir`` is published (set by ``compress``, which builds into a staging folder):
        what an earlier run left there (a tuning database) can be reused. None: ``out_dir`` itself."""

    def require(self, module: str, extra: str) -> None:
        """Fail clearly, naming the spec entry, when an optional dependency is missing."""
        import importlib.util

        if importlib.util.find_spec(module) is None:
            raise BackendError(
                f"{self.spec_path}: the {self.target} backend needs {module}: pip install 'graphpress[{extra}]'"
            )

    def streams(self, graph: Graph) -> bool:
        """Whether :meth:`build` takes ``graph`` with its tensors on disk (a streamed run's), reading one at a
        time; otherwise it is given the graph read into memory (refused above half the available memory)."""
        return False

    @abstractmethod
    def build(self, graph: Graph, inputs: list[tuple], out_dir: Path) -> BackendRecord:
        """Write the artifact under ``out_dir`` and validate it on ``inputs``."""

    def compare_with_eager(self, graph: Graph, inputs: list[tuple], run: Callable, decoder: Callable) -> Comparison:
        """An artifact vs eager execution of ``graph``.

        Forward graphs: ``run(tensors) -> outputs`` on every calibration input's tensor
        leaves, or ``run.sweep([tensors, ...]) -> [(outputs, seconds), ...]`` where ``run`` has one (an artifact
        run in pieces, each piece loaded once for all inputs). Decode graphs: ``decoder()`` (a runtime decoder of the artifact) fed the
        first sample's first tokens one by one, its logits against the eager step's.
        """
        import torch

        from ..ir.shapes import other_shape
        from ..metrics import compare_outputs
        from ..runtime import TorchDecoder, prefill, teacher_forced_logits

        self.runners = (run, decoder)  # the artifact as validation runs it: evaluation scores it the same way

        with torch.no_grad(), step(f"{self.spec_path} {self.target}: validating against eager"):
            if graph.cache is not None:
                made = decoder()  # loaded now: the staged file may move before evaluation runs it
                self.runners = (run, lambda: made)
                ids = inputs[0][0][:, :DECODE_VALIDATION_TOKENS]
                (ours, ours_s), (ref, ref_s) = (
                    _timed(teacher_forced_logits, d, ids) for d in (made, TorchDecoder(graph))
                )
                steps = ids.shape[1]
                outputs, references = [ours], [ref]
                self.validated_shapes = [f"decode: {_shape(ids)} token by token"]
                prompt = _other_prompt(graph, ids)
                if prompt is not None:  # a batch more, a prompt in one call where the step takes one
                    outputs.append(prefill(made, prompt)[0])
                    references.append(prefill(TorchDecoder(graph), prompt)[0])
                    self.validated_shapes.append(f"decode: prompt {_shape(prompt)}")
                return Comparison(
                    compare_outputs(outputs, references), _latency(ours_s / steps, ref_s / steps, "decode step")
                )
            eager, swept = _eager(graph, inputs, f"{self.spec_path} {self.target}: eager reference (streamed)")
            leaves = [tensor_leaves(args) for args in inputs]
            ours = run.sweep(leaves) if hasattr(run, "sweep") else [_timed(run, tensors) for tensors in leaves]
            outputs, references, ours_s, ref_s = [], [], [], []
            for k, args in enumerate(inputs):
                out, seconds = ours[k]
                outputs.append(out)
                ours_s.append(seconds)
                ref, seconds = swept[k] if swept else _timed(eager, *args)
                references.append(tensor_leaves(ref))
                ref_s.append(seconds)
            self.validated_shapes = sorted({_shape(*tensor_leaves(args)) for args in inputs})
            other = other_shape(graph, tensor_leaves(inputs[0])) if _all_tensors(inputs[0]) else None
            if other is not None:  # beyond the calibration shapes, within what capture promised
                try:
                    ours = run(other)
                except Exception as exc:
                    self.shape_warnings.append(
                        f"{self.spec_path}: the {self.target} artifact runs at {self.validated_shapes[0]} but not at "
                        f"{_shape(*other)}, which the captured graph takes: {' '.join(str(exc).split())[:200]}"
                        + (f" ({self.shape_hint})" if self.shape_hint else "")
                    )
                else:
                    outputs.append(ours)
                    references.append(tensor_leaves(eager(*other)))
                    self.validated_shapes.append(_shape(*other))
            return Comparison(compare_outputs(outputs, references), _latency(median(ours_s), median(ref_s), "sample"))


def _eager(graph: Graph, inputs: list[tuple], description: str) -> tuple[Callable, list]:
    """Eager execution of ``graph``, and for a streamed graph (tensors on disk) each input's outputs and share of
    the time from one :class:`~graphpress.ir.stream.Sweep` over them all, each weight read once."""
    if not graph.lazy:
        return graph.module(), []
    from ..ir.stream import Sweep

    outputs, seconds = _timed(lambda: Sweep(graph, inputs).finish(description))
    return (lambda *args: Sweep(graph, [args]).finish()[0]), [(out, seconds / len(inputs)) for out in outputs]


def _shape(*tensors) -> str:
    return ", ".join("x".join(map(str, t.shape)) for t in tensors)


def _all_tensors(args) -> bool:
    import torch

    return isinstance(args, tuple) and all(isinstance(a, torch.Tensor) for a in args)


def _other_prompt(graph: Graph, ids):
    """The validation tokens at one more sequence and half the length (at least 2), if capture allows that batch."""
    import torch

    captured = graph.input_ranges().get("input_ids", [ids.shape[0]])[0]
    batch = ids.shape[0] + 1
    if isinstance(captured, int) or (captured[1] is not None and batch > captured[1]):
        return None
    length = max(2, ids.shape[1] // 2)
    return ids.index_select(0, torch.arange(batch) % ids.shape[0])[:, :length]


def _timed(fn: Callable, *args) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def _latency(artifact_s: float, eager_s: float, per: str) -> dict[str, Any]:
    return {"artifact_ms": round(artifact_s * 1e3, 3), "eager_ms": round(eager_s * 1e3, 3), "per": per}


def tensor_leaves(values) -> list:
    """The tensors in a nest of tuples, lists and dicts (or a transformers ModelOutput), in order."""
    import torch
    from torch.utils import _pytree as pytree

    leaves = pytree.tree_leaves(values.to_tuple() if hasattr(values, "to_tuple") else values)
    return [t for t in leaves if isinstance(t, torch.Tensor)]
