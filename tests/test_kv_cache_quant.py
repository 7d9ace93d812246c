"""kv_cache_quant: a packed low-bit cache at the decode graph's boundary, alone and after gqa_to_mla."""

from __future__ import annotations

import pydantic
import pytest
import torch

from graphpress import compress
from graphpress.errors import PassPreconditionError
from graphpress.ir import capture
from graphpress.metrics import perplexity
from graphpress.passes import PassContext, PassManager, build_pass
from graphpress.runtime import OnnxDecoder, TorchDecoder, greedy_generate, teacher_forced_logits
from graphpress.schema import GqaToMlaConfig, KvCacheQuantConfig

from .conftest import rel_err

EIGHT_BIT = {
    "key": {"bits": 8, "axis": "channel", "group_size": 16},
    "value": {"bits": 8, "axis": "token", "group_size": 32},
    "residual": 0,
}


def quant(**fields) -> KvCacheQuantConfig:
    return KvCacheQuantConfig(**{"pass": "kv_cache_quant", **fields})


@pytest.fixture(scope="module")
def calibration():
    gen = torch.Generator().manual_seed(2)
    return [(torch.randint(0, 256, (1, 40), generator=gen),)]


@pytest.fixture(scope="module")
def decode_graph(trained_llama):
    return capture(trained_llama, (torch.zeros(1, 8, dtype=torch.long),), mode="decode")


def test_cache_layout_is_packed_codes_scales_and_a_window(decode_graph, calibration):
    result = build_pass(quant(residual=16)).run(decode_graph, PassContext(calibration))
    layout = result.graph.cache
    names = [e.name for e in layout][:4]
    assert names == ["layers.0.key.packed", "layers.0.key.scale", "layers.0.key.zero", "layers.0.key.residual"]
    packed, scale, _, window = layout.entries[:4]
    assert packed.dtype == "uint8" and packed.shape == (None, 2, None, 8)  # 2-bit: 4 codes per byte
    assert scale.shape == (None, 2, None, 32) and scale.tokens_per_slot == 32  # per channel, groups of 32 tokens
    assert window.max_len == 16 + 32 - 1
    value_scale = layout.entries[layout.index("layers.0.value.scale")]
    assert value_scale.shape == (None, 2, None, 1) and value_scale.tokens_per_slot == 1  # per token, 32 channels
    # per token per layer: K 16 B of codes + scale and zero (2 heads x 32 channels x 4 B) / 32 tokens each;
    # V 16 B of codes + scale and zero (2 heads x 1 group x 4 B) each
    assert layout.bytes_per_token == 4 * ((16 + 2 * 8) + (16 + 2 * 8))
    assert result.report.details["kv_cache_bytes_per_token"] == [2048, 256]
    assert result.report.details["packed_from_token"] == 16 + 32  # the first key block is packed at token 48


def test_a_window_no_context_leaves_is_refused():
    """residual: 1e9 would keep every token in full precision while the report claimed 8x smaller."""
    with pytest.raises(pydantic.ValidationError, match="less than or equal to 8192"):
        quant(residual=10**9)


