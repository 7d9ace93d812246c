"""Presets: named specs for the common goals, shipped as JSON files beside this module.

``graphpress presets`` lists them; ``graphpress compress --preset NAME --set passes[0].bits=3`` runs
one with overrides. A preset is a plain spec (its ``description`` says what it is for), so an
override is checked by the schema like any spec, and ``graphpress presets NAME`` prints the JSON
to copy and edit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import SpecError

PRESETS_DIR = Path(__file__).parent
_STEP = re.compile(r"\.?([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


def names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def preset(name: str, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The named preset as spec data, with each ``path=value`` override applied (validate with ``load_spec``)."""
    path = PRESETS_DIR / f"{name}.json"
    if name not in names():
        raise SpecError([("--preset", f"no preset {name!r}; the presets are: {', '.join(names())}")])
    return with_overrides(json.loads(path.read_text()), overrides)


def with_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of ``data`` with ``passes[0].bits=3``-style assignments made. The value is read as JSON
    (``3``, ``true``, ``null``, ``{"mode": "decoupled"}``), and as a plain string where it is not JSON."""
    data = json.loads(json.dumps(data))
    for assignment in overrides:
        path, sep, text = assignment.partition("=")
        if not sep or not path:
            raise SpecError([(f"--set {assignment}", "expected PATH=VALUE, e.g. passes[0].bits=3")])
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        _assign(data, _steps(path, assignment), value, assignment)
    return data


def _steps(path: str, assignment: str) -> list[str | int]:
    steps, at = [], 0
    while at < len(path):
        match = _STEP.match(path, at)
        if match is None or (at == 0 and path.startswith(".")):
            raise SpecError([(f"--set {assignment}", f"cannot read the path at {path[at:]!r}; e.g. passes[0].bits")])
        steps.append(match[1] if match[1] is not None else int(match[2]))
        at = match.end()
    return steps


def _assign(data: Any, steps: list[str | int], value: Any, assignment: str) -> None:
    where = ""
    for i, key in enumerate(steps):
        last = i == len(steps) - 1
        if isinstance(key, int):
            if not isinstance(data, list) or key >= len(data):
                size = f"has {len(data)} entries" if isinstance(data, list) else "is not a list"
                raise SpecError([(f"--set {assignment}", f"{where or '$'} {size}; no index {key}")])
            where += f"[{key}]"
        else:
            if not isinstance(data, dict):
                raise SpecError([(f"--set {assignment}", f"{where or '$'} is not an object; no field {key!r}")])
            where += f".{key}" if where else key
            if not last and key not in data:
                data[key] = {}
        if last:
            data[key] = value
        else:
            data = data[key]
