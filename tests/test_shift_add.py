"""shift_add (ShiftAddViT): power-of-two weights that stay packed in ONNX, binarized Q/K attention."""

from __future__ import annotations

import pydantic
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphpress import compress
from graphpress.errors import PassPreconditionError
from graphpress.ir import capture
from graphpress.ir.ops.bitstream import pack_bits
from graphpress.ir.ops.shift import decode, encode, exponent_bits, shift_weight
from graphpress.passes import PassContext, build_pass
from graphpress.schema import ShiftAddConfig

from .conftest import ToyAttention, rel_err


def shift_add(**fields) -> ShiftAddConfig:
    return ShiftAddConfig(**{"pass": "shift_add", **fields})


@pytest.fixture(scope="module")
def calibration():
    gen = torch.Generator().manual_seed(2)
    return [(torch.randint(0, 256, (2, 48), generator=gen),) for _ in range(2)]


@settings(max_examples=60, deadline=None)
@given(low=st.integers(-20, 0), span=st.integers(0, 20), seed=st.integers(0, 2**16))
def test_codes_round_trip_and_powers_of_two_are_exact(low, span, seed):
    high = min(low + span, 0)
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
    powers = torch.randint(low, high + 1, (5, 24), generator=gen).double()
    signs = torch.randint(0, 2, (5, 24), generator=gen).double() * 2 - 1
    zeros = torch.rand(5, 24, generator=gen) < 0.2
    weight = torch.where(zeros, 0.0, scale[:, None] * signs * 2.0**powers)
    codes = encode(weight, scale, low, high)
    assert torch.equal(decode(codes, scale, low, high), weight)  # already of the form: reproduced exactly
    bits = exponent_bits(low, high) + 1
    assert torch.equal(shift_weight(pack_bits(codes, bits), scale.float(), low, high, 24), weight.float())


def test_encode_picks_the_nearest_power_in_the_linear_domain():
    scale = torch.ones(1, dtype=torch.float64)
    weight = torch.tensor([[0.74, 0.76, -0.3, 0.007, 0.009, 3.0]], dtype=torch.float64)
    rebuilt = decode(encode(weight, scale, -6, 0), scale, -6, 0)
    # 0.74 -> 0.5 (nearer than 1), 0.76 -> 1, -0.3 -> -0.25, 0.007 -> 0 (below 2^-7), 0.009 -> 2^-6, 3 -> 1 (clamped)
    assert rebuilt.tolist() == [[0.5, 1.0, -0.25, 0.0, 2**-6, 1.0]]


def test_shift_linears_on_the_example_lm(trained_llama, calibration):
    graph = capture(trained_llama, calibration[0])
    result = build_pass(shift_add(targets="layers.*.mlp.*")).run(graph, PassContext(calibration))
    assert len(result.report.layers) == 12
    for layer in result.report.layers:
        details = layer.details
        assert details["bits"] == 4
        before, after = details["weight_bytes"]
        assert after < 0.14 * before
        assert details["multiplications_removed_per_token"] == 704 * 256 - (256 if "down" in layer.path else 704)
        assert details["weight_error"] < 0.3 and details["output_error"] < 0.3
    out = result.graph.module()(calibration[0][0])
    assert rel_err(out, trained_llama(calibration[0][0])) < 0.3
    wider = build_pass(shift_add(targets="layers.*.mlp.*", min_exponent=-12)).run(graph, PassContext(calibration))
    assert wider.report.layers[0].details["bits"] == 5
    assert wider.report.layers[0].details["weight_error"] <= result.report.layers[0].details["weight_error"]


def test_binarized_attention_reports_its_cost(trained_llama, calibration):
    graph = capture(trained_llama, calibration[0])
    result = build_pass(shift_add(linears=False, attention=True)).run(graph, PassContext(calibration))
    assert [layer.action for layer in result.report.layers] == ["binarized q/k"] * 4
    for layer in result.report.layers:
        assert layer.details["qk_multiplications_removed_per_pair"] == 8 * 31
        assert 0.01 < layer.details["attention_error"] < 2
    signs = [n for n in result.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.sign.default]
    assert len(signs) == 8  # q and k of every block


def test_toy_attention_equals_attention_on_binary_codes():
    """Expected: the toy's own attention with q and k (after RoPE) replaced by sign(x) * mean|x|."""
    torch.manual_seed(0)
    model = ToyAttention("half").eval()
    x = torch.randn(2, 6, 32)
    result = build_pass(shift_add(linears=False, attention=True)).run(capture(model, (x,)), PassContext([(x,)]))

    def binary(t):
        return t.sign() * t.abs().mean(-1, keepdim=True)

    original_sdpa = torch.nn.functional.scaled_dot_product_attention

    def binarized_sdpa(q, k, v, **kwargs):
        return original_sdpa(binary(q), binary(k), v, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = binarized_sdpa
    try:
        expected = model(x)
    finally:
        torch.nn.functional.scaled_dot_product_attention = original_sdpa
    assert rel_err(result.graph.module()(x), expected) < 1e-6
    assert rel_err(expected, model(x)) > 0.01  # and it is not the original


@pytest.mark.parametrize("mode", ["forward", "decode"])
def test_onnx_matches_eager_and_stays_packed(tmp_path, mode):
    spec = {
        "capture": {"mode": mode},
        "calibration": {"samples": 1, "seq_len": 32},
        "verify": {"max": 1.0},
        "passes": [{"pass": "shift_add", "targets": "layers.*", "attention": True}],
    }
    result = compress("examples/tiny_llama", spec, out_dir=tmp_path)
    record = result.report.backends[0]
    assert record["errors"]["rel_l2"] < 1e-5
    assert "Pow" in record["op_histogram"] and "Sign" in record["op_histogram"]
    baseline_layers = 4 * (3 * 704 * 256 + 2 * 256 * 256 + 2 * 64 * 256) * 4
    assert result.artifacts["onnx"].stat().st_size < 12_194_088 - 0.8 * baseline_layers


def test_bad_exponent_ranges_and_targets_are_refused(trained_llama, calibration):
    with pytest.raises(pydantic.ValidationError, match="min_exponent -2 is above max_exponent -3"):
        shift_add(min_exponent=-2, max_exponent=-3)
    with pytest.raises(pydantic.ValidationError, match="greater than or equal to -126"):
        shift_add(min_exponent=-127)
    with pytest.raises(pydantic.ValidationError, match="less than or equal to 0"):
        shift_add(max_exponent=2)
    with pytest.raises(pydantic.ValidationError, match="nothing to do"):
        shift_add(linears=False)
    graph = capture(trained_llama, calibration[0])
    with pytest.raises(PassPreconditionError, match="attention_targets: 'decoder.*' matches no attention block"):
        build_pass(shift_add(linears=False, attention=True, attention_targets="decoder.*")).run(
            graph, PassContext(calibration)
        )
