"""Presets: shipped specs that validate, run on the example LM, and take schema-checked overrides."""

from __future__ import annotations

import json

import pytest

from graphpress.cli import main
from graphpress.errors import SpecError
from graphpress.presets import names, preset, with_overrides
from graphpress.schema import load_spec

SMALL = ["--set", "calibration.samples=2", "--set", "calibration.seq_len=32"]


def test_every_preset_is_a_valid_documented_spec():
    assert {"int4-onnxruntime", "int4-genai", "mla-kv4", "sparse24-lut4", "lock-for-sharing"} <= set(names())
    for name in names():
        spec = load_spec(preset(name))
        assert spec.description and len(spec.description) > 60, name
        assert spec.passes, name


def test_the_lock_preset_ships_no_key():
    """A key in a file everyone has is no key: each run draws its own unless the user sets one."""
    assert load_spec(preset("lock-for-sharing")).passes[0].seed is None


def test_overrides_are_read_as_json_and_checked_by_the_schema():
    data = preset("mla-kv4", ["passes[0].kv_ratio=0.25", 'passes[0].rope={"mode": "decoupled", "dims": 16}'])
    assert data["passes"][0]["kv_ratio"] == 0.25 and data["passes"][0]["rope"]["dims"] == 16
    assert with_overrides({"a": {}}, ["a.b=onnxruntime-genai"]) == {"a": {"b": "onnxruntime-genai"}}
    with pytest.raises(SpecError, match=r"passes\[0\]\.bits: Input should be 2, 3, 4 or 8"):
        load_spec(preset("int4-onnxruntime", ["passes[0].bits=5"]))
    with pytest.raises(SpecError, match=r"passes\[0\]\.bitz: unknown field 'bitz' \(did you mean 'bits'\?\)"):
        load_spec(preset("int4-onnxruntime", ["passes[0].bitz=3"]))


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("passes[3].bits=3", r"--set passes\[3\]\.bits=3: passes has 1 entries; no index 3"),
        ("passes[0]bits", r"expected PATH=VALUE"),
        ("passes..bits=3", r"cannot read the path at '\.\.bits'"),
        ("version.x=1", r"version is not an object; no field 'x'"),
    ],
)
def test_a_bad_override_names_itself(assignment, message):
    with pytest.raises(SpecError, match=message):
        preset("int4-onnxruntime", [assignment])


def test_the_command_line_lists_and_prints_presets(capsys):
    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    for name in names():
        assert f"{name}  (" in listing
    assert main(["presets", "mla-kv4"]) == 0
    assert json.loads(capsys.readouterr().out) == preset("mla-kv4")
    assert main(["presets", "int5"]) == 2
    assert "no preset 'int5'; the presets are: int4-genai" in capsys.readouterr().err


def test_set_overrides_a_spec_file_too(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps({"passes": [{"pass": "low_rank", "targets": "layers.*.mlp.*", "rank": 8}], "backends": []})
    )
    argv = ["compress", "--model", "examples/tiny_llama", "--spec", str(spec), "--out", str(tmp_path / "out")]
    assert main([*argv, "--set", "passes[0].rank=1.5"]) == 2
    assert "passes[0].rank" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main([*argv, *SMALL, "--set", "passes[0].rank=32", "--set", "verify.on_fail=warn"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["spec"]["passes"][0]["rank"] == 32 and report["calibration"]["samples"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", names())
def test_each_preset_runs_on_the_example_lm(tmp_path, name):
    out = tmp_path / "out"
    assert main(["compress", "--model", "examples/tiny_llama", "--preset", name, "--out", str(out), *SMALL]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["spec"]["description"] == preset(name)["description"]
    assert all(p["verification"]["passed"] for p in report["passes"]), [p["verification"] for p in report["passes"]]
    assert all(b["errors"]["rel_l2"] <= b["tolerance"] for b in report["backends"])
    assert (
        report["compressed"]["bytes"] < report["original"]["bytes"]
        or name == "lock-for-sharing"
        or (report["compressed"]["kv_cache_bytes_per_token"] < report["original"]["kv_cache_bytes_per_token"])
    )