def test_the_window_and_the_packed_part_grow_as_kivi_says(decode_graph, calibration):
    graph = (
        build_pass(quant(residual=4, key={"bits": 4, "axis": "channel", "group_size": 8}))
        .run(decode_graph, PassContext(calibration))
        .graph
    )
    decoder = TorchDecoder(graph)
    cache = graph.cache.empty(1)
    key = [graph.cache.index(f"layers.0.key.{part}") for part in ("packed", "scale", "residual")]
    value = [graph.cache.index(f"layers.0.value.{part}") for part in ("packed", "residual")]
    for t in range(30):
        _, cache = decoder.step(
            torch.tensor([[t % 256]]), torch.ones(1, t + 1, dtype=torch.long), torch.tensor([[t]]), cache
        )
        n = t + 1
        quantized = 8 * (max(n - 4, 0) // 8)  # keys leave the window in whole groups of 8, keeping >= 4
        assert [cache[i].shape[2] for i in key] == [quantized, quantized // 8, n - quantized]
        assert [cache[i].shape[2] for i in value] == [max(n - 4, 0), min(n, 4)]  # values leave one at a time


def test_eight_bit_cache_keeps_perplexity_within_one_percent(trained_llama, decode_graph, calibration):
    from examples.tiny_llama.data import load_split

    graph = build_pass(quant(**EIGHT_BIT)).run(decode_graph, PassContext(calibration)).graph
    tokens = load_split("heldout")[:1024]
    decoder = TorchDecoder(graph)

    def model(batch):
        return teacher_forced_logits(decoder, batch)

    original = perplexity(trained_llama, tokens, seq_len=256, batch_size=4)
    quantized = perplexity(model, tokens, seq_len=256, batch_size=4)
    assert abs(quantized / original - 1) < 0.01


def test_lower_bits_cost_more_and_the_window_helps(trained_llama, decode_graph, calibration):
    ids = calibration[0][0]
    reference = trained_llama(ids)

    def error(**fields):
        graph = build_pass(quant(**fields)).run(decode_graph, PassContext(calibration)).graph
        return rel_err(teacher_forced_logits(TorchDecoder(graph), ids), reference)

    side = {"axis": "token", "group_size": 32}
    two, four = ({"key": {**side, "bits": b}, "value": {**side, "bits": b}} for b in (2, 4))
    assert error(**two, residual=0) > error(**four, residual=0) > error(**EIGHT_BIT) > 0
    assert error(**two, residual=16) < error(**two, residual=0)


def test_batch_and_length_stay_dynamic(trained_llama, decode_graph):
    calibration = [(torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0)),)]
    graph = build_pass(quant(**EIGHT_BIT)).run(decode_graph, PassContext(calibration)).graph
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    assert rel_err(teacher_forced_logits(TorchDecoder(graph), ids), trained_llama(ids)) < 0.02


def test_quantizing_the_mla_latent_cache(trained_llama, decode_graph, calibration):
    rope = {"mode": "decoupled", "dims": 16}
    pipeline = PassManager(
        [
            build_pass(GqaToMlaConfig(**{"pass": "gqa_to_mla", "kv_rank": 48, "rope": rope})),
            build_pass(quant(key={"bits": 8, "axis": "channel", "group_size": 8}, residual=0)),
        ]
    )
    ctx = PassContext(calibration)
    graph = pipeline.run(decode_graph, ctx).graph
    mla_only = build_pass(GqaToMlaConfig(**{"pass": "gqa_to_mla", "kv_rank": 48, "rope": rope})).run(decode_graph, ctx)
    assert [e.name for e in graph.cache][:2] == ["layers.0.latent.packed", "layers.0.latent.scale"]
    assert graph.cache.bytes_per_token == 4 * (48 + 16) * (1 + 2 * 4 / 8)
    ids = calibration[0][0]
    reference = teacher_forced_logits(TorchDecoder(mla_only.graph), ids)
    assert rel_err(teacher_forced_logits(TorchDecoder(graph), ids), reference) < 0.02


def test_onnx_quantized_cache_generation_matches_eager(tmp_path):
    spec = {
        "capture": {"mode": "decode"},
        "calibration": {"samples": 1, "seq_len": 40},
        "verify": {"max": 0.5},
        "passes": [{"pass": "kv_cache_quant", "key": {"bits": 4, "axis": "channel", "group_size": 8}, "residual": 4}],
    }
    result = compress("examples/tiny_llama", spec, out_dir=tmp_path)
    decoder = OnnxDecoder(result.artifacts["onnx"])
    assert decoder.input_names[3:7] == [f"past_key_values.0.key.{p}" for p in ("packed", "scale", "zero", "residual")]
    inputs = {i.name: i.type for i in decoder.session.get_inputs()}
    assert inputs["past_key_values.0.key.packed"] == "tensor(uint8)"
    shapes = {i.name: i.shape for i in decoder.session.get_inputs()}  # a part of a cache is named as such
    assert shapes["past_key_values.0.key.packed"] == ["batch_size", 2, "8*past_key_groups", 16]
    assert shapes["past_key_values.0.key.scale"] == ["batch_size", 2, "past_key_groups", 32]
    assert shapes["past_key_values.0.key.residual"] == ["batch_size", 2, "past_key_window_length", 32]
    assert shapes["past_key_values.0.value.packed"] == ["batch_size", 2, "past_value_packed_length", 8]
    ops = result.report.backends[0]["op_histogram"]
    assert "BitShift" in ops and "BitwiseOr" in ops
    prompt = torch.tensor([list(b"def foo(")])
    ours = greedy_generate(decoder, prompt, 40)  # 48 tokens: several key groups flushed
    assert torch.equal(ours, greedy_generate(TorchDecoder(result.graph), prompt, 40))


