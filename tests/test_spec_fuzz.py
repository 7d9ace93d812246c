"""Fuzzing spec loading: whatever JSON comes in, only a SpecError with JSON paths may come out."""

from __future__ import annotations

import json
import random
import re

import pytest
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


# ---------------------------------------------------------------------- hostile JSON text
VALID = (
    '{"calibration": {"samples": 2, "seed": 3}, "passes": [{"pass": "low_rank", "rank": 8}], "verify": {"max": 0.5}}'
)


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "$", "nested more than 32 levels"),
        ('{"passes": ' + "[" * 40 + "]" * 40 + "}", "passes" + "[0]" * 32, "nested more than 32 levels"),
        ('{"calibration": {"seed": ' + "7" * 5000 + "}}", "calibration.seed", "an integer of 5000 digits"),
        ('{"calibration": {"seed": 18446744073709551616}}', "calibration.seed", "an integer of 20 digits"),
        (
            '{"calibration": {"seed": 9223372036854775808}}',
            "calibration.seed",
            "outside the 64-bit integers",
        ),
        ('{"verify": {"max": Infinity}}', "verify.max", "Infinity is not a JSON number"),
        ('{"verify": {"max": NaN}}', "verify.max", "NaN is not a JSON number"),
        ('{"passes": [{"pass": "low_rank", "damping": 1e999}]}', "passes[0].damping", "1e999 overflows a float"),
        ('{"passes": [{"pass": "bogus"}], "passes": []}', "passes", "this key is given twice"),
        ('{"calibration": {"samples": 2, "samples": 3}}', "calibration.samples", "given twice"),
        ('{"calibration": {"samples": "8"}}', "calibration.samples", "valid integer"),
        ('{"capture": {"dynamic": "no"}}', "capture.dynamic", "valid boolean"),
        ('{"version": true}', "version", "Input should be 1"),
        ('{"calibration": {"samples": 1e9}}', "calibration.samples", "valid integer"),
        ('{"calibration": {"samples": 100000}}', "calibration.samples", "less than or equal to 4096"),
        ('{"calibration": {"seq_len": 100000000}}', "calibration.seq_len", "less than or equal to 131072"),
        ('{"passes": [{"pass": "weight_clustering", "iterations": 1000000000}]}', "passes[0].iterations", "1000"),
        ('{"passes": [{"pass": "low_rank", "power_iters": 1000000000}]}', "passes[0].power_iters", "32"),
        ('{"passes": [{"pass": "qkvo_lock", "seed": -1}]}', "passes[0].seed", "greater than or equal to 0"),
    ],
    ids=lambda v: v[:40] if isinstance(v, str) else None,
)
def test_hostile_json_is_a_spec_error_naming_the_path(text, path, message):
    with pytest.raises(SpecError) as info:
        load_spec(text)
    assert any(p == path and message in m for p, m in info.value.problems), info.value.problems


def test_non_finite_and_huge_numbers_from_python_are_refused_too():
    with pytest.raises(SpecError, match=r"verify\.max: .*finite"):
        load_spec({"verify": {"max": float("inf")}})
    with pytest.raises(SpecError, match=r"calibration\.seed: .*64-bit"):
        load_spec({"calibration": {"seed": 10**30}})


def _mutations(rng: random.Random, text: str) -> str:
    """One hostile edit of a valid spec's text: deep nesting, huge or odd numbers, a repeated key, junk."""
    cut = rng.randrange(len(text) + 1)
    depth = rng.choice([1, 5, 33, 200, 5000])
    insert = rng.choice(
        [
            "[" * depth + "]" * depth,
            '{"a":' * depth + "1" + "}" * depth,
            "9" * rng.choice([19, 20, 400, 4301, 6000]),
            "-" + "9" * rng.choice([19, 20, 5000]),
            rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "-1e400", "1e-400", "true", "null", '"8"']),
            '"passes": [], ',
            '"seed": 1, "seed": 2, ',
            "".join(rng.choice('{}[]:,"\\ 0e.-') for _ in range(rng.randrange(1, 12))),
        ]
    )
    return text[:cut] + insert + text[cut:]


def test_ten_thousand_hostile_specs_only_raise_spec_errors():
    """A seeded mutation fuzzer (deterministic, ~1 s): every edit either loads or is a SpecError with JSON paths."""
    rng = random.Random(0)
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(10_000):
        text = _mutations(rng, VALID)
        try:
            load_spec(text)
            outcomes["loaded"] += 1
        except SpecError as exc:
            assert exc.problems and all(PATH.match(p) and m for p, m in exc.problems), exc.problems
            outcomes["refused"] += 1
    assert outcomes["loaded"] > 10 and outcomes["refused"] > 5000, outcomes
