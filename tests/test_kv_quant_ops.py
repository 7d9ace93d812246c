"""graphpress::kv_quantize / kv_dequantize (KIVI) and their static-scale forms: packing round trips, error bounds,
fake shapes, ONNX (and TVM) lowering parity."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.export import Dim

from graphpress.ir import ops
from graphpress.ir.ops.kv_quant import kv_dequantize, kv_quantize, pack, unpack

BITS = st.sampled_from([2, 4, 8])


@settings(max_examples=60, deadline=None)
@given(bits=BITS, lead=st.lists(st.integers(1, 3), max_size=3), bytes_=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, lead, bytes_, seed):
    channels = bytes_ * (8 // bits)
    codes = torch.randint(
        0, 2**bits, (*lead, channels), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (*lead, bytes_)
    assert torch.equal(unpack(packed, bits), codes)


@settings(max_examples=40, deadline=None)
@given(
    bits=BITS,
    per_channel=st.booleans(),
    symmetric=st.booleans(),
    groups=st.integers(1, 4),
    group=st.sampled_from([1, 2, 4, 8]),
    heads=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_dequantized_values_stay_within_half_a_step(bits, per_channel, symmetric, groups, group, heads, seed):
    per = 8 // bits
    tokens, channels = (groups * group, 8) if per_channel else (3, groups * max(group, per) * per)
    gsize = group if per_channel else max(group, per)
    x = torch.randn(2, heads, tokens, channels, generator=torch.Generator().manual_seed(seed)) * 3
    packed, scale, zero = kv_quantize(x, bits, gsize, per_channel, symmetric)
    y = kv_dequantize(packed, scale, None if symmetric else zero, bits, gsize, per_channel)
    assert y.shape == x.shape and packed.shape[-1] == channels // per
    err = _grouped((y - x).abs(), gsize, per_channel)
    step = scale.unsqueeze(-2 if per_channel else -1)
    assert (err <= step * 0.5 + 1e-5).all()


def _grouped(t, g, per_channel):
    *lead, tokens, channels = t.shape
    return t.reshape(*lead, tokens // g, g, channels) if per_channel else t.reshape(*lead, tokens, channels // g, g)


def test_quantize_fake_shapes_follow_the_grouping():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 64, 32)
        packed, scale, zero = torch.ops.graphpress.kv_quantize(x, 2, 16, True, False)
        assert packed.shape == (2, 3, 64, 8) and scale.shape == (2, 3, 4, 32) == zero.shape
        packed, scale, _ = torch.ops.graphpress.kv_quantize(x, 4, 8, False, True)
        assert packed.shape == (2, 3, 64, 16) and scale.shape == (2, 3, 64, 4)


def test_eight_bits_are_nearly_lossless():
    x = torch.randn(1, 2, 32, 64, generator=torch.Generator().manual_seed(0))
    for per_channel in (True, False):
        y = kv_dequantize(*kv_quantize(x, 8, 32, per_channel, False), 8, 32, per_channel)
        assert ((y - x).norm() / x.norm()) < 0.01


class RoundTrip(torch.nn.Module):
    def __init__(self, bits, group, per_channel, symmetric):
        super().__init__()
        self.args = (bits, group, per_channel, symmetric)

    def forward(self, x):
        bits, group, per_channel, symmetric = self.args
        packed, scale, zero = torch.ops.graphpress.kv_quantize(x, bits, group, per_channel, symmetric)
        y = torch.ops.graphpress.kv_dequantize(packed, scale, None if symmetric else zero, bits, group, per_channel)
        return y, packed, scale


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel, symmetric", [(True, False), (False, False), (False, True)])
def test_onnx_lowering_matches_the_reference(tmp_path, bits, per_channel, symmetric):
    model = RoundTrip(bits, 8, per_channel, symmetric)
    x = torch.randn(2, 3, 16, 32, generator=torch.Generator().manual_seed(bits))
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: Dim.AUTO, 2: Dim.AUTO}})
    onnx_program = torch.onnx.export(program, dynamo=True, custom_translation_table=ops.onnx_translations())
    path = tmp_path / "q.onnx"
    onnx_program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ((2, 3, 16, 32), (1, 3, 40, 32)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        want = model(x)
        np.testing.assert_array_equal(got[1], want[1].numpy())
        np.testing.assert_allclose(got[0], want[0].numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(got[2], want[2].numpy(), rtol=1e-6)


class StaticRoundTrip(torch.nn.Module):
    """kv_quantize_static then kv_dequantize_static under one (1, heads, 1, channels) scale."""

    def __init__(self, bits):
        super().__init__()
        self.bits = bits
        self.scale = torch.nn.Buffer(torch.linspace(0.01, 0.05, 3 * 32).reshape(1, 3, 1, 32))

    def forward(self, x):
        codes = torch.ops.graphpress.kv_quantize_static(x, self.scale, self.bits)
        return torch.ops.graphpress.kv_dequantize_static(codes, self.scale, self.bits), codes


@pytest.mark.parametrize("bits", [4, 8])
def test_static_codes_are_onnxruntimes_and_every_lowering_equals_the_reference(tmp_path, bits):
    """Codes: clip(round(x / s)) signed (int8), or + 8 in nibbles, the even channel low (uint8); values within
    half a step where nothing clips. The ONNX and TVM forms equal the reference bit for bit (codes)."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    model = StaticRoundTrip(bits)
    x = torch.randn(2, 3, 16, 32, generator=torch.Generator().manual_seed(bits)) * 0.2
    y, codes = model(x)
    levels = torch.clamp(torch.round(x / model.scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    if bits == 8:
        assert codes.dtype == torch.int8 and torch.equal(codes.long(), levels.long())
    else:
        pairs = (levels.long() + 8).unflatten(-1, (16, 2))
        assert codes.dtype == torch.uint8 and torch.equal(codes.long(), pairs[..., 0] + 16 * pairs[..., 1])
    inside = levels.abs() < 2 ** (bits - 1) - 1
    assert ((y - x).abs() <= model.scale / 2 + 1e-7)[inside].all()
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: Dim.AUTO, 2: Dim.AUTO}})
    onnx_program = torch.onnx.export(program, dynamo=True, custom_translation_table=ops.onnx_translations())
    onnx_program.save(str(tmp_path / "q.onnx"))
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    mod = from_exported_program(program, custom_convert_map=ops.relax_converters())
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    for shape in ((2, 3, 16, 32), (1, 3, 40, 32)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.2
        want = model(x)
        onnx = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        compiled = [o.numpy() for o in vm["main"](tvm.runtime.tensor(x.numpy()))]
        for got in (onnx, compiled):
            np.testing.assert_array_equal(got[1], want[1].numpy())
            np.testing.assert_allclose(got[0], want[0].numpy(), rtol=0, atol=1e-6)
