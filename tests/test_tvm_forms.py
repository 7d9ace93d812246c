"""TVM Relax forms of the weight-format ops (lut, nm, shift, int): converted, compiled for llvm, equal to eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

from graphpress.ir import capture
from graphpress.ir.ops import relax_converters
from graphpress.passes import PassContext, build_pass
from graphpress.schema import load_spec


def compressed(*passes: dict):
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 32)).eval()
    torch.manual_seed(0)
    x = torch.randn(6, 64)
    graph = capture(model, (x,))
    ctx = PassContext([(x,)])
    for config in load_spec({"passes": list(passes)}).passes:
        graph = build_pass(config).run(graph, ctx).graph
    return graph, x


def compile_outputs(graph, x: torch.Tensor) -> list[np.ndarray]:
    mod = from_exported_program(graph.program, custom_convert_map=relax_converters())
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return [o.numpy() for o in vm["main"](tvm.runtime.tensor(x.numpy()))]


def run_tvm(graph, x: torch.Tensor) -> np.ndarray:
    return compile_outputs(graph, x)[0]


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_lut_weight_in_tvm_matches_eager(bits):
    graph, x = compressed({"pass": "weight_clustering", "bits": bits, "granularity": "group", "group_size": 16})
    ops = {str(n.target) for n in graph.nodes if n.op == "call_function"}
    assert "graphpress.lut_weight.default" in ops
    np.testing.assert_allclose(run_tvm(graph, x), graph.module()(x).detach().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 8), (5, 16)])
def test_nm_weight_in_tvm_matches_eager(n, m):
    graph, x = compressed({"pass": "nm_sparsity", "n": n, "m": m})
    np.testing.assert_allclose(run_tvm(graph, x), graph.module()(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_clustered_nm_values_in_tvm_match_eager():
    graph, x = compressed({"pass": "nm_sparsity"}, {"pass": "weight_clustering", "bits": 3, "group_size": 16})
    np.testing.assert_allclose(run_tvm(graph, x), graph.module()(x).detach().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "fields",
    [
        {"bits": 2, "group_size": 16},
        {"bits": 3, "group_size": 32, "symmetric": True},
        {"bits": 4, "group_size": "channel"},
        {"bits": 8, "group_size": 16, "symmetric": True},
    ],
)
def test_int_weight_in_tvm_matches_eager(fields):
    graph, x = compressed({"pass": "weight_quant", "method": "rtn", **fields})
    assert "graphpress.int_weight.default" in {str(n.target) for n in graph.nodes if n.op == "call_function"}
    np.testing.assert_allclose(run_tvm(graph, x), graph.module()(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_quantized_nm_values_in_tvm_match_eager():
    graph, x = compressed({"pass": "nm_sparsity"}, {"pass": "weight_quant", "bits": 4, "group_size": 16})
    np.testing.assert_allclose(run_tvm(graph, x), graph.module()(x).detach().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exponents", [(-6, 0), (-14, -2)])
def test_shift_weight_in_tvm_matches_eager(exponents):
    low, high = exponents
    graph, x = compressed({"pass": "shift_add", "min_exponent": low, "max_exponent": high})
    np.testing.assert_allclose(run_tvm(graph, x), graph.module()(x).detach().numpy(), rtol=1e-5, atol=1e-5)
