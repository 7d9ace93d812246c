"""Spec loading: strict fields, discriminated passes, errors that name the JSON path."""

import json
from pathlib import Path

import pytest

from graphpress import SpecError
from graphpress.schema import LowRankConfig, ParamRatio, Spec, json_schema, load_spec


def problems(spec) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    return dict(info.value.problems)


def test_defaults_give_onnx_backend_and_no_passes():
    spec = load_spec({})
    assert spec.passes == []
    assert [b.target for b in spec.backends] == ["onnx"]
    assert spec.verify.metric == "rel_l2"


def test_pass_is_chosen_by_its_pass_key():
    spec = load_spec({"passes": [{"pass": "low_rank", "rank": {"param_ratio": 0.5}, "targets": "layers.*"}]})
    (cfg,) = spec.passes
    assert isinstance(cfg, LowRankConfig)
    assert cfg.rank == ParamRatio(param_ratio=0.5)


def test_typo_names_the_json_path_and_suggests_the_field():
    found = problems({"passes": [{"pass": "low_rank", "rnak": 8, "rank": 4}]})
    assert list(found) == ["passes[0].rnak"]
    assert "did you mean 'rank'" in found["passes[0].rnak"]
    assert "min_rank" in found["passes[0].rnak"]  # lists the allowed fields


def test_unknown_pass_lists_the_known_ones():
    found = problems({"passes": [{"pass": "low_rnak", "rank": 4}]})
    assert "'low_rank'" in found["passes[0]"]


def test_missing_pass_key():
    found = problems({"passes": [{"rank": 4}]})
    assert "missing key 'pass'" in found["passes[0]"]


def test_nested_paths_and_allowed_values():
    found = problems(
        {
            "capture": {"mode": "trace"},
            "verify": {"metric": "l1"},
            "backends": [{"target": "onnx", "opset": 9}],
            "passes": [{"pass": "low_rank", "rank": {"param_ratio": 1.5}}],
        }
    )
    assert "'forward'" in found["capture.mode"]
    assert "'rel_l2'" in found["verify.metric"]
    assert "18" in found["backends[0].opset"]
    assert "passes[0].rank.param_ratio" in found


def test_missing_required_field():
    assert "required" in problems({"passes": [{"pass": "low_rank"}]})["passes[0].rank"]


def test_top_level_unknown_field():
    assert "allowed fields" in problems({"verison": 1})["verison"]


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text('{"passes": [')
    with pytest.raises(SpecError, match="not valid JSON") as info:
        load_spec(path)
    assert str(path) in str(info.value)
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.json")


def test_round_trip_through_json(tmp_path):
    spec = load_spec({"passes": [{"pass": "low_rank", "rank": 8}]})
    path = tmp_path / "spec.json"
    path.write_text(spec.model_dump_json(by_alias=True))
    assert load_spec(path) == spec


def test_json_schema_has_the_pass_discriminator():
    schema = json_schema()
    passes = schema["properties"]["passes"]["items"]
    assert passes["discriminator"]["propertyName"] == "pass"
    assert "low_rank" in passes["discriminator"]["mapping"]
    json.dumps(schema)


def test_spec_objects_are_frozen():
    spec = Spec()
    with pytest.raises(Exception, match="frozen"):
        spec.version = 2


EXAMPLE_SPECS = sorted(
    str(p) for p in Path("examples").rglob("*.json") if p.name not in {"config.json", "train_log.json"}
)


@pytest.mark.parametrize("path", EXAMPLE_SPECS)
def test_example_specs_validate(path):
    assert load_spec(path).passes


def test_every_pass_has_an_example_spec():
    from graphpress.passes.registry import registered

    assert len(EXAMPLE_SPECS) >= 10
    # a pass alone, or after the one pass it needs before it (distill recovers what a lossy pass lost)
    last = {load_spec(p).passes[-1].pass_ for p in EXAMPLE_SPECS if len(load_spec(p).passes) <= 2}
    assert last >= set(registered())


def test_gqa_to_mla_errors_name_the_json_path():
    found = problems({"passes": [{"pass": "gqa_to_mla", "rope": {"mode": "decoupled", "dimz": 16}}]})
    assert "did you mean 'dims'" in found["passes[0].rope.dimz"]
    found = problems({"capture": {"mode": "prefill"}})
    assert "'forward'" in found["capture.mode"] and "'decode'" in found["capture.mode"]
