"""MLIR backend: torch-mlir's four dialects for the example LM, compressed formats decomposed to aten."""

from __future__ import annotations

import hashlib

import pytest
import torch

from graphpress import BackendError, SpecError, compress
from graphpress.backends import build_backend
from graphpress.backends.mlir import decomposed, parse_and_verify
from graphpress.ir import capture
from graphpress.passes import PassContext, build_pass
from graphpress.schema import MlirBackendConfig, load_spec

DIALECTS = ["torch", "linalg-on-tensors", "stablehlo", "tosa"]
FORMATS = [  # one compressed format per layer: every graphpress op reaches the MLIR
    {"pass": "nm_sparsity", "targets": "layers.0.mlp.*"},
    {"pass": "weight_clustering", "targets": "layers.1.mlp.*", "bits": 4},
    {"pass": "shift_add", "targets": "layers.2.mlp.*"},
]


def mlir_backend(**fields):
    return build_backend(MlirBackendConfig(target="mlir", **fields), "backends[2]")


@pytest.fixture(scope="module")
def calibration():
    gen = torch.Generator().manual_seed(3)
    return [(torch.randint(0, 256, (2, 20), generator=gen),)]


def rewritten(graph, calibration, *passes):
    ctx = PassContext(calibration)
    for config in load_spec({"passes": list(passes)}).passes:
        graph = build_pass(config).run(graph, ctx).graph
    return graph


@pytest.fixture(scope="module")
def compressed_lm(trained_llama, calibration):
    return rewritten(capture(trained_llama, calibration[0]), calibration, *FORMATS)


