"""The onnx target's onnxruntime-genai form: a folder onnxruntime-genai (from PyPI) runs as is."""

from __future__ import annotations

import json

import pytest
import torch

from graphpress import compress
from graphpress.errors import BackendError

og = pytest.importorskip("onnxruntime_genai")

GENAI = {"target": "onnx", "runtime": "onnxruntime-genai"}
DECODE = {"capture": {"mode": "decode"}, "calibration": {"samples": 1, "seq_len": 24}}


def genai_greedy(folder, prompt: list[int], new_tokens: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(torch.tensor([prompt], dtype=torch.int32).numpy())
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "passes, opset",
    [([], 18), ([{"pass": "weight_quant", "targets": "layers.*", "bits": 4, "group_size": 32}], 21)],
    ids=["no passes", "4-bit weights"],
)
def test_the_example_lm_runs_in_onnxruntime_genai(trained_llama, tmp_path, passes, opset):
    """onnxruntime-genai generates, 32 greedy tokens, what graphpress's eager decode loop does (the 4-bit
    weights stored as MatMulNBits, as the runtime runs them)."""
    from graphpress.runtime import TorchDecoder, greedy_generate

    spec = {**DECODE, "passes": passes, "backends": [{**GENAI, "opset": opset}]}
    result = compress("examples/tiny_llama", spec, out_dir=tmp_path)
    record = result.report.backends[0]
    assert record["details"]["onnxruntime_genai"] == {"prompt_tokens": 8, "generated": 16, "agree": 16}
    config = json.loads((tmp_path / "genai_config.json").read_text())
    assert config["model"]["decoder"]["inputs"]["position_ids"] == "position_ids"
    assert config["search"]["past_present_share_buffer"] is True  # GroupQueryAttention alone reads the cache
    lowered = {
        "graphpress::group_query_attention": 4,
        "graphpress::rms_norm": 9,
        **({"graphpress::int_linear": 28} if passes else {}),
    }
    assert record["details"]["contrib_ops"] == lowered
    assert record["op_histogram"]["com.microsoft::GroupQueryAttention"] == 4
    assert record["op_histogram"]["SimplifiedLayerNormalization"] == 9
    assert "Softmax" not in record["op_histogram"] and "Pow" not in record["op_histogram"]  # none left as standard ops
    assert any("no eos_token_id" in w for w in record["warnings"])
    prompt = list(b"def greet(name):\n    ")
    expected = greedy_generate(TorchDecoder(result.graph), torch.tensor([prompt]), 32)[0].tolist()
    assert genai_greedy(tmp_path, prompt, 32) == expected


def test_a_checkpoints_tokenizer_and_special_tokens_travel(hf_llama, tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    checkpoint = tmp_path / "ckpt"
    hf_llama.save_pretrained(checkpoint)
    table = {f"<{i}>": i for i in range(hf_llama.config.vocab_size)}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(table, "<0>")), unk_token="<0>", eos_token="<2>"
    )
    tokenizer.save_pretrained(checkpoint)
    spec = {**DECODE, "backends": [GENAI]}
    result = compress(str(checkpoint), spec, out_dir=tmp_path / "out")
    assert result.report.backends[0]["details"]["onnxruntime_genai"]["agree"] == 16
    config = json.loads((tmp_path / "out" / "genai_config.json").read_text())
    assert config["model"]["eos_token_id"] == hf_llama.config.eos_token_id
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (checkpoint / name).read_bytes()


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"capture": {"mode": "forward"}}, r"runs decode graphs"),
        (
            {
                **DECODE,
                "passes": [{"pass": "kv_cache_quant", "residual": 4, "key": {"axis": "channel", "group_size": 8}}],
            },
            r"keeps a key and a value per layer.*this graph caches layers\.0\.key\.packed.*dynamic KIVI layouts",
        ),
    ],
    ids=["forward graph", "KIVI cache"],
)
def test_graphs_the_runtime_cannot_drive_are_refused_with_the_reason(tmp_path, spec, match):
    with pytest.raises(BackendError, match=r"backends\[0\]\.runtime: onnxruntime-genai " + match):
        compress("examples/tiny_llama", {**spec, "backends": [GENAI]}, out_dir=tmp_path)
    assert not (tmp_path / "genai_config.json").exists()


