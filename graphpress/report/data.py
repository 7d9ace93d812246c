"""The compression report: everything measured in one run, as plain data (JSON-ready)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class CompressionReport:
    model: str
    spec: dict[str, Any]
    original: dict[str, Any]
    compressed: dict[str, Any]
    passes: list[dict[str, Any]] = field(default_factory=list)
    backends: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    capture: dict[str, Any] = field(default_factory=dict)
    """mode, the model's dtype, and each graph input's captured shape range (see Graph.input_ranges)."""
    timings: dict[str, float] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """Strict JSON: a non-finite figure (a diverged error, an infinite ratio) is written as null."""
        return json.dumps(_finite(self.to_dict()), indent=2, sort_keys=False, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionReport:
        return cls(**data)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