def test_bad_configs_and_graphs_are_refused(trained_llama, decode_graph, calibration):
    forward = capture(trained_llama, (calibration[0][0],))
    with pytest.raises(PassPreconditionError, match="set capture.mode to 'decode'"):
        build_pass(quant()).run(forward, PassContext(calibration))
    with pytest.raises(PassPreconditionError, match=r"value.group_size: 24 does not divide the 32 channels"):
        build_pass(quant(value={"bits": 2, "axis": "token", "group_size": 24})).run(
            decode_graph, PassContext(calibration)
        )
    with pytest.raises(PassPreconditionError, match=r"targets: 'layers.\*.kv' matches no unquantized cache entry"):
        build_pass(quant(targets="layers.*.kv")).run(decode_graph, PassContext(calibration))
    with pytest.raises(pydantic.ValidationError, match="bits"):
        quant(key={"bits": 3, "axis": "channel"})
    with pytest.raises(pydantic.ValidationError, match="axis"):
        quant(value={"bits": 2})
    with pytest.raises(PassPreconditionError, match=r"passes\[0\] \(kv_cache_quant\) must run after gqa_to_mla"):
        PassManager([build_pass(quant()), build_pass(GqaToMlaConfig(**{"pass": "gqa_to_mla"}))])


def test_hadamard_rotation_is_exact_to_rounding_and_checks_its_shape(trained_llama, decode_graph, calibration):
    from graphpress.passes.kv_cache_quant import hadamard

    h = hadamard(32)
    assert torch.allclose(h @ h, torch.eye(32), atol=1e-6) and torch.equal(h, h.T)
    ids = calibration[0][0]
    reference = trained_llama(ids)
    side = {"bits": 8, "axis": "token", "group_size": 32}

    def error(rotate):
        fields = {"key": {**side, "rotate": rotate}, "value": side, "residual": 0}
        graph = build_pass(quant(**fields)).run(decode_graph, PassContext(calibration)).graph
        return rel_err(teacher_forced_logits(TorchDecoder(graph), ids), reference)

    assert error("hadamard") < 0.01 and error("none") < 0.01
    mla = build_pass(GqaToMlaConfig(**{"pass": "gqa_to_mla", "kv_rank": 48})).run(
        decode_graph, PassContext(calibration)
    )
    with pytest.raises(PassPreconditionError, match=r"latent.rotate: a Hadamard rotation needs a power-of-two"):
        build_pass(quant(latent={**side, "group_size": 16, "rotate": "hadamard"})).run(
            mla.graph, PassContext(calibration)
        )


def static(bits: int, **fields) -> KvCacheQuantConfig:
    """onnxruntime's quantized cache: fixed per-channel scales, every token quantized."""
    side = {"bits": bits, "axis": "channel"}
    return quant(key=side, value=side, residual=0, scales="static", **fields)


