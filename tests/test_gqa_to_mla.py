"""gqa_to_mla: exact at full rank (forward and decode, example LM and transformers' Llama), a latent cache below it."""

from __future__ import annotations

import pydantic
import pytest
import torch
from torch import nn

from graphpress import compress
from graphpress.errors import PassPreconditionError
from graphpress.ir import capture
from graphpress.passes import PassContext, build_pass
from graphpress.runtime import OnnxDecoder, TorchDecoder, greedy_generate, teacher_forced_logits
from graphpress.schema import GqaToMlaConfig

from .conftest import ToyAttention, rel_err

AFTER_UP = {"rope": {"mode": "after_up_projection"}}
DECOUPLED_FULL = {"rope": {"mode": "decoupled", "dims": 64}}  # 2 KV heads x 32: every position dim kept


def mla(**fields) -> GqaToMlaConfig:
    return GqaToMlaConfig(**{"pass": "gqa_to_mla", **fields})


def convert(graph, calibration, **fields):
    return build_pass(mla(**fields)).run(graph, PassContext(calibration))


def logits(graph, ids: torch.Tensor) -> torch.Tensor:
    if graph.cache is not None:
        return teacher_forced_logits(TorchDecoder(graph), ids)
    out = graph.module()(ids)
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out


@pytest.fixture(scope="module")
def calibration():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (2, 24), generator=gen),) for _ in range(2)]


# ---------------------------------------------------------------------- exactness at full rank
@pytest.mark.parametrize("mode", ["forward", "decode"])
@pytest.mark.parametrize("fields", [AFTER_UP, DECOUPLED_FULL, {**DECOUPLED_FULL, "absorb": False}], ids=str)
def test_full_rank_is_exact_on_the_example_lm(trained_llama, calibration, mode, fields):
    ids = calibration[0][0]
    graph = capture(trained_llama, (ids,), mode=mode)
    result = convert(graph, calibration, **fields)
    assert rel_err(logits(result.graph, ids), trained_llama(ids)) < 1e-5
    assert {layer.action for layer in result.report.layers} == {"converted"}
    assert len(result.report.layers) == trained_llama.config.num_layers


@pytest.mark.parametrize("mode", ["forward", "decode"])
@pytest.mark.parametrize(
    "fields",
    [{}, {"rope": {"mode": "decoupled", "dims": 32}}, {"rope": {"mode": "decoupled", "dims": 32}, "absorb": False}],
)
def test_full_rank_is_exact_on_transformers_llama(hf_llama, mode, fields):
    gen = torch.Generator().manual_seed(0)
    calibration = [(torch.randint(0, 128, (2, 16), generator=gen),) for _ in range(2)]
    ids = calibration[0][0]
    graph = capture(hf_llama, (ids,), mode=mode)
    result = convert(graph, calibration, **fields)
    assert rel_err(logits(result.graph, ids), hf_llama(ids).logits) < 1e-5


# ---------------------------------------------------------------------- compression
def test_decode_cache_becomes_the_latent(trained_llama, calibration):
    graph = capture(trained_llama, (calibration[0][0],), mode="decode")
    after_up = convert(graph, calibration, kv_rank=48).graph
    assert [e.name for e in after_up.cache][:2] == ["layers.0.latent", "layers.1.latent"]
    assert after_up.cache.entries[0].shape == (None, None, 48)
    assert after_up.cache.bytes_per_token == 4 * 48 * 4
    decoupled = convert(graph, calibration, kv_rank=48, rope={"mode": "decoupled", "dims": 16}).graph
    assert [e.name for e in decoupled.cache][:2] == ["layers.0.latent", "layers.0.k_rope"]
    assert decoupled.cache.bytes_per_token == 4 * (48 + 16) * 4
    assert graph.cache.bytes_per_token == 4 * 2 * 2 * 32 * 4  # the input graph is untouched
    assert graph.program.call_spec.in_spec.num_leaves == 3 + 8
    assert after_up.program.call_spec.in_spec.num_leaves == 3 + 4
    assert (
        rel_err(teacher_forced_logits(TorchDecoder(graph), calibration[0][0]), trained_llama(calibration[0][0])) < 1e-5
    )


@pytest.mark.parametrize("rope", [AFTER_UP["rope"], {"mode": "decoupled", "dims": 32}], ids=str)
def test_error_shrinks_as_the_latent_grows(trained_llama, calibration, rope):
    ids = calibration[0][0]
    graph = capture(trained_llama, (ids,))
    reference = trained_llama(ids)
    errors = [
        rel_err(logits(convert(graph, calibration, kv_rank=r, rope=rope).graph, ids), reference) for r in (16, 48, 96)
    ]
    assert errors[0] > errors[1] > errors[2] > 0


