"""Decode-mode capture and the generation loop: eager and onnxruntime match the original model token for token."""

from __future__ import annotations

import pytest
import torch

from graphpress import compress
from graphpress.ir import capture
from graphpress.ir.decode import CacheLayout
from graphpress.runtime import OnnxDecoder, TorchDecoder, greedy_generate, prefill, teacher_forced_logits

from .conftest import rel_err


def reference_greedy(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding by re-running the model's full forward on the growing sequence."""
    tokens = prompt
    with torch.no_grad():
        for _ in range(n):
            out = model(tokens)
            logits = out.logits if hasattr(out, "logits") else out
            tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
    return tokens


def test_decode_graph_has_the_cache_at_its_boundary(tiny_llama):
    graph = capture(tiny_llama, (torch.zeros(1, 8, dtype=torch.long),), mode="decode")
    cfg = tiny_llama.config
    assert [e.name for e in graph.cache] == [f"layers.{i}.{k}" for i in range(cfg.num_layers) for k in ("key", "value")]
    assert graph.cache.bytes_per_token == cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    assert graph.summary().kv_cache_bytes_per_token == graph.cache.bytes_per_token
    user_inputs = [s.arg.name for s in graph.program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    assert user_inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert len(user_inputs) == 3 + len(graph.cache)
    assert len(graph.program.graph_signature.user_outputs) == 1 + len(graph.cache)
    assert [b.path for b in graph.attention_blocks()] == [f"layers.{i}.self_attn" for i in range(cfg.num_layers)]
    assert CacheLayout.from_json(graph.cache.to_json()) == graph.cache


@pytest.mark.parametrize("batch", [1, 3])
def test_teacher_forced_decode_equals_forward(tiny_llama, batch):
    graph = capture(tiny_llama, (torch.zeros(1, 8, dtype=torch.long),), mode="decode")
    ids = torch.randint(0, 256, (batch, 20), generator=torch.Generator().manual_seed(batch))
    assert rel_err(teacher_forced_logits(TorchDecoder(graph), ids), tiny_llama(ids)) < 1e-5


def test_greedy_generation_matches_the_example_model(trained_llama):
    graph = capture(trained_llama, (torch.zeros(1, 8, dtype=torch.long),), mode="decode")
    prompt = torch.tensor([list(b"def main(")] * 2)
    ours = greedy_generate(TorchDecoder(graph), prompt, 24)
    assert torch.equal(ours, reference_greedy(trained_llama, prompt, 24))


def test_greedy_generation_matches_transformers_generate(hf_llama):
    graph = capture(hf_llama, (torch.zeros(2, 8, dtype=torch.long),), mode="decode")
    assert [b.path for b in graph.attention_blocks()] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    prompt = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    expected = hf_llama.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(greedy_generate(TorchDecoder(graph), prompt, 16), expected)


def test_onnx_decode_loop_matches_eager(trained_llama, tmp_path):
    spec = {"capture": {"mode": "decode"}, "calibration": {"samples": 2, "seq_len": 32}}
    result = compress("examples/tiny_llama", spec, out_dir=tmp_path)
    assert result.report.compressed["kv_cache_bytes_per_token"] == 4 * 2 * 2 * 32 * 4
    assert result.report.backends[0]["errors"]["rel_l2"] < 1e-5
    decoder = OnnxDecoder(result.artifacts["onnx"])
    assert decoder.input_names[:4] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    assert decoder.layout == result.graph.cache
    import math

    import onnx

    stored = onnx.load(result.artifacts["onnx"], load_external_data=False).graph.initializer
    weights = [t.name for t in stored if math.prod(t.dims) >= 256]  # every weight, transposed by the exporter
    assert "layers.0.mlp.down_proj.weight" in weights and not [n for n in weights if n.startswith("val_")]
    prompt = torch.tensor([list(b"import os\n")])
    assert torch.equal(greedy_generate(decoder, prompt, 32), reference_greedy(trained_llama, prompt, 32))


def test_decode_capture_rejects_models_without_a_cache_protocol():
    from graphpress.errors import CaptureError

    with pytest.raises(CaptureError, match="init_kv_cache"):
        capture(torch.nn.Linear(4, 4), (torch.randn(1, 4),), mode="decode")


# ---------------------------------------------------------------------- one graph for prompt and decode
PROMPT_PASSES = {
    "plain": [],
    "mla after_up": [{"pass": "gqa_to_mla", "kv_rank": 64}],
    "mla absorbed": [{"pass": "gqa_to_mla", "kv_rank": 64, "rope": {"mode": "decoupled", "dims": 32}}],
    "kivi": [
        {
            "pass": "kv_cache_quant",
            "key": {"bits": 4, "axis": "channel", "group_size": 8},
            "value": {"bits": 4, "axis": "token", "group_size": 32},
            "residual": 4,
        }
    ],
}


@pytest.fixture(scope="module")
def prompt_graphs(trained_llama):
    from graphpress.passes import PassContext, build_pass
    from graphpress.schema import load_spec

    calibration = [(torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(7)),)]
    graphs = {}
    for name, passes in PROMPT_PASSES.items():
        graph, ctx = capture(trained_llama, calibration[0], mode="decode"), PassContext(calibration)
        for config in load_spec({"passes": passes}).passes:
            graph = build_pass(config).run(graph, ctx).graph
        graphs[name] = graph
    return graphs


@pytest.mark.parametrize("name", list(PROMPT_PASSES))
def test_a_prompt_goes_in_one_call(prompt_graphs, name):
    """prefill() is one call of the step graph; it gives the logits of feeding the prompt token by token
    (a quantized cache: the prompt attends its own keys and values unquantized, as KIVI's prefill does, and
    leaves the cache split as the token loop leaves it)."""
    graph = prompt_graphs[name]
    assert graph.cache.step_tokens is None
    decoder = TorchDecoder(graph)
    ids = torch.tensor([list(b"def parse(line):\n    return"), list(b"import numpy as np\nx = np.z")])
    logits, cache = prefill(decoder, ids)
    if name == "kivi":
        assert rel_err(logits, prefill(TorchDecoder(prompt_graphs["plain"]), ids)[0]) < 1e-5
        looped = _token_loop_cache(decoder, ids)
        assert [t.shape for t in cache] == [t.shape for t in looped]
        assert cache[graph.cache.index("layers.0.value.packed")].shape[2] == ids.shape[1] - 4
    else:
        assert rel_err(logits, teacher_forced_logits(decoder, ids)) < 1e-5


def _token_loop_cache(decoder, ids):
    cache, ones = decoder.layout.empty(ids.shape[0]), torch.ones_like(ids)
    for t in range(ids.shape[1]):
        _, cache = decoder.step(ids[:, t : t + 1], ones[:, : t + 1], torch.full((ids.shape[0], 1), t), cache)
    return cache


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROMPT_PASSES))
def test_onnx_step_graph_takes_prompts_and_steps(prompt_graphs, name, tmp_path):
    """The ONNX file is the same one graph: a prompt in one call, then single-token steps, as eager."""
    from graphpress.backends import build_backend
    from graphpress.schema import OnnxBackendConfig

    graph = prompt_graphs[name]
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    record = build_backend(OnnxBackendConfig(target="onnx"), "backends[0]").build(graph, [(ids,)], tmp_path)
    onnx_decoder = OnnxDecoder(record.artifact)
    import onnx

    inputs = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in onnx.load(record.artifact).graph.input
    }
    assert inputs["input_ids"] == inputs["position_ids"] == ["batch_size", "sequence_length"]
    assert inputs["attention_mask"] == ["batch_size", "total_sequence_length"]
    ours = greedy_generate(onnx_decoder, ids[:, :12], 8)
    assert torch.equal(ours, greedy_generate(TorchDecoder(graph), ids[:, :12], 8))
    logits, _ = prefill(onnx_decoder, ids)
    assert rel_err(logits, prefill(TorchDecoder(graph), ids)[0]) < 1e-5