@pytest.mark.parametrize("bits, dtype, width", [(8, torch.int8, 32), (4, torch.uint8, 16)])
def test_static_scales_map_each_channels_calibration_peak_to_the_top_code(
    decode_graph, calibration, bits, dtype, width
):
    """One entry of codes per key and value (int8, or 4-bit pairs in uint8), one slot per token; a channel's
    largest |x| over the calibration tokens is exactly the largest code, so nothing seen there clips."""
    from graphpress.ir.ops.kv_quant import unpack

    graph = build_pass(static(bits)).run(decode_graph, PassContext(calibration)).graph
    assert [(e.name, e.dtype, e.shape[-1]) for e in graph.cache][:2] == [
        ("layers.0.key.codes", str(dtype).removeprefix("torch."), width),
        ("layers.0.value.codes", str(dtype).removeprefix("torch."), width),
    ]
    assert graph.cache.bytes_per_token == 4 * 2 * 2 * width  # 4 layers x (K, V) x 2 heads x bytes
    ids, decoder, cache = calibration[0][0], TorchDecoder(graph), graph.cache.empty(1)
    for t in range(ids.shape[1]):  # token by token, as calibration ran
        _, cache = decoder.step(ids[:, t : t + 1], torch.ones(1, t + 1, dtype=torch.long), torch.tensor([[t]]), cache)
    for codes in cache[:2]:  # layer 0's: later layers see the quantization of earlier ones, calibration did not
        signed = codes.long() if bits == 8 else unpack(codes, 4).long() - 8
        assert signed.abs().amax(dim=(0, 2)).eq(2 ** (bits - 1) - 1).all()


def test_static_scales_cost_little_at_eight_bits_and_more_at_four(trained_llama, decode_graph, calibration):
    ids = calibration[0][0]
    reference = trained_llama(ids)
    errors = {}
    for bits in (8, 4):
        graph = build_pass(static(bits)).run(decode_graph, PassContext(calibration)).graph
        errors[bits] = rel_err(teacher_forced_logits(TorchDecoder(graph), ids), reference)
    assert 0 < errors[8] < 0.01 < errors[4] < 0.2


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"residual": 32}, r"set residual to 0 \(got 32\)"),
        ({"value": {"bits": 8, "axis": "token"}}, r"value has axis 'token'"),
        ({"key": {"bits": 2, "axis": "channel"}}, r"4 or 8 bits.*key has axis 'channel', bits 2"),
        ({"value": {"bits": 4, "axis": "channel"}}, r"one bit width for the cache: key 8, value 4"),
        ({"key": {"bits": 8, "axis": "channel", "group_size": 16}}, r"drop key.group_size"),
        ({"key": {"bits": 8, "axis": "channel", "symmetric": False}}, r"key.symmetric false contradicts it"),
    ],
)
def test_static_scales_refuse_settings_they_do_not_have(fields, match):
    side = {"bits": 8, "axis": "channel"}
    with pytest.raises(pydantic.ValidationError, match=match):
        quant(**{"key": side, "value": side, "residual": 0, "scales": "static", **fields})


def test_graphs_from_one_capture_export_one_after_another(decode_graph, calibration, tmp_path):
    """Exporting one pass's graph leaves data-dependent sizes pending in the shape environment every graph of
    the capture shares; the next export must not trip on them (it did: MLA + KIVI after KIVI)."""
    from graphpress.backends import build_backend
    from graphpress.schema import OnnxBackendConfig

    ctx = PassContext(calibration)
    kivi = {"key": {"bits": 2, "axis": "channel", "group_size": 8}, "residual": 8}
    rope = {"mode": "after_up_projection"}
    graphs = [
        build_pass(quant(**kivi)).run(decode_graph, ctx).graph,
        PassManager(
            [
                build_pass(GqaToMlaConfig(**{"pass": "gqa_to_mla", "kv_rank": 32, "rope": rope})),
                build_pass(quant(**kivi)),
            ]
        )
        .run(decode_graph, ctx)
        .graph,
    ]
    for i, graph in enumerate(graphs):
        config = OnnxBackendConfig(target="onnx", max_error=1e-3)
        record = build_backend(config, "onnx").build(graph, calibration, tmp_path / str(i))
        assert record.errors["rel_l2"] < 1e-4
