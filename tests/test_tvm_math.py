"""tvm_math: float32 transcendentals legalized as polynomials, close to torch, other dtypes left to TVM."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from graphpress.backends import tvm_math  # noqa: E402

F = torch.nn.functional
OPS = {
    "exp": ("exp", torch.exp),
    "tanh": ("tanh", torch.tanh),
    "erf": ("erf", torch.erf),
    "sigmoid": ("sigmoid", torch.sigmoid),
    "silu": ("nn.silu", F.silu),
    "gelu": ("nn.gelu", F.gelu),
    "gelu_tanh": ("nn.gelu_tanh", lambda x: F.gelu(x, approximate="tanh")),
    "softmax": ("nn.softmax", lambda x: torch.softmax(x, -1)),
}
"""Operator -> (its ``relax.op`` name, torch's function)."""
LIBM = ("T.exp(", "T.tanh(", "T.erf(", "T.sigmoid(")
"""TIR intrinsics that LLVM lowers to one libm call per element."""


def legalized(name: str, dtype: str):
    import operator

    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([3, 70], dtype))
    with bb.function("main", [x]):
        bb.emit_func_output(bb.emit(operator.attrgetter(OPS[name][0])(relax.op)(x)))
    return tvm_math.legalize(bb.get(), tvm.target.Target("llvm"))


def tir_text(mod) -> str:
    import tvm

    return "\n".join(f.script() for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc))


def test_every_mapped_operator_is_tested():
    assert {name.rsplit(".", 1)[-1] for name in tvm_math.legalize_map()} == set(OPS)


@pytest.mark.parametrize("name", sorted(OPS))
def test_float32_legalizes_to_a_polynomial_close_to_torch(name):
    import tvm
    from tvm import relax

    mod = legalized(name, "float32")
    assert not any(call in tir_text(mod) for call in LIBM)
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    x = torch.cat([torch.linspace(-90, 90, 70)[None], torch.randn(2, 70, generator=torch.Generator().manual_seed(0))])
    x = x * torch.tensor([[1.0], [4.0], [0.01]])  # the whole range, typical activations, values near 0
    ours = torch.from_numpy(vm["main"](tvm.runtime.tensor(x.numpy())).numpy())
    torch.testing.assert_close(ours, OPS[name][1](x), rtol=5e-6, atol=5e-7)


@pytest.mark.parametrize("name", ["exp", "silu", "softmax"])
def test_other_dtypes_keep_tvms_legalization(name):
    assert any(call in tir_text(legalized(name, "float64")) for call in LIBM)


def test_the_backend_compiles_float32_transcendentals_without_libm(tiny_llama):
    """A Llama decode graph's silu and (masked) softmax reach TIR as polynomials."""
    import tvm

    from graphpress.backends.tvm import TvmBackend
    from graphpress.ir import capture

    mod = TvmBackend.import_graph(capture(tiny_llama, (torch.randint(0, 256, (1, 8)),), mode="decode"))
    text = tir_text(tvm_math.legalize(mod, tvm.target.Target("llvm")))
    assert "fast_exp" in text and not any(call in text for call in LIBM)