@pytest.mark.parametrize("name", ["plain", "mla absorbed"])
def test_left_padded_batch_generates_what_each_prompt_alone_does(prompt_graphs, name):
    """Prompts of unequal length share a batch, left-padded under attention_mask."""
    decoder = TorchDecoder(prompt_graphs[name])
    prompts = [list(b"while True:\n    "), list(b"# sum")]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = greedy_generate(decoder, ids, 12, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone = greedy_generate(decoder, torch.tensor([prompt]), 12)
        assert torch.equal(batched[row, width - len(prompt) :], alone[0])


def test_padded_prompts_generate_as_transformers_generate_does(hf_llama):
    graph = capture(hf_llama, (torch.zeros(2, 8, dtype=torch.long),), mode="decode")
    assert graph.cache.step_tokens is None
    prompt = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompt)
    prompt[1, :2], mask[1, :2] = 0, 0
    expected = hf_llama.generate(
        prompt, attention_mask=mask, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0
    )
    assert torch.equal(greedy_generate(TorchDecoder(graph), prompt, 12, attention_mask=mask), expected)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2", "gemma3", "gpt2", "gptneox"])
def test_families_generate_left_padded_prompts_as_transformers_does(name):
    """Default configs; the step takes the prompt in one call, or token by token where the family's attention
    pins the query length (the generated tokens are the same either way)."""
    from .families import build, token_ids

    model = build(name)
    graph = capture(model, (token_ids(2, 8),), mode="decode")
    prompt = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompt)
    prompt[1, :2], mask[1, :2] = 0, 0
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    expected = model.generate(
        prompt, attention_mask=mask, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=pad
    )
    assert torch.equal(greedy_generate(TorchDecoder(graph), prompt, 12, attention_mask=mask), expected)


def test_attention_that_pins_the_query_length_gets_a_one_token_step():
    """transformers' eager attention branches on the query length under export: the capture notices (a
    one-token prompt is refused) and captures one token per step; prefill then loops."""
    from .families import build, token_ids

    model = build("llama_eager")
    graph = capture(model, (token_ids(1, 8),), mode="decode")
    assert graph.cache.step_tokens == 1
    ids = token_ids(2, 9, seed=1)
    logits, _ = prefill(TorchDecoder(graph), ids)
    assert rel_err(logits, model(ids).logits) < 1e-5
    assert capture(model, (token_ids(1, 8),), mode="decode", step_tokens=1).cache.step_tokens == 1