def test_absorbed_and_non_absorbed_forms_agree_below_full_rank(trained_llama, calibration):
    ids = calibration[0][0]
    graph = capture(trained_llama, (ids,), mode="decode")
    rope = {"mode": "decoupled", "dims": 16}
    absorbed = convert(graph, calibration, kv_rank=40, rope=rope)
    plain = convert(graph, calibration, kv_rank=40, rope=rope, absorb=False)
    a, p = logits(absorbed.graph, ids), logits(plain.graph, ids)
    assert rel_err(a, p) < 1e-5
    assert rel_err(a, trained_llama(ids)) > 1e-3  # a real approximation, not the identity
    assert absorbed.report.details["absorbed"] and not plain.report.details["absorbed"]
    # absorbed: no per-head K or V is ever rebuilt from the latent
    assert not any("k_up" in name or "v_up" in name for name in absorbed.graph.tensors())
    assert any("k_up" in name for name in plain.graph.tensors())


def test_report_and_determinism(trained_llama, calibration):
    graph = capture(trained_llama, (calibration[0][0],), mode="decode")
    first = convert(graph, calibration, kv_rank=32, rope={"mode": "decoupled", "dims": 16})
    second = convert(graph, calibration, kv_rank=32, rope={"mode": "decoupled", "dims": 16})
    for name, tensor in first.graph.tensors().items():
        assert torch.equal(tensor, second.graph.tensors()[name])
    layer = first.report.layers[0]
    assert layer.details["cache_numbers_per_token"] == (128, 48)
    assert 0 < layer.details["kv_energy_kept"] < 1 and 0 < layer.details["position_energy_kept"] < 1
    assert first.report.details["kv_cache_bytes_per_token"] == [4 * 128 * 4, 4 * 48 * 4]


# ---------------------------------------------------------------------- the ONNX decode loop
def test_onnx_latent_cache_generation_matches_eager(tmp_path):
    spec = {
        "capture": {"mode": "decode"},
        "calibration": {"samples": 2, "seq_len": 48},
        "verify": {"max": 0.5},
        "passes": [{"pass": "gqa_to_mla", "kv_rank": 48, "rope": {"mode": "decoupled", "dims": 16}}],
    }
    result = compress("examples/tiny_llama", spec, out_dir=tmp_path)
    decoder = OnnxDecoder(result.artifacts["onnx"])
    assert decoder.input_names[3:5] == ["past_key_values.0.latent", "past_key_values.0.k_rope"]
    assert decoder.output_names[1:3] == ["present.0.latent", "present.0.k_rope"]
    assert result.report.compressed["kv_cache_bytes_per_token"] == 4 * 64 * 4
    markdown = result.artifacts["report_md"].read_text()
    assert "| KV-cache bytes / token | 2,048 | 1,024 | 0.500 |" in markdown
    assert "| `layers.0.self_attn` | converted |" in markdown and "kv rank" in markdown
    prompt = torch.tensor([list(b"class Foo"), list(b"import sy")])
    ours = greedy_generate(decoder, prompt, 24)
    assert torch.equal(ours, greedy_generate(TorchDecoder(result.graph), prompt, 24))


# ---------------------------------------------------------------------- bad input
@pytest.fixture
def toy_input():
    return torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("rope", ["half", "interleaved"])
def test_toy_rope_attention_converts_exactly(toy_input, rope):
    """Half-split (Llama) and interleaved (GPT-J) pairs: RoRoPE mixes the rows of each frequency's pair."""
    torch.manual_seed(0)
    model = ToyAttention(rope).eval()
    graph = capture(model, (toy_input,))
    for fields in (AFTER_UP, {"rope": {"mode": "decoupled", "dims": 16}}):
        out = convert(graph, [(toy_input,)], **fields).graph.module()(toy_input)
        assert rel_err(out, model(toy_input)) < 1e-5
    lossy = [convert(graph, [(toy_input,)], kv_rank=r, rope={"mode": "decoupled", "dims": 4}) for r in (8, 20)]
    errors = [rel_err(result.graph.module()(toy_input), model(toy_input)) for result in lossy]
    assert errors[0] > errors[1] > 1e-4


@pytest.mark.parametrize("rope", ["half", "interleaved"])
def test_freqfold_is_exact_when_the_folded_frequencies_are_equal(toy_input, rope):
    """FreqFold treats neighbouring frequencies as one: with every position dim kept, exact when they are equal
    (0.1, 0.1, 0.3, 0.3 folded by 2), off by their spread when they are not; folding by 1 is RoRoPE."""
    torch.manual_seed(0)
    paired = ToyAttention(rope, freqs=torch.tensor([0.1, 0.1, 0.3, 0.3])).eval()
    torch.manual_seed(0)
    spread = ToyAttention(rope).eval()  # 0.1, 0.2, 0.3, 0.4
    errors = {}
    for name, model in (("paired", paired), ("spread", spread)):
        graph = capture(model, (toy_input,))
        for fold in (1, 2):
            rope_fields = {"mode": "decoupled", "dims": 16, "freqfold": fold}
            out = convert(graph, [(toy_input,)], rope=rope_fields).graph.module()(toy_input)
            errors[name, fold] = rel_err(out, model(toy_input))
    assert max(errors["paired", 1], errors["paired", 2], errors["spread", 1]) < 1e-5
    assert errors["spread", 2] > 1e-3


