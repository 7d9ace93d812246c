"""Fuzzing spec loading: whatever JSON comes in, only a SpecError with JSON paths may come out."""

from __future__ import annotations

import json
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphpress import SpecError
from graphpress.schema import BACKEND_CONFIGS, PASS_CONFIGS, Spec, load_spec

KEY = r'\["(?:[^"\\]|\\.)*"\]'  # ["any key"], JSON-quoted
PATH = re.compile(rf"^(\$|[A-Za-z_][A-Za-z0-9_]*|\${KEY})(\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\]|{KEY})*$")

scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)  # fmt: skip


def fields_of(model) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


PASS_FIELDS = sorted({f for config in PASS_CONFIGS.values() for f in fields_of(config)})
BACKEND_FIELDS = sorted({f for config in BACKEND_CONFIGS.values() for f in fields_of(config)})


def entry(tag: str, names, fields):
    """A pass or backend entry: a (mostly) known tag, known or unknown fields, any values."""
    return st.fixed_dictionaries(
        {tag: st.sampled_from(list(names)) | json_values},
        optional={
            f: json_values | st.integers(-4, 300) | st.sampled_from(["*", "channel", "token", "tosa"])
            for f in fields
            if f != tag
        },
    )


near_valid_specs = st.fixed_dictionaries(
    {},
    optional={
        "version": st.sampled_from([1, 2]) | json_values,
        "capture": st.fixed_dictionaries({}, optional={"mode": st.sampled_from(["forward", "decode", "x"]), "dynamic": json_values}),
        "calibration": st.dictionaries(st.sampled_from(["samples", "seq_len", "seed", "bogus"]), json_values | st.integers(-3, 9)),
        "passes": st.lists(entry("pass", PASS_CONFIGS, PASS_FIELDS), max_size=3) | json_values,
        "verify": st.dictionaries(st.sampled_from(["metric", "max", "on_fail"]), json_values),
        "backends": st.lists(entry("target", BACKEND_CONFIGS, BACKEND_FIELDS), max_size=3) | json_values,
    },
)  # fmt: skip


def load_or_specerror(source) -> None:
    try:
        spec = load_spec(source)
    except SpecError as exc:
        assert exc.problems, "a SpecError names at least one problem"
        for path, message in exc.problems:
            assert PATH.match(path), f"not a JSON path: {path!r}"
            assert message
        return
    assert isinstance(spec, Spec)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_any_json_value(value):
    load_or_specerror(value if isinstance(value, dict) else json.dumps(value))


@settings(max_examples=700, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_valid_specs)
def test_near_valid_specs(spec):
    load_or_specerror(spec)
    load_or_specerror(json.dumps(spec, allow_nan=True))