def test_decompositions_leave_only_aten_and_compute_the_same(compressed_lm, calibration):
    formats = {str(n.target) for n in compressed_lm.nodes if str(n.target).startswith("graphpress.")}
    assert formats == {
        "graphpress.nm_weight.default",
        "graphpress.lut_weight.default",
        "graphpress.shift_weight.default",
    }
    program = decomposed(compressed_lm)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "graphpress" in t]
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(0))  # another batch and length
    torch.testing.assert_close(program.module()(ids), compressed_lm.module()(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dialect", DIALECTS)
def test_example_lm_with_every_format_emits_each_dialect(compressed_lm, calibration, tmp_path, dialect):
    record = mlir_backend(dialect=dialect).build(compressed_lm, calibration, tmp_path)
    path = tmp_path / f"model.{dialect}.mlir"
    assert record.artifact == str(path) and [p.name for p in tmp_path.iterdir()] == [path.name]
    text = path.read_text()
    assert "graphpress" not in text and "torch.operator" not in text
    ops = parse_and_verify(text, dialect)  # an independent re-parse of the written file: op -> uses
    prefix = {"torch": "torch.aten.", "linalg-on-tensors": "linalg.", "stablehlo": "stablehlo.", "tosa": "tosa."}
    assert sum(count for op, count in ops.items() if op.startswith(prefix[dialect])) > 100
    signature = next(line for line in text.splitlines() if "func.func @main" in line)
    if dialect == "tosa":
        assert "tensor<2x20xi64>" in signature and record.details["static_shapes"] == [[2, 20]]
    else:
        assert "?" in signature and record.details["static_shapes"] is None
    assert record.errors["rel_l2"] < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("dialect", ["torch", "tosa"])
def test_decode_step(trained_llama, calibration, tmp_path, dialect):
    graph = capture(trained_llama, calibration[0], mode="decode")
    record = mlir_backend(dialect=dialect).build(graph, calibration, tmp_path)
    text = (tmp_path / f"model.{dialect}.mlir").read_text()
    signature = next(line for line in text.splitlines() if "func.func @main" in line)
    assert signature.count("%arg") == 3 + len(graph.cache)  # ids, mask, positions, the cache tensors
    assert record.errors["rel_l2"] < 1e-6
    if dialect == "tosa":  # one step after 8 cached tokens, cache (B, kv_heads, 8, head_dim)
        assert record.details["static_shapes"][1:4] == [[2, 9], [2, 1], [2, 2, 8, 32]]


def test_kv_cache_quant_decode_steps_are_refused_clearly(trained_llama, calibration, tmp_path):
    graph = capture(trained_llama, calibration[0], mode="decode")
    graph = rewritten(graph, calibration, {"pass": "kv_cache_quant", "residual": 4})
    with pytest.raises(
        BackendError,
        match=r"backends\[2\]: decode steps with a quantized KV cache \(kv_cache_quant\) are not lowered to MLIR",
    ):
        mlir_backend(dialect="torch").build(graph, calibration, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_same_graph_same_bytes(tiny_llama, tmp_path):
    ids = torch.randint(0, 256, (1, 8))
    digests = []
    for run in range(2):
        mlir_backend(dialect="stablehlo").build(capture(tiny_llama, (ids,)), [(ids,)], tmp_path / str(run))
        digests.append(hashlib.sha256((tmp_path / str(run) / "model.stablehlo.mlir").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_spec_fields():
    spec = load_spec({"backends": [{"target": "mlir"}, {"target": "mlir", "dialect": "tosa", "filename": "m.mlir"}]})
    first, second = spec.backends
    assert (first.dialect, first.output_file, first.static) == (
        "linalg-on-tensors",
        "model.linalg-on-tensors.mlir",
        False,
    )
    assert (second.output_file, second.static) == ("m.mlir", True)
    with pytest.raises(SpecError, match=r"backends\[0\]\.static_shapes: tosa takes static shapes only"):
        load_spec({"backends": [{"target": "mlir", "dialect": "tosa", "static_shapes": False}]})
    with pytest.raises(SpecError, match=r"backends\[0\]\.dialect: .*'linalg-on-tensors'"):
        load_spec({"backends": [{"target": "mlir", "dialect": "llvm"}]})
    with pytest.raises(
        SpecError, match=r"backends\[1\]\.filename: 'model\.torch\.mlir' is also written by backends\[0\]"
    ):
        load_spec({"backends": [{"target": "mlir", "dialect": "torch"}, {"target": "mlir", "dialect": "torch"}]})


@pytest.mark.slow
def test_compress_with_two_mlir_backends(tmp_path):
    spec = {
        "calibration": {"samples": 1, "seq_len": 16},
        "passes": [{"pass": "weight_clustering", "targets": "layers.*.mlp.*", "bits": 4}],
        "backends": [{"target": "mlir", "dialect": "torch"}, {"target": "mlir", "dialect": "tosa"}],
    }
    result = compress("examples/tiny_llama", spec, out_dir=tmp_path)
    assert result.artifacts["mlir"] == tmp_path / "model.torch.mlir"
    assert result.artifacts["backends[1]"] == tmp_path / "model.tosa.mlir"
    assert [b["details"]["dialect"] for b in result.report.backends] == ["torch", "tosa"]


def test_missing_torch_mlir_is_named(tiny_llama, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch_mlir" else find_spec(name, *a)
    )
    ids = torch.randint(0, 256, (1, 8))
    with pytest.raises(
        BackendError, match=r"backends\[2\]: the mlir backend needs torch_mlir: pip install 'graphpress\[mlir\]'"
    ):
        mlir_backend().build(capture(tiny_llama, (ids,)), [(ids,)], tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("batch", [1, 2])
def test_the_second_shape_check_finds_a_batch_the_decomposition_pinned(tiny_llama, tmp_path, batch):
    """Decomposing re-traces at the calibration shapes: from a batch of 1 the program keeps batch 1 as a constant,
    which validating at a second shape (2 x 4) now finds and says, with what to do; from a batch of 2 the program
    takes other batches, and is validated at both shapes."""
    ids = torch.randint(0, 256, (batch, 8), generator=torch.Generator().manual_seed(0))
    backend = mlir_backend(dialect="torch")
    record = backend.build(capture(tiny_llama, (ids,)), [(ids,)], tmp_path)
    if batch == 1:
        assert backend.validated_shapes == ["1x8"]
        [warning] = backend.shape_warnings
        assert "runs at 1x8 but not at 2x4" in warning and "calibrate with a batch of 2 or more" in warning
    else:
        assert backend.validated_shapes == ["2x8", "3x4"] and not backend.shape_warnings
    assert record.errors["rel_l2"] < 1e-5
