"""Backend infrastructure: lower the final Graph to an artifact and validate it against eager."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel

from ..ir import Graph


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

    @abstractmethod
    def build(self, graph: Graph, inputs: list[tuple], out_dir: Path) -> BackendRecord:
        """Write the artifact under ``out_dir`` and validate it on ``inputs``."""


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
