"""TVM backend's BLAS offload: which matmuls become GEMM calls, and that they compute what torch does."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")
pytest.importorskip("scipy_openblas32")

from graphpress.backends import build_backend, tvm_blas  # noqa: E402
from graphpress.errors import BackendError  # noqa: E402
from graphpress.ir import capture  # noqa: E402
from graphpress.schema import TvmBackendConfig  # noqa: E402


def offloaded(module, inputs, tmp_path):
    """(outputs of the library built with every offloadable matmul on BLAS, how many were offloaded)."""
    from tvm.relax.frontend.torch import from_exported_program

    mod = from_exported_program(torch.export.export(module, inputs))
    return run_offloaded(mod, [x.numpy() for x in inputs], tmp_path)


def run_offloaded(mod, arrays, tmp_path):
    import tvm
    from tvm import relax

    blas = tvm_blas.find()
    mod, count = tvm_blas.offload(mod, blas)
    library = tmp_path / "model.so"
    blas.copy_beside(library)
    tvm.compile(mod, target="llvm").export_library(str(library), options=blas.export_options())
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    out = vm["main"](*map(tvm.runtime.tensor, arrays))
    return [o.numpy() for o in ([out] if hasattr(out, "numpy") else out)], count


class Products(torch.nn.Module):
    """One of each form: linear (weight transposed), batched, transposed left, broadcast, causal attention."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(32, 48), torch.nn.Linear(48, 16, bias=False)

    def forward(self, x, q, k):
        return (
            self.down(self.up(x)),  # (2, 5, 32): leading dims folded into one GEMM's rows
            q @ k.transpose(-1, -2),  # batched, keys transposed by the flag
            q.transpose(-1, -2) @ q,  # left operand transposed
            q[:1, :1] @ k.transpose(-1, -2),  # a left batch of one: stride 0
            torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True),
            torch.nn.functional.scaled_dot_product_attention(q, k, k, scale=0.3),
            torch.nn.functional.scaled_dot_product_attention(q, k[:, :1], k[:, :1], enable_gqa=True),  # MQA
        )


def test_every_product_form_matches_torch(tmp_path):
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 5, 32, generator=gen), torch.randn(2, 4, 7, 8, generator=gen))
    inputs += (torch.randn(2, 4, 7, 8, generator=gen),)
    module = Products().eval()
    outs, count = offloaded(module, inputs, tmp_path)
    assert count == 2 + 3 + 2 * 3
    for ours, expected in zip(outs, module(*inputs), strict=True):
        np.testing.assert_allclose(ours, expected.detach().numpy(), rtol=1e-5, atol=1e-5)


class Broadcast(torch.nn.Module):
    def forward(self, a, b):
        return a @ b


@pytest.mark.parametrize(
    "a, b, count",
    [
        ((2, 3, 4, 5), (3, 5, 6), 1),  # export spells the broadcast out (expand, bmm): BLAS takes the bmm
        ((2, 4, 5), (5,), 0),  # a vector
    ],
)
def test_broadcasts_and_vectors(tmp_path, a, b, count):
    a, b = torch.randn(*a), torch.randn(*b)
    (out,), offloads = offloaded(Broadcast(), (a, b), tmp_path)
    assert offloads == count
    np.testing.assert_allclose(out, (a @ b).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "a, b",
    [
        ((2, 4, 7, 8), (2, 1, 8, 5)),  # one right matrix per batch, broadcast over heads: a loop over the batch
        ((1, 4, 7, 8), (3, 1, 8, 5)),  # each side broadcast along one dim
        ((4, 7, 8), (2, 4, 8, 5)),  # ranks differ
    ],
)
def test_batch_dims_broadcast_one_by_one(tmp_path, a, b):
    """Relax matmuls as the attention rewrite emits them (torch.export would have spelled the broadcast out)."""
    from tvm import relax

    a, b = (
        np.random.default_rng(0).standard_normal(a, "float32"),
        np.random.default_rng(1).standard_normal(b, "float32"),
    )
    builder = relax.BlockBuilder()
    x, y = relax.Var("a", relax.TensorType(a.shape, "float32")), relax.Var("b", relax.TensorType(b.shape, "float32"))
    with builder.function("main", [x, y]):
        with builder.dataflow():
            out = builder.emit_output(relax.op.matmul(x, y))
        builder.emit_func_output(out)
    (ours,), count = run_offloaded(builder.get(), [a, b], tmp_path)
    assert count == 1
    np.testing.assert_allclose(ours, a @ b, rtol=1e-5, atol=1e-5)


def test_other_dtypes_stay_with_tvm(tmp_path):
    a, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    (out,), count = offloaded(Broadcast(), (a, b), tmp_path)  # TVM's importer returns it in float32
    assert count == 0
    np.testing.assert_allclose(out, (a @ b).numpy(), rtol=1e-5, atol=1e-6)


LINEAR = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()


@pytest.fixture(scope="module")
def small_graph():
    return capture(LINEAR, (torch.randn(2, 8),))


def test_none_keeps_tvm_loops_and_the_folder_without_blas(small_graph, tmp_path):
    record = build_backend(TvmBackendConfig(target="tvm", blas="none"), "backends[0]").build(
        small_graph, [(torch.randn(3, 8),)], tmp_path
    )
    assert sorted(os.listdir(tmp_path)) == ["model.so", "model.so.json"]
    assert record.details["blas"] is None


def test_openblas_without_the_package_is_refused_by_field(small_graph, tmp_path, monkeypatch):
    monkeypatch.setattr(tvm_blas, "find", lambda: None)
    backend = build_backend(TvmBackendConfig(target="tvm", blas="openblas"), "backends[0]")
    with pytest.raises(BackendError, match=r"backends\[0\]\.blas: 'openblas' needs the scipy-openblas32 package"):
        backend.build(small_graph, [(torch.randn(3, 8),)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_runtime_sets_the_blas_threads_of_the_library_beside(small_graph, tmp_path):
    from graphpress.runtime import TvmModule, blas_library

    build_backend(TvmBackendConfig(target="tvm", blas="openblas"), "backends[0]").build(
        small_graph, [(torch.randn(3, 8),)], tmp_path
    )
    x = torch.randn(5, 8)
    (out,) = TvmModule(tmp_path / "model.so", blas_threads=1)(x)
    assert blas_library("libscipy_openblas.so").scipy_openblas_get_num_threads() == 1
    torch.testing.assert_close(out, LINEAR(x).detach(), rtol=1e-5, atol=1e-5)