def test_freqfold_concentrates_the_keys_in_fewer_rope_dims(trained_llama, calibration):
    """On the example LM, 8 RoPE dims folded over 4 neighbouring frequencies hold more of the position-carrying
    score energy than RoRoPE's 8 per-frequency components (the kept share the report records)."""
    graph = capture(trained_llama, (calibration[0][0],))
    kept = {}
    for fold in (1, 4):
        rope = {"mode": "decoupled", "dims": 8, "freqfold": fold}
        report = convert(graph, calibration, kv_rank=32, rope=rope).report
        kept[fold] = sum(layer.details["position_energy_kept"] for layer in report.layers)
    assert kept[4] > kept[1]


def test_per_frequency_turns_every_frequency_once(trained_llama, calibration):
    """rope.dims = head_dim (32: 16 frequencies): the free choice turns some frequencies twice (one per KV head) and
    others not at all; per_frequency turns each exactly once, as one original head does."""
    graph = capture(trained_llama, (calibration[0][0],))
    turned = {}
    for per_frequency in (False, True):
        rope = {"mode": "decoupled", "dims": 32, "per_frequency": per_frequency}
        layers = convert(graph, calibration, kv_rank=32, rope=rope).report.layers
        turned[per_frequency] = [layer.details["frequencies_turned"] for layer in layers]
    assert turned[True] == [16] * len(turned[True])
    assert min(turned[False]) < 16


def test_no_rope_is_exact_after_up_and_refused_decoupled(toy_input):
    """after_up_projection copies the graph's own ops onto the rebuilt keys; decoupled needs a RoPE to split."""
    model = ToyAttention(None).eval()
    graph = capture(model, (toy_input,))
    assert rel_err(convert(graph, [(toy_input,)]).graph.module()(toy_input), model(toy_input)) < 1e-5
    with pytest.raises(PassPreconditionError, match="has no RoPE"):
        convert(graph, [(toy_input,)], rope={"mode": "decoupled", "dims": 16})


def test_rank_and_layout_errors_name_the_field(trained_llama, calibration):
    graph = capture(trained_llama, (calibration[0][0],))
    with pytest.raises(PassPreconditionError, match=r"kv_rank: 200 exceeds what exactness needs.* = 128"):
        convert(graph, calibration, kv_rank=200)
    with pytest.raises(PassPreconditionError, match=r"kv_rank: 100 exceeds .*rope.dims 32 = 96"):
        convert(graph, calibration, kv_rank=100, rope={"mode": "decoupled", "dims": 32})
    with pytest.raises(PassPreconditionError, match=r"rope.dims: 96 exceeds the 64 rotary key dimensions"):
        convert(graph, calibration, rope={"mode": "decoupled", "dims": 96})
    with pytest.raises(
        PassPreconditionError, match=r"targets: 'decoder\.\*' matches no attention block.*layers\.0\.self_attn"
    ):
        convert(graph, calibration, targets="decoder.*")


def test_models_without_attention_are_refused():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    x = torch.randn(2, 8)
    with pytest.raises(PassPreconditionError, match="matches no attention block.*none"):
        convert(capture(model, (x,)), [(x,)])


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"absorb": True}, "absorb needs rope.mode 'decoupled'"),
        ({"rope": {"mode": "decoupled", "dims": 15}}, "rope.dims must be even"),
        ({"rope": {"mode": "after_up_projection", "dims": 16}}, "decoupled' only"),
        ({"rope": {"mode": "after_up_projection", "freqfold": 2}}, "freqfold and rope.per_frequency apply to"),
        (
            {"rope": {"mode": "after_up_projection", "per_frequency": True}},
            "per_frequency apply to rope.mode 'decoupled'",
        ),
        ({"rope": {"mode": "decoupled", "freqfold": 0}}, "greater than or equal to 1"),
        ({"kv_rank": 0}, "greater than or equal to 1"),
        ({"rope": {"mode": "nope"}}, "after_up_projection"),
    ],
)
def test_config_errors(fields, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        mla(**fields)


def test_kv_ratio_picks_the_rank_a_fraction_of_the_cache_leaves(trained_llama, calibration):
    """2 x 2 KV heads x 32 = 128 numbers per token; half of them, less 32 RoPE dims, is a latent of 32."""
    graph = capture(trained_llama, (calibration[0][0],))
    rope = {"mode": "decoupled", "dims": 32}
    by_ratio = convert(graph, calibration, kv_ratio=0.5, rope=rope)
    by_rank = convert(graph, calibration, kv_rank=32, rope=rope)
    assert {layer.details["kv_rank"] for layer in by_ratio.report.layers} == {32}
    ids = calibration[1][0]
    assert torch.equal(logits(by_ratio.graph, ids), logits(by_rank.graph, ids))
    odd = convert(graph, calibration, kv_ratio=0.3, rope=rope)  # int(38.4) - 32 = 6
    assert {layer.details["kv_rank"] for layer in odd.report.layers} == {6}
    with pytest.raises(PassPreconditionError, match=r"kv_ratio: 0.2 .* leaves no latent beside rope.dims 32"):
        convert(graph, calibration, kv_ratio=0.2, rope=rope)
    with pytest.raises(pydantic.ValidationError, match="kv_rank and kv_ratio are alternatives"):
        mla(kv_rank=32, kv_ratio=0.5)
