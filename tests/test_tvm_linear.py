"""TVM backend's fused compressed linears: each format's kernel equals the unfused linear on all three paths."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")
pytest.importorskip("scipy_openblas32")

from graphpress.backends import build_backend, tvm_blas, tvm_linear  # noqa: E402
from graphpress.backends.fuse_linear import fuse_format_linears  # noqa: E402
from graphpress.backends.tvm import TvmBackend  # noqa: E402
from graphpress.ir import capture  # noqa: E402
from graphpress.ir.ops import int_weight  # noqa: E402
from graphpress.passes import PassContext, build_pass  # noqa: E402
from graphpress.runtime import TorchDecoder, TvmDecoder, greedy_generate  # noqa: E402
from graphpress.schema import TvmBackendConfig, load_spec  # noqa: E402

from . import families  # noqa: E402
from .test_tvm_forms import compressed  # noqa: E402

ROWS = [1, 3, 8, 9, 40]
"""M = 1 (one row in registers); 3 and 8 (tiles of 4, the first ragged); 9 and 40 (decoded once, BLAS)."""


def fused_library(graph, tmp_path):
    import tvm
    from tvm import relax

    blas = tvm_blas.find()
    mod = TvmBackend.import_graph(graph, blas)
    library = tmp_path / "model.so"
    blas.copy_beside(library)
    tvm.compile(mod, target="llvm").export_library(str(library), options=blas.export_options())
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    return lambda x: vm["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()


@pytest.mark.parametrize(
    "passes",
    [
        [{"pass": "weight_quant", "method": "rtn", "bits": 2, "group_size": 16}],
        [{"pass": "weight_quant", "method": "rtn", "bits": 4, "group_size": "channel"}],
        [{"pass": "weight_quant", "method": "rtn", "bits": 8, "group_size": 16, "symmetric": True}],
        [{"pass": "weight_clustering", "bits": 1, "granularity": "group", "group_size": 16}],
        [{"pass": "weight_clustering", "bits": 4, "granularity": "group", "group_size": 16}],
        [{"pass": "shift_add"}],
        [{"pass": "shift_add", "min_exponent": -126, "max_exponent": -1}],
        [{"pass": "nm_sparsity"}],
        [{"pass": "nm_sparsity", "n": 1, "m": 4}],
        [{"pass": "nm_sparsity", "n": 5, "m": 16}],
        [{"pass": "nm_sparsity"}, {"pass": "weight_clustering", "bits": 3, "group_size": 16}],
    ],
    ids=["int2", "int4-channel", "int8-symmetric", "lut1", "lut4", "shift4", "shift8", "nm2:4", "nm1:4", "nm5:16"]
    + ["nm2:4-clustered"],
)
def test_fused_kernel_matches_the_unfused_linear_for_every_row_count(passes, tmp_path):
    graph, _ = compressed(*passes)
    fused, counts = fuse_format_linears(graph, tvm_linear.decodes)
    assert sum(counts.values()) == 2
    run = fused_library(fused, tmp_path)
    for rows in ROWS:
        x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
        np.testing.assert_allclose(run(x), graph.module()(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_parallel_tasks_cover_every_output_row(tmp_path):
    """Enough weights for TVM's thread pool, and a row count that is no multiple of TASK_ROWS."""
    model = torch.nn.Linear(256, 4100).eval()
    x = torch.randn(2, 256)
    graph = capture(model, (x,))
    ctx = PassContext([(x,)])
    for config in load_spec({"passes": [{"pass": "weight_quant", "method": "rtn", "bits": 4}]}).passes:
        graph = build_pass(config).run(graph, ctx).graph
    assert tvm_linear.PARALLEL_WEIGHTS <= 4100 * 256 and 4100 % tvm_linear.TASK_ROWS
    run = fused_library(fuse_format_linears(graph, tvm_linear.decodes)[0], tmp_path)
    for rows in ROWS:
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
        np.testing.assert_allclose(run(x), graph.module()(x).detach().numpy(), rtol=1e-5, atol=1e-4)


