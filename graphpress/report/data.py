"""The compression report: everything measured in one run, as plain data (JSON-ready)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


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
    evaluation: dict[str, Any] = field(default_factory=dict)
    """The spec's ``evaluate`` results: {'perplexity': {data, tokens, seq_len, decode, rows}, 'lm_eval': {tasks,
    limit, rows}}, a row per model scored (see evaluation.py)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """Strict JSON: a non-finite figure (a diverged error, an infinite ratio) is written as null."""
        return json.dumps(_finite(self.to_dict()), indent=2, sort_keys=False, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionReport:
        """A report from parsed JSON; raises ``pydantic.ValidationError`` naming what is malformed."""
        checked = _ordered(_ReportShape.model_validate(data).model_dump(mode="python"), data)
        return cls(**{name: checked[name] for name in cls.__dataclass_fields__ if name in checked})


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# ---------------------------------------------------------------------- the shape of report.json
# What the renderers read, typed, so a report.json from elsewhere (edited, truncated, crafted)
# is refused naming its field instead of failing somewhere in the Markdown writer. Fields
# graphpress does not render are allowed and kept as they are.
Count = Annotated[int, Field(ge=0, le=2**63 - 1)]
Number = Annotated[float, Field(allow_inf_nan=False)]


class _Shape(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _Layer(_Shape):
    path: str
    action: str
    params_before: Count
    params_after: Count
    bytes_before: Count | None = None
    bytes_after: Count | None = None
    details: dict[str, Any]


class _Verification(_Shape):
    metric: Literal["rel_l2", "max_abs", "cosine_distance"]
    max: Number
    passed: bool
    rel_l2: Number | None = None
    max_abs: Number | None = None
    cosine_distance: Number | None = None


class _PassShape(_Shape):
    name: str
    layers: list[_Layer]
    params_before: Count
    params_after: Count
    seconds: Number
    details: dict[str, Any] = {}
    verification: _Verification | None = None


class _Totals(_Shape):
    params: Count
    bytes: Count
    linear_flops_per_token: Count
    kv_cache_bytes_per_token: Annotated[Number, Field(ge=0, le=2**63)] | None = None
    kv_cache_window_bytes: Count | None = None


class _Latency(_Shape):
    artifact_ms: Number
    eager_ms: Number
    per: str
    device: str | None = None


class _Parity(_Shape):
    rel_l2: Number | None = None
    max_abs: Number | None = None


class _BackendShape(_Shape):
    target: str
    files: dict[str, Count]
    op_histogram: dict[str, Count]
    errors: _Parity
    tolerance: Number
    seconds: Number
    latency: _Latency | None = None


class _Scored(_Shape):
    model: str
    runs_in: str
    perplexity: Number | None = None
    bytes: Count | None = None
    seconds: Number | None = None
    error: str | None = None
    tasks: dict[str, dict[str, Number]] | None = None


class _LmEval(_Shape):
    tasks: list[str]
    limit: Count | None = None
    rows: list[_Scored]


class _Perplexity(_Shape):
    data: str
    tokens: Count
    seq_len: Count
    rows: list[_Scored]


class _Evaluation(_Shape):
    perplexity: _Perplexity | None = None
    lm_eval: _LmEval | None = None


class _ReportShape(_Shape):
    model: str
    spec: dict[str, Any]
    original: _Totals
    compressed: _Totals
    passes: list[_PassShape] = []
    backends: list[_BackendShape] = []
    calibration: dict[str, Any] = {}
    capture: dict[str, Any] = {}
    timings: dict[str, Number] = {}
    environment: dict[str, str] = {}
    warnings: list[str] = []
    evaluation: _Evaluation | None = None


def _ordered(checked: Any, original: Any) -> Any:
    """The validated data with the original's keys in their order (no defaults added): a round trip keeps bytes."""
    if isinstance(checked, dict) and isinstance(original, dict):
        return {k: _ordered(checked[k], original[k]) for k in original if k in checked}
    if isinstance(checked, list) and isinstance(original, list):
        return [_ordered(c, o) for c, o in zip(checked, original, strict=True)]
    return checked
