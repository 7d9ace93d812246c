"""compress() and the CLI end to end: capture -> passes -> verify -> ONNX -> report."""

import json
import subprocess
import sys

import pytest
import torch

from graphpress import SpecError, VerificationError, compress
from graphpress.cli import main

from .conftest import rel_err, state_hash

SPEC = {
    "passes": [{"pass": "low_rank", "targets": "layers.*.mlp.*", "rank": {"param_ratio": 0.5}}],
    "verify": {"max": 1.0},
}


def test_compress_module_end_to_end(tiny_llama, token_batch, tmp_path):
    before = state_hash(tiny_llama)
    calibration = [(torch.randint(0, 256, (2, 16)),) for _ in range(2)]
    result = compress(tiny_llama, SPEC, (token_batch,), calibration_data=calibration, out_dir=tmp_path)
    assert state_hash(tiny_llama) == before  # the user's model is untouched

    assert {"onnx", "report_json", "report_md", "report_html"} <= set(result.artifacts)
    assert all(
        name.startswith("plot:") for name in set(result.artifacts) - {"onnx", "report_json", "report_md", "report_html"}
    )
    assert result.artifacts["onnx"] == tmp_path / "model.onnx"
    report = json.loads((tmp_path / "report.json").read_text())
    (low_rank,) = report["passes"]
    assert low_rank["name"] == "low_rank" and len(low_rank["layers"]) == 6
    for layer in low_rank["layers"]:
        assert layer["params_after"] < layer["params_before"]
        assert 0 < layer["details"]["output_error"] < 1
    assert report["compressed"]["params"] < report["original"]["params"]
    assert low_rank["verification"]["passed"]
    onnx_record = report["backends"][0]
    assert onnx_record["errors"]["rel_l2"] <= onnx_record["tolerance"]

    x = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert rel_err(result.model(x), result.graph(x)) == 0
    md = (tmp_path / "report.md").read_text()
    assert "layers.0.mlp.up_proj" in md and "## backend: onnx" in md


def test_verification_failure_stops_before_backends(tiny_llama, token_batch, tmp_path):
    spec = {**SPEC, "verify": {"max": 1e-6}}
    with pytest.raises(VerificationError, match=r"passes\[0\] \(low_rank\)"):
        compress(tiny_llama, spec, (token_batch,), out_dir=tmp_path)
    assert not (tmp_path / "model.onnx").exists()


def test_compress_without_example_inputs_is_a_clear_error(tiny_llama):
    with pytest.raises(Exception, match="needs example_inputs"):
        compress(tiny_llama, SPEC)


