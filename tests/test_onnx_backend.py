"""ONNX backend: onnxruntime parity, dynamic axes, atomic writes, same graph => same bytes."""

import os

import onnx
import pytest
import torch

from graphpress import BackendError, compress
from graphpress.backends import OnnxBackend
from graphpress.backends.base import Comparison
from graphpress.fileio import staging_dir
from graphpress.ir import capture
from graphpress.schema import OnnxBackendConfig


@pytest.fixture(scope="module")
def graph(tiny_llama):
    return capture(tiny_llama, (torch.randint(0, 256, (2, 16)),))


def backend(**kw):
    return OnnxBackend(OnnxBackendConfig(target="onnx", **kw), "backends[0]")


def test_export_runs_in_onnxruntime_with_dynamic_shapes(graph, tmp_path):
    inputs = [(torch.randint(0, 256, (1, 7)),), (torch.randint(0, 256, (3, 33)),)]  # not the capture shape
    record = backend().build(graph, inputs, tmp_path)
    assert record.errors["rel_l2"] < 1e-5
    assert os.listdir(tmp_path) == ["model.onnx"]
    assert record.files == {"model.onnx": (tmp_path / "model.onnx").stat().st_size}
    assert record.op_histogram["MatMul"] >= 15
    model = onnx.load(tmp_path / "model.onnx")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in dims)  # batch and sequence are symbolic
    onnx.checker.check_model(model)


def test_same_graph_gives_the_same_bytes(graph, tmp_path):
    inputs = [(torch.randint(0, 256, (2, 8)),)]
    backend().build(graph, inputs, tmp_path / "a")
    backend().build(graph, inputs, tmp_path / "b")
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()


def test_node_metadata_only_when_asked(graph, tmp_path):
    inputs = [(torch.randint(0, 256, (2, 8)),)]
    plain = backend().build(graph, inputs, tmp_path / "a")
    debug = backend(node_metadata=True).build(graph, inputs, tmp_path / "b")
    stripped, kept = (onnx.load(tmp_path / d / "model.onnx") for d in "ab")
    assert not any(node.metadata_props for node in stripped.graph.node)  # no source paths: same bytes anywhere
    assert any("stack_trace" in prop.key for node in kept.graph.node for prop in node.metadata_props)
    assert plain.files["model.onnx"] < debug.files["model.onnx"]


def test_external_data_when_asked(graph, tmp_path):
    record = backend(external_data="always").build(graph, [(torch.randint(0, 256, (2, 8)),)], tmp_path)
    assert sorted(record.files) == ["model.onnx", "model.onnx.data"]
    assert record.files["model.onnx"] < record.files["model.onnx.data"]
    assert record.errors["rel_l2"] < 1e-5


def test_failed_validation_leaves_nothing_behind(graph, tmp_path, monkeypatch):
    monkeypatch.setattr(OnnxBackend, "validate", lambda *a: Comparison({"rel_l2": 1.0, "max_abs": 1.0}))
    with pytest.raises(BackendError, match=r"backends\[0\]: onnxruntime output differs"):
        backend().build(graph, [(torch.randint(0, 256, (2, 8)),)], tmp_path)
    assert os.listdir(tmp_path) == []


def test_staging_dir_is_removed_on_error(tmp_path):
    with pytest.raises(RuntimeError), staging_dir(tmp_path) as tmp:
        (tmp / "half.onnx").write_bytes(b"partial")
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_rewritten_graph_captured_at_batch_1_stays_dynamic(tiny_llama, tmp_path):
    """Regression: computing new nodes' metadata must not guard the size-1 example batch (Eq(s0, 1))."""
    from graphpress.passes import PassContext, build_pass
    from graphpress.schema import load_spec

    graph = capture(tiny_llama, (torch.randint(0, 256, (1, 16)),))
    spec = load_spec({"passes": [{"pass": "low_rank", "targets": "layers.*.mlp.*", "rank": 8}]})
    rewritten = build_pass(spec.passes[0]).run(graph, PassContext([(torch.randint(0, 256, (1, 16)),)])).graph
    record = backend().build(rewritten, [(torch.randint(0, 256, (4, 9)),)], tmp_path)
    assert record.errors["rel_l2"] < 1e-5
    output = onnx.load(tmp_path / "model.onnx").graph.output[0]
    assert all(d.dim_param for d in output.type.tensor_type.shape.dim[:2])


def _io(path) -> dict:
    """{name: [dimension name or size, ...]} of an ONNX file's inputs and outputs."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*graph.input, *graph.output]
    }


@pytest.mark.parametrize("mode", ["forward", "decode"])
def test_conventional_io_and_dimension_names(tiny_llama, hf_llama, tmp_path, mode):
    """What onnxruntime-genai-style runtimes expect: input_ids / attention_mask / position_ids /
    past_key_values.<i>.key in,
    logits / present.<i>.key out; batch_size, sequence_length, past_ and total_sequence_length, not s72."""
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    spec = {"capture": {"mode": mode}, "verify": {"max": 1.0}, "backends": [{"target": "onnx"}]}
    compress(hf_llama, spec, (ids,), calibration_data=[(ids,)], out_dir=tmp_path / "hf", progress=False)
    io = _io(tmp_path / "hf" / "model.onnx")
    if mode == "forward":
        assert io == {"input_ids": ["batch_size", "sequence_length"], "logits": ["batch_size", "sequence_length", 128]}
        compress(tiny_llama, spec, (ids,), calibration_data=[(ids,)], out_dir=tmp_path / "own", progress=False)
        assert _io(tmp_path / "own" / "model.onnx")["output"] == ["batch_size", "sequence_length", 256]
    else:
        names = ["input_ids", "attention_mask", "position_ids"]
        names += [f"past_key_values.{i}.{kv}" for i in (0, 1) for kv in ("key", "value")]
        names += ["logits"] + [f"present.{i}.{kv}" for i in (0, 1) for kv in ("key", "value")]
        assert list(io) == names
        assert io["input_ids"] == io["position_ids"] == ["batch_size", "sequence_length"]
        assert io["attention_mask"] == ["batch_size", "total_sequence_length"]
        assert io["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 16]
        assert io["present.0.key"] == ["batch_size", 2, "total_sequence_length", 16]
        assert io["logits"] == ["batch_size", "sequence_length", 128]
