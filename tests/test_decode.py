"""Decode-mode capture and the generation loop: eager and onnxruntime match the original model token for token."""

from __future__ import annotations

import pytest
import torch

from graphpress import compress
from graphpress.ir import capture
from graphpress.ir.decode import CacheLayout
from graphpress.runtime import OnnxDecoder, TorchDecoder, greedy_generate, teacher_forced_logits

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
    assert len(user_inputs) == 2 + len(graph.cache)
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
    assert [i for i in decoder.input_names[:3]] == ["input_ids", "position_ids", "past_key_values.0.key"]
    assert decoder.layout == result.graph.cache
    prompt = torch.tensor([list(b"import os\n")])
    assert torch.equal(greedy_generate(decoder, prompt, 32), reference_greedy(trained_llama, prompt, 32))


def test_decode_capture_rejects_models_without_a_cache_protocol():
    from graphpress.errors import CaptureError

    with pytest.raises(CaptureError, match="init_kv_cache"):
        capture(torch.nn.Linear(4, 4), (torch.randn(1, 4),), mode="decode")