@pytest.mark.parametrize("family", ["mistral", "gpt2"], ids=["sliding window", "fused qkv, biases, MHA"])
def test_transformers_families_generate_through_group_query_attention(tmp_path, family):
    """Default configs: onnxruntime-genai runs every layer's attention as GroupQueryAttention (Mistral's window
    of 8 tokens in the op) and greedily generates, prompt in one call, what the eager graph does."""
    from .families import build, token_ids

    ids = token_ids(1, 24)
    result = compress(
        build(family), {**DECODE, "backends": [GENAI]}, (ids,), calibration_data=[(ids,)], out_dir=tmp_path
    )
    record = result.report.backends[0]
    assert record["details"]["onnxruntime_genai"] == {"prompt_tokens": 8, "generated": 16, "agree": 16}
    assert record["op_histogram"]["com.microsoft::GroupQueryAttention"] == len(result.graph.cache) // 2
    assert not any("not lowered" in w for w in record["warnings"])
    # tiny GPT-2 configs keep GPT-2's eos_token_id 50256 beyond their 128 tokens: left out, said
    assert any("eos_token_id 50256 is outside its vocabulary of 128" in w for w in record["warnings"]) == (
        family == "gpt2"
    )


@pytest.mark.parametrize("bits, dtype", [(8, "tensor(int8)"), (4, "tensor(uint8)")])
def test_a_static_scale_cache_runs_as_the_ops_quantized_kv_cache(tmp_path, bits, dtype):
    """kv_cache_quant with static scales lowers into GroupQueryAttention's kv_cache_bit_width: the folder's past
    inputs are the codes, and onnxruntime-genai generates what the eager graph does (prompt in one call)."""
    import onnxruntime as ort

    side = {"bits": bits, "axis": "channel"}
    quant = {"pass": "kv_cache_quant", "scales": "static", "residual": 0, "key": side, "value": side}
    spec = {**DECODE, "passes": [quant], "backends": [GENAI], "verify": {"max": 0.2}}  # 4 bits, held-out tokens
    result = compress("examples/tiny_llama", spec, out_dir=tmp_path)
    record = result.report.backends[0]
    assert record["details"]["onnxruntime_genai"] == {"prompt_tokens": 8, "generated": 16, "agree": 16}
    assert record["op_histogram"]["com.microsoft::GroupQueryAttention"] == 4
    assert "BitShift" not in record["op_histogram"] and "Round" not in record["op_histogram"]  # all in the op
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    past = {i.name: (i.type, i.shape[-1]) for i in session.get_inputs() if i.name.startswith("past")}
    assert past["past_key_values.0.key.codes"] == past["past_key_values.3.value.codes"] == (dtype, 32 * bits // 8)
    decoder = json.loads((tmp_path / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key.codes"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value.codes"
    assert decoder["head_size"] == 32
    search = json.loads((tmp_path / "genai_config.json").read_text())["search"]
    assert search["past_present_share_buffer"] is False  # onnxruntime shares quantized caches on CUDA only


MLA = {"pass": "gqa_to_mla", "kv_rank": 32, "rope": {"mode": "decoupled", "dims": 16}}
SIDE4 = {"bits": 4, "axis": "channel"}
STATIC4 = {"pass": "kv_cache_quant", "scales": "static", "residual": 0, "key": SIDE4, "value": SIDE4, "latent": SIDE4}


@pytest.mark.parametrize("passes", [[MLA], [MLA, STATIC4]], ids=["latent", "latent in 4 bits"])
def test_an_absorbed_mla_model_runs_as_one_latent_kv_head(tmp_path, passes):
    """gqa_to_mla's latent cache runs in GroupQueryAttention as one KV head of [latent, RoPE key] (kv_rank 32 +
    16 RoPE dims), its 4-bit static codes as the op's quantized cache, and generates what the eager graph does."""
    spec = {**DECODE, "passes": passes, "backends": [GENAI], "verify": {"max": 1.0}}
    result = compress("examples/tiny_llama", spec, out_dir=tmp_path)
    record = result.report.backends[0]
    assert record["details"]["latent_as_key_value"] == 4
    assert record["details"]["onnxruntime_genai"] == {"prompt_tokens": 8, "generated": 16, "agree": 16}
    assert record["op_histogram"]["com.microsoft::GroupQueryAttention"] == 4
    decoder = json.loads((tmp_path / "genai_config.json").read_text())["model"]["decoder"]
    assert (decoder["num_key_value_heads"], decoder["head_size"]) == (1, 48)


@pytest.mark.parametrize(
    "mla, match",
    [
        ({**MLA, "targets": "layers.0.*"}, r"takes one KV head count and head size for every layer.*layers 0: 1 x 48"),
        ({**MLA, "absorb": False}, r"this graph caches layers\.0\.latent, layers\.0\.k_rope"),
    ],
    ids=["one layer converted", "not absorbed"],
)
def test_latent_caches_the_op_cannot_take_are_refused_with_the_reason(tmp_path, mla, match):
    spec = {**DECODE, "passes": [mla], "backends": [GENAI], "verify": {"max": 1.0}}
    with pytest.raises(BackendError, match=match):
        compress("examples/tiny_llama", spec, out_dir=tmp_path)
    assert not (tmp_path / "genai_config.json").exists()