def test_a_library_of_fused_linears_only_links_the_blas_for_its_prompt_path(tmp_path):
    """No plain matmul is left to offload, yet rows above FUSED_ROWS call sgemm: the folder carries the BLAS,
    and runs them in a fresh process that has only tvm and numpy."""
    graph, x = compressed({"pass": "weight_quant", "method": "rtn", "bits": 4, "group_size": 16})
    built = tmp_path / "built"
    record = build_backend(TvmBackendConfig(target="tvm"), "backends[1]").build(graph, [(x,)], built)
    assert record.details["fused_linears"] == {"graphpress::int_linear": 2}
    assert record.details["blas"]["matmuls"] == 0 and (built / "libscipy_openblas.so").exists()
    rows = torch.randn(tvm_linear.FUSED_ROWS + 5, 64)
    np.save(tmp_path / "x.npy", rows.numpy())
    script = (
        "import sys, numpy as np, tvm\n"
        "from tvm import relax\n"
        "vm = relax.VirtualMachine(tvm.runtime.load_module(sys.argv[1]), tvm.cpu())\n"
        "np.save(sys.argv[3], vm['main'](tvm.runtime.tensor(np.load(sys.argv[2])))[0].numpy())\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(built / "model.so"), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        check=True,
        env={**os.environ, "PYTHONPATH": ""},
        cwd="/",
    )
    expected = graph.module()(rows).detach().numpy()
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "spec",
    [{"pass": "weight_quant", "method": "rtn", "bits": 3, "group_size": 32}, {"pass": "nm_sparsity", "n": 3, "m": 8}],
    ids=["int3", "nm3:8"],
)
def test_codes_straddling_bytes_keep_the_rebuild(spec):
    """3-bit codes (and 3-bit positions: N:8) cross byte boundaries: no kernel here decodes them, so the pair
    stays unfused."""
    graph, _ = compressed(spec)
    assert fuse_format_linears(graph, tvm_linear.decodes)[1].total() == 0


@pytest.mark.parametrize("out_features, parallel", [(48, 1), (4096, 3)])
def test_kernel_paths_are_chosen_by_rows(out_features, parallel):
    """One PrimFunc: a branch for M == 1, one for tiles up to FUSED_ROWS, then the decode-once BLAS path. The
    prompt path decodes on TVM's thread pool, the register paths only from PARALLEL_WEIGHTS weights."""
    codes = torch.zeros(out_features, 256 // 16, 8, dtype=torch.uint8)
    rows = int_weight.int_weight_rows(codes, torch.ones(out_features, 16), None, 4, 16, 256)
    script = tvm_linear.linear_kernel(rows, tvm_blas.find(), True, "k").script()
    assert "m == T.int64(1)" in script and f"m <= T.int64({tvm_linear.FUSED_ROWS})" in script
    assert script.count("T.parallel") == parallel and "scipy_cblas_sgemm" in script


@pytest.mark.parametrize(
    "family, spec, op",
    [
        ("qwen3", {"pass": "weight_quant", "bits": 4, "group_size": 16}, "int_linear"),
        ("phi3", {"pass": "weight_clustering", "bits": 4, "group_size": 16}, "lut_linear"),
    ],
)
def test_default_config_families_decode_with_fused_kernels(family, spec, op, tmp_path):
    """transformers models from their default configs (use_cache on; Phi-3 with its fused qkv and gate_up),
    compressed, as decode graphs: every
    linear (2 layers x 7, and the LM head) is one kernel, and generation (the prompt on BLAS, steps of 1 and
    2 rows in registers) picks eager's tokens."""
    pytest.importorskip("transformers")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    graph = capture(families.build(family), (ids,), mode="decode")
    ctx = PassContext([(ids,)])
    for config in load_spec({"passes": [spec]}).passes:
        graph = build_pass(config).run(graph, ctx).graph
    record = build_backend(TvmBackendConfig(target="tvm"), "backends[1]").build(graph, [(ids,)], tmp_path)
    assert record.errors["rel_l2"] < 1e-5
    assert record.details["fused_linears"] == {f"graphpress::{op}": 15}
    decoder = TvmDecoder(tmp_path / "model.so")
    for prompt in (ids[:1, :9], ids[:, :9]):
        assert torch.equal(greedy_generate(decoder, prompt, 6), greedy_generate(TorchDecoder(graph), prompt, 6))
