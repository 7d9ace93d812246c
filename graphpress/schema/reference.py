"""Config tables for the docs, generated from the pydantic models so they cannot drift.

A docs page marks a table with ``<!-- config: LowRankConfig -->`` ... ``<!-- /config -->``;
``python -m graphpress.schema.reference docs`` rewrites every marked table from the
models' fields, defaults and descriptions, and ``--check`` (what the tests run) fails
when a page is out of date.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from pydantic import BaseModel

from . import backends, passes, spec

MARKED = re.compile(r"(<!-- config: (\w+) -->\n)(.*?)(<!-- /config -->)", re.S)
SELECTORS = {"pass", "target"}


def config_models() -> dict[str, type[BaseModel]]:
    found = {}
    for module in (passes, backends, spec):
        for name in dir(module):
            obj = getattr(module, name)
            if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == module.__name__:
                found[name] = obj
    return found


def config_table(model: type[BaseModel]) -> str:
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for name, field in model.model_fields.items():
        key = field.alias or name
        if key in SELECTORS:
            continue
        default = "required" if field.is_required() else f"`{_show(field.get_default(call_default_factory=True))}`"
        meaning = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{key}` | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def _show(value) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", by_alias=True)
    return json.dumps(value)


def render(text: str, models: dict[str, type[BaseModel]] | None = None) -> str:
    models = models or config_models()

    def table(match: re.Match) -> str:
        name = match[2]
        if name not in models:
            raise KeyError(f"<!-- config: {name} -->: no config model of that name")
        return match[1] + config_table(models[name]) + match[4]

    return MARKED.sub(table, text)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    roots = [Path(a) for a in argv if a != "--check"] or [Path("docs")]
    stale = []
    for page in sorted(p for root in roots for p in root.rglob("*.md")):
        text = page.read_text()
        new = render(text)
        if new != text:
            stale.append(page)
            if not check:
                page.write_text(new)
    for page in stale:
        print(f"{page}: config tables {'out of date' if check else 'rewritten'}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
