"""TVM backend: every pass's output compiles for llvm and matches eager; the library runs without graphpress."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from graphpress import compress
from graphpress.backends import build_backend
from graphpress.backends import tvm as tvm_module
from graphpress.backends.tvm import step_blas_threads
from graphpress.ir import capture
from graphpress.ir.ops.kv_quant import kv_dequantize, kv_quantize
from graphpress.passes import PassContext, build_pass
from graphpress.runtime import STEP_BLAS_THREADS, TorchDecoder, TvmDecoder, blas_library, greedy_generate, prefill
from graphpress.schema import TvmBackendConfig, load_spec

from .test_tvm_forms import compile_outputs


def tvm_backend(**fields):
    return build_backend(TvmBackendConfig(target="tvm", **fields), "backends[1]")


@pytest.fixture(scope="module")
def calibration():
    gen = torch.Generator().manual_seed(5)
    return [(torch.randint(0, 256, (2, 24), generator=gen),) for _ in range(2)]


def rewritten(graph, calibration, *passes):
    ctx = PassContext(calibration)
    for config in load_spec({"passes": list(passes)}).passes:
        graph = build_pass(config).run(graph, ctx).graph
    return graph


@pytest.mark.slow
def test_example_lm_forward_library_runs_without_graphpress(trained_llama, calibration, tmp_path):
    """Every matmul goes to the BLAS copied beside the library; the folder, moved, loads with tvm alone."""
    graph = capture(trained_llama, calibration[0])
    built = tmp_path / "built"
    record = tvm_backend(blas="openblas").build(graph, calibration, built)
    assert record.errors["rel_l2"] < 1e-5
    assert sorted(os.listdir(built)) == ["libscipy_openblas.so", "model.so", "model.so.json"]
    histogram = record.op_histogram  # every matmul, and both products of each causal attention
    assert record.details["blas"]["matmuls"] == histogram["relax.matmul"] + 2 * histogram["relax.nn.attention"] >= 37
    moved = built.rename(tmp_path / "moved")
    ids = torch.randint(0, 256, (3, 11))  # neither the capture's batch nor its length
    script = (
        "import sys, numpy as np, tvm\n"
        "from tvm import relax\n"
        "vm = relax.VirtualMachine(tvm.runtime.load_module(sys.argv[1]), tvm.cpu())\n"
        "out = vm['main'](tvm.runtime.tensor(np.load(sys.argv[2])))\n"
        "np.save(sys.argv[3], out[0].numpy())\n"
    )
    np.save(tmp_path / "ids.npy", ids.numpy())
    subprocess.run(
        [sys.executable, "-c", script, str(moved / "model.so"), str(tmp_path / "ids.npy"), str(tmp_path / "o.npy")],
        check=True,
        env={**os.environ, "PYTHONPATH": ""},
        cwd="/",
    )
    expected = trained_llama(ids).detach().numpy()
    np.testing.assert_allclose(np.load(tmp_path / "o.npy"), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_decode_library_generates_like_eager(trained_llama, calibration, tmp_path, monkeypatch):
    graph = capture(trained_llama, calibration[0], mode="decode")
    record = tvm_backend().build(graph, calibration, tmp_path)
    assert record.errors["rel_l2"] < 1e-5
    assert "relax.broadcast_to" not in record.op_histogram  # the KV heads are read grouped, not repeated
    meta = json.loads((tmp_path / "model.so.json").read_text())
    assert meta["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"] and meta["cache_layout"]
    prompt = torch.tensor([list(b"def main"), list(b"import o")])
    decoder = TvmDecoder(tmp_path / "model.so", blas_threads=2)
    ours = greedy_generate(decoder, prompt, 12)
    assert torch.equal(ours, greedy_generate(TorchDecoder(graph), prompt, 12))
    if meta["blas"] is not None:  # OpenBLAS's count is per process: each call sets its own
        threads = getattr(blas_library(meta["blas"]["library"]), f"{meta['blas']['prefix']}openblas_get_num_threads")
        assert meta["step_blas_threads"] == STEP_BLAS_THREADS == step_blas_threads(graph)  # 12 MB of weights
        assert threads() == STEP_BLAS_THREADS  # the last call was a step of 2 tokens
        prefill(decoder, prompt)
        assert threads() == 2  # a prompt of 16 tokens: the module's count
        monkeypatch.setattr(tvm_module, "STEP_CACHED_BYTES", 1 << 20)
        assert step_blas_threads(graph) is None  # weights streamed from memory: steps on every thread too
        (tmp_path / "model.so.json").write_text(json.dumps({**meta, "step_blas_threads": None}))
        greedy_generate(TvmDecoder(tmp_path / "model.so", blas_threads=2), prompt, 2)
        assert threads() == 2


MLP = "layers.*.mlp.*"
PASSES = {
    "low_rank": [{"pass": "low_rank", "targets": MLP, "rank": 48}],
    "clustering on 2:4": [
        {"pass": "nm_sparsity", "targets": MLP},
        {"pass": "weight_clustering", "targets": MLP, "bits": 3, "group_size": 16},
    ],
    "shift_add": [{"pass": "shift_add", "targets": MLP, "attention": True}],
    "qkvo_lock": [{"pass": "qkvo_lock"}],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", PASSES)
def test_pass_outputs_build_and_match_eager(trained_llama, calibration, tmp_path, name):
    graph = rewritten(capture(trained_llama, calibration[0]), calibration, *PASSES[name])
    assert tvm_backend().build(graph, calibration, tmp_path).errors["rel_l2"] < 1e-5


@pytest.mark.slow
def test_gqa_to_mla_absorbed_decode_step_builds(trained_llama, calibration, tmp_path):
    graph = capture(trained_llama, calibration[0], mode="decode")
    graph = rewritten(
        graph, calibration, {"pass": "gqa_to_mla", "kv_rank": 48, "rope": {"mode": "decoupled", "dims": 16}}
    )
    assert tvm_backend().build(graph, calibration, tmp_path).errors["rel_l2"] < 1e-5


class KvRoundTrip(torch.nn.Module):
    def __init__(self, bits, group, per_channel, symmetric):
        super().__init__()
        self.args = bits, group, per_channel, symmetric

    def forward(self, x):
        bits, group, per_channel, symmetric = self.args
        packed, scale, zero = kv_quantize(x, bits, group, per_channel, symmetric)
        return kv_dequantize(packed, scale, None if symmetric else zero, bits, group, per_channel), packed


@pytest.mark.parametrize(
    "bits, group, per_channel, symmetric", [(2, 8, True, False), (4, 16, False, True), (8, 4, False, False)]
)
def test_kv_quant_converters_match_eager(bits, group, per_channel, symmetric):
    x = torch.randn(2, 3, 16, 32, generator=torch.Generator().manual_seed(bits))
    model = KvRoundTrip(bits, group, per_channel, symmetric)
    graph = capture(model, (x,), dynamic=False)
    rebuilt, packed = model(x)
    ours = compile_outputs(graph, x)
    assert np.array_equal(ours[1], packed.numpy())  # the same codes, bit for bit
    np.testing.assert_allclose(ours[0], rebuilt.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_kv_cache_quant_decode_steps_build_and_generate_like_eager(trained_llama, calibration, tmp_path):
    """The packed codes and their scales share one length symbol (codes 8 * n, scales n), so
    TVM can prove the dequantize reshape; a window of 4 and key groups of 8 flush within the
    validation's tokens and the 12 generated ones."""
    graph = capture(trained_llama, calibration[0], mode="decode")
    graph = rewritten(
        graph, calibration, {"pass": "kv_cache_quant", "residual": 4, "key": {"axis": "channel", "group_size": 8}}
    )
    record = tvm_backend().build(graph, calibration, tmp_path)
    assert record.errors["rel_l2"] < 1e-5
    assert {"relax.left_shift", "relax.bitwise_and"} <= set(record.op_histogram)  # unpacked in the module
    prompt = torch.tensor([list(b"def main"), list(b"import o")])
    ours = greedy_generate(TvmDecoder(tmp_path / "model.so"), prompt, 12)
    assert torch.equal(ours, greedy_generate(TorchDecoder(graph), prompt, 12))


