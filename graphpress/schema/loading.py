"""Load a spec from JSON and turn pydantic's errors into messages that name JSON paths.

pydantic reports locations like ``('passes', 0, 'low_rank', 'rnak')``: the third item
is the discriminator's tag, not a key in the user's JSON. We walk the input data
alongside the location to drop such tags, and add what the user could have
written instead (allowed fields, a close match).
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import SpecError
from .backends import BACKEND_CONFIGS
from .passes import PASS_CONFIGS
from .spec import Spec

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def load_spec(source: Spec | dict | str | Path) -> Spec:
    """A validated Spec from a Spec, a dict, a path to a JSON file, or a JSON string."""
    if isinstance(source, Spec):
        return source
    origin = None
    if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith("{")):
        origin = str(source)
        try:
            text = Path(source).read_text()
        except OSError as exc:
            raise SpecError([("$", f"cannot read spec file: {exc.strerror or exc}")], origin) from None
        source = text
    if isinstance(source, str):
        try:
            source = json.loads(source)
        except json.JSONDecodeError as exc:
            raise SpecError(
                [("$", f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})")], origin
            ) from None
    if not isinstance(source, dict):
        raise SpecError([("$", f"a spec is a JSON object, got {type(source).__name__}")], origin)
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
