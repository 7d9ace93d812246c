"""Load a spec from JSON and turn pydantic's errors into messages that name JSON paths.

pydantic reports locations like ``('passes', 0, 'low_rank', 'rnak')``: the third item
is the discriminator's tag, not a key in the user's JSON. We walk the input data
alongside the location to drop such tags, and add what the user could have
written instead (allowed fields, a close match).

Before validation the JSON itself is checked, so that no input reaches pydantic (or
Python's int parser) that it would crash on or silently reinterpret: a key given twice
(the last would win, hiding the first), nesting deeper than any spec needs, integers
outside int64 and non-finite numbers (``NaN``, ``Infinity``, ``1e999``) are each refused
with the JSON path they sit at.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import SpecError
from .backends import BACKEND_CONFIGS
from .passes import PASS_CONFIGS
from .spec import Spec

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_DEPTH = 32  # a spec nests 5 deep; anything deeper is not a spec
INT64 = (-(2**63), 2**63 - 1)


class _Object(dict):
    """A parsed JSON object that remembers the first key it was given twice."""

    duplicate: str | None = None


class _Refused:
    """A JSON number the loader will not turn into a Python value, kept with why."""

    def __init__(self, why: str):
        self.why = why


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object()
    for key, value in pairs:
        if key in obj and obj.duplicate is None:
            obj.duplicate = key
        obj[key] = value
    return obj


def _integer(text: str) -> int | _Refused:
    digits = len(text.lstrip("-"))
    if digits > 19:
        return _Refused(f"an integer of {digits} digits; numbers in a spec fit in 64 bits")
    return int(text)


def _float(text: str) -> float | _Refused:
    value = float(text)
    return value if math.isfinite(value) else _Refused(f"{text} overflows a float")


def _parse(text: str) -> Any:
    return json.loads(
        text,
        object_pairs_hook=_object,
        parse_int=_integer,
        parse_float=_float,
        parse_constant=lambda name: _Refused(f"{name} is not a JSON number (give a finite number)"),
    )


def _key_path(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if not _PLAIN_KEY.fullmatch(str(key)):
        return f"{path}[{json.dumps(str(key))}]"
    return f"{path}.{key}" if path != "$" else str(key)


def check_json(data: Any) -> list[tuple[str, str]]:
    """What in parsed JSON (or a dict given in Python) no spec may hold: [(JSON path, why)], walked iteratively."""
    problems: list[tuple[str, str]] = []
    todo = [("$", data, 0)]
    while todo and len(problems) < 20:
        path, value, depth = todo.pop()
        if depth > MAX_DEPTH:
            problems.append((path, f"nested more than {MAX_DEPTH} levels deep; a spec needs a handful"))
            continue
        if isinstance(value, _Refused):
            problems.append((path, value.why))
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
            problems.append((path, f"{value:.3e} is outside the 64-bit integers a spec may hold"))
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append((path, f"{value} is not a finite number"))
        elif isinstance(value, dict):
            if getattr(value, "duplicate", None) is not None:
                problems.append((_key_path(path, value.duplicate), "this key is given twice; give it once"))
            todo.extend((_key_path(path, k), v, depth + 1) for k, v in reversed(list(value.items())))
        elif isinstance(value, (list, tuple)):
            todo.extend((_key_path(path, i), v, depth + 1) for i, v in reversed(list(enumerate(value))))
    return problems


def load_spec(source: Spec | dict | str | Path) -> Spec:
    """A validated Spec from a Spec, a dict, a path to a JSON file, or a JSON string."""
    if isinstance(source, Spec):
        return source
    origin = None
    if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith(("{", "["))):
        origin = str(source)
        try:
            text = Path(source).read_text()
        except OSError as exc:
            raise SpecError([("$", f"cannot read spec file: {exc.strerror or exc}")], origin) from None
        source = text
    if isinstance(source, str):
        try:
            source = _parse(source)
        except json.JSONDecodeError as exc:
            raise SpecError(
                [("$", f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})")], origin
            ) from None
        except RecursionError:
            raise SpecError(
                [("$", f"nested more than {MAX_DEPTH} levels deep; a spec needs a handful")], origin
            ) from None
    if not isinstance(source, dict):
        raise SpecError([("$", f"a spec is a JSON object, got {type(source).__name__}")], origin)
    problems = check_json(source)
    if problems:
        raise SpecError(problems, origin)
    try:
        return Spec.model_validate(source)
    except ValidationError as exc:
        raise SpecError([_describe(err, source) for err in exc.errors()], origin) from None


def json_schema() -> dict:
    return Spec.model_json_schema(by_alias=True)


def _describe(err: dict, data: Any) -> tuple[str, str]:
    path, model = _json_path(err["loc"], data, keep_missing_key=err["type"] == "missing")
    kind, msg = err["type"], err["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden" and model is not None:
        field = str(err["loc"][-1])
        allowed = sorted(f.alias or name for name, f in model.model_fields.items())
        close = difflib.get_close_matches(field, allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        msg = f"unknown field {field!r}{hint}; allowed fields: {', '.join(allowed)}"
    elif kind == "union_tag_invalid":
        msg = f"unknown value {err['ctx']['tag']!r}; expected one of {err['ctx']['expected_tags']}"
    elif kind == "union_tag_not_found":
        key, choices = ("pass", PASS_CONFIGS) if "pass" in err["ctx"]["discriminator"] else ("target", BACKEND_CONFIGS)
        msg = f"missing key {key!r}; expected one of {', '.join(map(repr, choices))}"
    elif kind == "missing":
        msg = "required field is missing"
    return path, msg


def _json_path(loc: tuple, data: Any, keep_missing_key: bool) -> tuple[str, type[BaseModel] | None]:
    """('passes', 0, 'low_rank', 'rnak') -> ('passes[0].rnak', LowRankConfig).

    A string in the location that is not a key of the data there is a union's
    branch label (a discriminator tag, or 'int' for a plain union) and is dropped,
    unless it names the missing field the error is about.
    """
    parts: list[str] = []
    model: type[BaseModel] | None = Spec
    list_field = None
    for i, key in enumerate(loc):
        is_last = i == len(loc) - 1
        if isinstance(key, int):
            parts.append(f"[{key}]")
            data = data[key] if isinstance(data, list) and key < len(data) else None
            model = _item_model(list_field, data)
            continue
        if not (isinstance(data, dict) and key in data) and not (is_last and keep_missing_key):
            continue
        if not _PLAIN_KEY.fullmatch(str(key)):  # a key a dotted path cannot spell: $["0"], passes[0]["a b"]
            parts.append(("" if parts else "$") + f"[{json.dumps(str(key))}]")
        else:
            parts.append(f".{key}" if parts else str(key))
        if not is_last:
            list_field, model = key, _field_model(model, key)
            data = data.get(key) if isinstance(data, dict) else None
    return "".join(parts) or "$", model


def _item_model(list_field: str | None, item: Any) -> type[BaseModel] | None:
    """The config class of one entry of ``passes`` or ``backends``, chosen by its tag."""
    if not isinstance(item, dict):
        return None
    configs, tag = {"passes": (PASS_CONFIGS, "pass"), "backends": (BACKEND_CONFIGS, "target")}.get(list_field, ({}, ""))
    name = item.get(tag)
    return configs.get(name) if isinstance(name, str) else None  # a tag may be any JSON value


def _field_model(model: type[BaseModel] | None, key: str) -> type[BaseModel] | None:
    for name, field in model.model_fields.items() if model else ():
        if key in (name, field.alias):
            tp = field.annotation
            return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None
    return None
