"""Backend infrastructure: lower the final Graph to an artifact and validate it against eager."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel

from ..errors import BackendError
from ..ir import Graph

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Backend(ABC):
    target: ClassVar[str]
    Config: ClassVar[type[BaseModel]]

    def __init__(self, config: BaseModel, spec_path: str = "backends"):
        self.config = config
        self.spec_path = spec_path
        """Where this backend's config sits in the spec (e.g. 'backends[0]'), for error messages."""

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

    @staticmethod
    def compare_with_eager(graph: Graph, inputs: list[tuple], run: Callable, decoder: Callable) -> dict[str, float]:
        """Errors of an artifact vs eager execution of ``graph``.

        Forward graphs: ``run(tensors) -> outputs`` on every calibration input's tensor
        leaves. Decode graphs: ``decoder()`` (a runtime decoder of the artifact) fed the
        first sample's first tokens one by one, its logits against the eager step's.
        """
        import torch

        from ..metrics import compare_outputs
        from ..runtime import TorchDecoder, teacher_forced_logits

        with torch.no_grad():
            if graph.cache is not None:
                ids = inputs[0][0][:, :DECODE_VALIDATION_TOKENS]
                ours = teacher_forced_logits(decoder(), ids)
                return compare_outputs([ours], [teacher_forced_logits(TorchDecoder(graph), ids)])
            eager = graph.module()
            outputs, references = [], []
            for args in inputs:
                outputs.append(run(tensor_leaves(args)))
                references.append(tensor_leaves(eager(*args)))
            return compare_outputs(outputs, references)


def tensor_leaves(values) -> list:
    """The tensors in a nest of tuples, lists and dicts (or a transformers ModelOutput), in order."""
    import torch
    from torch.utils import _pytree as pytree

    leaves = pytree.tree_leaves(values.to_tuple() if hasattr(values, "to_tuple") else values)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A scratch directory beside the final files; removed whatever happens.

    Backends write there and :func:`publish` moves finished files into ``out_dir``
    with ``os.replace`` (atomic on one file system), so an interrupted run never
    leaves a half-written artifact under its final name.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(staged: Path, out_dir: Path) -> Path:
    final = out_dir / staged.name
    os.replace(staged, final)
    return final
