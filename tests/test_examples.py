"""Every example under examples/ runs: the example LM with each pass alone (the composed spec is
tests/test_report.py's acceptance run), the BERT-like encoder and the ViT for shift_add."""

from __future__ import annotations

import json

import pytest
import torch

from graphpress import compress
from graphpress.model_source import load_source
from graphpress.schema import load_spec

from .conftest import state_hash

ALONE = ["low_rank", "gqa_to_mla", "kv_cache_quant", "nm_sparsity", "weight_clustering", "qkvo_lock", "shift_add"]


def run_example(model_dir: str, spec_path: str, out):
    source = load_source(model_dir)
    before = state_hash(source.model)
    result = compress(source, spec_path, out_dir=out)
    assert state_hash(source.model) == before
    spec = load_spec(spec_path)
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == [p.pass_ for p in spec.passes]
    assert all(p["verification"]["passed"] for p in report["passes"])
    (onnx,) = report["backends"]
    assert onnx["errors"]["rel_l2"] <= onnx["tolerance"] and (out / "model.onnx").stat().st_size > 0
    assert (out / "report.html").stat().st_size > 0
    return result, report


@pytest.mark.slow
@pytest.mark.parametrize("name", ALONE)
def test_example_lm_with_each_pass_alone(name, tmp_path):
    _, report = run_example("examples/tiny_llama", f"examples/tiny_llama/specs/{name}.json", tmp_path)
    (p,) = report["passes"]
    assert p["layers"] and all(layer["action"] != "skipped" for layer in p["layers"])
    if name == "qkvo_lock":
        assert p["verification"]["rel_l2"] < 1e-5  # exact
    elif name in ("gqa_to_mla", "kv_cache_quant"):
        assert report["compressed"]["kv_cache_bytes_per_token"] < report["original"]["kv_cache_bytes_per_token"]
    else:
        assert report["compressed"]["bytes"] < report["original"]["bytes"]


@pytest.mark.slow
def test_bert_encoder_example(tmp_path):
    """A BERT-like encoder (no RoPE, biased projections, post-norm): qkvo_lock is exact, then 2:4 and 4-bit."""
    result, report = run_example("examples/bert_encoder", "examples/bert_encoder/spec.json", tmp_path)
    lock, nm, clustering = report["passes"]
    assert lock["verification"]["rel_l2"] < 1e-5
    assert [layer["path"] for layer in lock["layers"]] == [f"encoder.layer.{i}.attention.self" for i in (0, 1)]
    assert all(layer["details"]["pattern"] == "2:4" for layer in nm["layers"])
    assert len(clustering["layers"]) == 4
    assert report["compressed"]["bytes"] < 0.7 * report["original"]["bytes"]  # the embeddings stay fp32
    assert all(layer["bytes_after"] < 0.5 * layer["bytes_before"] for layer in clustering["layers"])
    ids = torch.randint(0, 1024, (2, 20))
    with torch.no_grad():
        assert result.model(ids)[0].shape == (2, 20, 128)  # other batch and length than captured


@pytest.mark.slow
def test_vit_example_shift_add(tmp_path):
    _, report = run_example("examples/tiny_vit", "examples/tiny_vit/spec.json", tmp_path)
    (p,) = report["passes"]
    blocks = [layer for layer in p["layers"] if layer["action"] == "binarized q/k"]
    shifted = [layer for layer in p["layers"] if layer["action"] == "shift"]
    assert len(blocks) == 2 and all(b["details"]["qk_multiplications_removed_per_pair"] > 0 for b in blocks)
    assert len(shifted) == 12 and all(layer["details"]["bits"] == 4 for layer in shifted)
    assert report["compressed"]["bytes"] < 0.25 * report["original"]["bytes"]
