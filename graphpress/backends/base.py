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

    def __init__(self, config: BaseModel, spec_path: str = "backends"):
        self.config = config
        self.spec_path = spec_path
        """Where this backend's config sits in the spec (e.g. 'backends[0]'), for error messages."""
        self.source = None
        """The ModelSource compressed (set by ``compress``): its config and tokenizer files, for artifacts
        that carry them; None when a backend is built on a bare graph."""

    def require(self, module: str, extra: str) -> None:
        """Fail clearly, naming the spec entry, when an optional dependency is missing."""
        import importlib.util

        if importlib.util.find_spec(module) is None:
            raise BackendError(
                f"{self.spec_path}: the {self.target} backend needs {module}: pip install 'graphpress[{extra}]'"
            )

    @abstractmethod
    def build(self, graph: Graph, inputs: list[tuple], out_dir: Path) -> BackendRecord:
        """Write the artifact under ``out_dir`` and validate it on ``inputs``."""

    def compare_with_eager(self, graph: Graph, inputs: list[tuple], run: Callable, decoder: Callable) -> Comparison:
        """An artifact vs eager execution of ``graph``.

        Forward graphs: ``run(tensors) -> outputs`` on every calibration input's tensor
        leaves. Decode graphs: ``decoder()`` (a runtime decoder of the artifact) fed the
        first sample's first tokens one by one, its logits against the eager step's.
        """
        import torch

        from ..metrics import compare_outputs
        from ..runtime import TorchDecoder, teacher_forced_logits

        with torch.no_grad(), step(f"{self.spec_path} {self.target}: validating against eager"):
            if graph.cache is not None:
                ids = inputs[0][0][:, :DECODE_VALIDATION_TOKENS]
                (ours, ours_s), (ref, ref_s) = (
                    _timed(teacher_forced_logits, d, ids) for d in (decoder(), TorchDecoder(graph))
                )
                steps = ids.shape[1]
                return Comparison(
                    compare_outputs([ours], [ref]), _latency(ours_s / steps, ref_s / steps, "decode step")
                )
            eager = graph.module()
            outputs, references, ours_s, ref_s = [], [], [], []
            for args in inputs:
                out, seconds = _timed(run, tensor_leaves(args))
                outputs.append(out)
                ours_s.append(seconds)
                ref, seconds = _timed(eager, *args)
                references.append(tensor_leaves(ref))
                ref_s.append(seconds)
            return Comparison(compare_outputs(outputs, references), _latency(median(ours_s), median(ref_s), "sample"))


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