@pytest.mark.slow
def test_cli_on_the_bundled_example(tmp_path, trained_llama):
    """The README's main job: compress examples/tiny_llama with its spec."""
    before = state_hash(trained_llama)
    code = main(
        [
            "compress",
            "--model",
            "examples/tiny_llama",
            "--spec",
            "examples/tiny_llama/spec.json",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    assert {"model.onnx", "report.json", "report.md"} <= {p.name for p in tmp_path.iterdir()}
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["calibration"]["source"] == "model directory"
    assert report["backends"][0]["errors"]["rel_l2"] < 1e-4
    assert state_hash(trained_llama) == before


def test_cli_typo_names_the_field(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"passes": [{"pass": "low_rank", "rnak": 8}]}))
    code = main(["compress", "--model", "examples/tiny_llama", "--spec", str(spec), "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "passes[0].rnak" in err and "did you mean 'rank'" in err
    assert not (tmp_path / "out").exists()


def test_cli_schema_prints_json():
    out = subprocess.run([sys.executable, "-m", "graphpress", "schema"], capture_output=True, text=True, check=True)
    schema = json.loads(out.stdout)
    assert "passes" in schema["properties"]


def test_spec_errors_are_typed():
    with pytest.raises(SpecError):
        compress(torch.nn.Linear(2, 2), {"passes": [{"pass": "nope"}]}, (torch.randn(1, 2),))


def test_model_sources():
    from graphpress import CaptureError
    from graphpress.model_source import load_source

    source = load_source("examples.tiny_llama:load_model")
    assert source.example_inputs[0].shape == (1, 64) and source.calibration_batches is not None
    assert load_source("examples/tiny_llama").name == "tiny_llama"
    with pytest.raises(CaptureError, match="must define make_model"):
        load_source("examples.tiny_llama:make_model")
    with pytest.raises(CaptureError, match="cannot import"):
        load_source("no_such_module:f")
    with pytest.raises(CaptureError, match="not a model directory"):
        load_source("no/such/dir")


def test_the_compressed_model_takes_the_calls_the_original_takes(hf_llama, tmp_path):
    """transformers users call with keywords; the compressed model binds them as the captured forward names
    its inputs, and an input that was not captured is a clear error naming what it takes."""
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    result = compress(hf_llama, {"passes": [], "backends": []}, (ids,), out_dir=tmp_path)
    by_keyword = result.model(input_ids=ids).logits
    assert torch.equal(by_keyword, result.model(ids).logits)
    assert rel_err(by_keyword, hf_llama(ids).logits) < 1e-5
    with pytest.raises(TypeError, match=r"takes the inputs it was captured with, \(input_ids\): .*'attention_mask'"):
        result.model(ids, attention_mask=torch.ones_like(ids))


def installed_script() -> str:
    from pathlib import Path

    return str(Path(sys.executable).parent / "graphpress")


def test_the_installed_script_has_a_version_and_finds_modules_in_the_current_directory(tmp_path):
    """`graphpress compress --model examples.tiny_llama:load_model` from the repository root, through the script
    pip installs (whose path starts at its own bin directory, unlike python -m)."""
    import graphpress

    version = subprocess.run([installed_script(), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"graphpress {graphpress.__version__}"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"passes": [], "backends": []}))
    command = [installed_script(), "compress", "--model", "examples.tiny_llama:load_model", "--spec", str(spec)]
    done = subprocess.run([*command, "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "FutureWarning" not in done.stderr
    assert (tmp_path / "out" / "report.json").exists()


def test_a_reader_that_stops_early_is_no_error(tmp_path):
    """`graphpress inspect --json model.onnx | head`: the pipe closes under the writer; no traceback."""
    torch.onnx.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),), str(tmp_path / "m.onnx"), dynamo=False)
    reader = subprocess.Popen(
        [sys.executable, "-m", "graphpress", "inspect", "--json", str(tmp_path / "m.onnx")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    reader.stdout.close()  # before anything is written: the first write meets a closed pipe
    err = reader.stderr.read().decode()
    assert reader.wait() == 0 and "Traceback" not in err, err


@pytest.mark.parametrize(
    "passes, decode, params_shown",
    [
        ([{"pass": "weight_quant", "targets": "layers.*", "bits": 4, "group_size": 32}], False, False),
        ([{"pass": "low_rank", "targets": "layers.*.mlp.*", "rank": 64}], False, True),
        ([{"pass": "kv_cache_quant", "residual": 0, "key": {"axis": "channel", "group_size": 8}}], True, True),
    ],
    ids=["stored format", "low rank", "KV cache"],
)
def test_the_summary_leads_with_stored_bytes(tmp_path, capsys, passes, decode, params_shown):
    """The command line's first line: stored bytes (the report's ratio), the KV cache per token for decode
    graphs, and parameters only where no compressed format keeps the weights as buffers."""
    spec = {"passes": passes, "backends": [], "verify": {"max": 1.0}}
    if decode:
        spec["capture"] = {"mode": "decode"}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    argv = ["compress", "--model", "examples/tiny_llama", "--spec", str(tmp_path / "spec.json")]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    o, c = report["original"], report["compressed"]
    assert line.startswith(f"tiny_llama: stored {o['bytes'] / 2**20:.2f} MiB -> {c['bytes'] / 2**20:.2f} MiB")
    assert f"({c['bytes'] / o['bytes']:.3f}x)" in line
    assert ("KV cache" in line) == decode
    assert ("parameters" in line) == params_shown == (c["format_bytes"] == 0)


def test_tied_weights_count_once():
    """A SmolLM-style Llama ties its LM head to the embedding: one tensor, counted once (as the ONNX file stores it)."""
    transformers = pytest.importorskip("transformers")
    from graphpress.ir import capture

    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    graph = capture(model, (torch.zeros(1, 6, dtype=torch.long),))
    assert graph.summary().params == sum(p.numel() for p in model.parameters())  # parameters() dedups ties
    assert graph.summary().params < sum(p.numel() for p in model.state_dict().values())


def test_data_fitted_passes_are_verified_on_inputs_they_did_not_see(hf_llama, tmp_path):
    """gqa_to_mla at half rank fits its PCA to the example: on it the error is ~1e-7, on new tokens it is not.
    Held-out verification (the default) reports the latter, and the report says what it verified on."""
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    errors = {}
    for data in ("held_out", "calibration"):
        spec = {"passes": [{"pass": "gqa_to_mla", "kv_rank": 32}], "backends": [], "verify": {"max": 10, "data": data}}
        report = compress(hf_llama, spec, (ids,), out_dir=tmp_path / data).report
        errors[data] = report.passes[0]["verification"]["rel_l2"]
        verified = report.calibration["verification"]
        assert (
            verified["source"]
            == {
                "held_out": "random inputs shaped like the example inputs",
                "calibration": "the calibration data (verify.data)",
            }[data]
        )
        assert verified["samples"] == (2 if data == "held_out" else 1)
    assert errors["calibration"] < 1e-5 < 1e-2 < errors["held_out"]
    assert "Verified on 2 batches: random inputs" in (tmp_path / "held_out" / "report.md").read_text()


@pytest.mark.parametrize(
    "given, calibrated, verified", [(4, 2, "held out: the last 2 of 4 batches given"), (1, 1, None)]
)
def test_calibration_data_given_is_partly_held_out_for_verification(tiny_llama, tmp_path, given, calibrated, verified):
    batches = [(torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(i)),) for i in range(given)]
    spec = {"passes": [], "backends": []}
    report = compress(tiny_llama, spec, batches[0], calibration_data=batches, out_dir=tmp_path).report
    assert report.calibration["samples"] == calibrated
    if verified is None:  # one batch: nothing to hold out; verified on it, said
        assert report.calibration["verification"]["source"].startswith("the calibration data itself: one batch")
        assert any(w.startswith("verify: the calibration data itself") for w in report.warnings)
    else:
        assert report.calibration["verification"] == {"samples": 2, "source": verified}


def test_held_out_windows_share_no_token_with_the_calibration_windows():
    from graphpress.calibration import disjoint_starts

    taken = [0, 50, 120]
    chosen = disjoint_starts(200, taken, 3, 20, seed=1)
    assert chosen == disjoint_starts(200, taken, 3, 20, seed=1) and len(chosen) == 3
    windows = [set(range(s, s + 20)) for s in taken + chosen]
    assert all(not (a & b) for i, a in enumerate(windows) for b in windows[i + 1 :])
    assert disjoint_starts(60, [0, 30], 2, 30, seed=1) == []  # no room left