def test_spec_with_onnx_and_tvm_backends(tmp_path):
    spec = {
        "calibration": {"samples": 1, "seq_len": 16},
        "passes": [{"pass": "weight_clustering", "targets": MLP, "bits": 4}],
        "backends": [{"target": "onnx"}, {"target": "tvm", "filename": "lm.so"}],
    }
    result = compress("examples/tiny_llama", spec, out_dir=tmp_path)
    assert result.artifacts["tvm"] == tmp_path / "lm.so" and (tmp_path / "lm.so.json").exists()
    tvm_record = result.report.backends[1]
    assert tvm_record["target"] == "tvm" and tvm_record["errors"]["rel_l2"] < 1e-5
    with pytest.raises(Exception, match="filename"):
        TvmBackendConfig(target="tvm", filename="model.onnx")


class ScaledAttention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)


@pytest.mark.parametrize("blas", ["none", "openblas"])
def test_attention_keeps_its_scale(tmp_path, blas):
    """TVM's importer drops SDPA's scale; the backend folds it into q (TransMLA's widened q/k rely on it)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, d, generator=gen) for d in (16, 16, 8))
    graph = capture(ScaledAttention(), (q, k, v))
    assert tvm_backend(blas=blas).build(graph, [(q, k, v)], tmp_path).errors["rel_l2"] < 1e-5


def test_kernels_compile_for_the_cpu_field(tmp_path, monkeypatch):
    """'host' (default) is this machine's CPU, 'generic' the baseline; both match eager, and the sidecar says
    which. A library whose CPU has vector sets this machine lacks warns as it loads."""
    import tvm

    from graphpress import runtime

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, d, generator=gen) for d in (16, 16, 8))
    graph = capture(ScaledAttention(), (q, k, v))
    for cpu, name in [("host", tvm.target.codegen.llvm_get_system_cpu()), ("generic", "generic")]:
        fields = {} if cpu == "host" else {"cpu": cpu}
        record = tvm_backend(**fields).build(graph, [(q, k, v)], tmp_path / cpu)
        assert record.errors["rel_l2"] < 1e-5 and record.details["cpu"] == name
        assert json.loads((tmp_path / cpu / "model.so.json").read_text())["cpu"] == name
    assert runtime.missing_vector_features(tvm.target.codegen.llvm_get_system_cpu()) == []
    monkeypatch.setattr(runtime, "missing_vector_features", lambda cpu: ["avx512f"])
    with pytest.warns(UserWarning, match="compiled for .*lacks avx512f"):
        runtime.TvmModule(tmp_path / "host" / "model.so")


def test_an_unknown_cpu_is_refused_by_field_before_anything_is_written(tmp_path):
    from graphpress.errors import BackendError

    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(BackendError, match=r"backends\[1\]\.cpu: 'pentium-9000' is not a CPU LLVM knows"):
        tvm_backend(cpu="pentium-9000").build(capture(ScaledAttention(), (q, q, q)), [(q, q, q)], tmp_path / "out")
    assert not (tmp_path / "out").exists()
