"""graphpress::group_query_attention (onnxruntime's GroupQueryAttention) and the rule that lowers a step's
attention to it (the onnxruntime-genai target)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from examples.tiny_llama.model import TinyLlama, TinyLlamaConfig, init_weights
from graphpress import compress
from graphpress.backends.fuse_gqa import fuse_group_query_attention
from graphpress.ir import ops
from graphpress.ir.capture import capture
from graphpress.ir.ops.kv_quant import kv_quantize_static_reference as quantize_cache
from graphpress.runtime import TorchDecoder, prefill, teacher_forced_logits

from .families import build, token_ids

ort = pytest.importorskip("onnxruntime")
GQA = torch.ops.graphpress.group_query_attention.default
HEADS, KV_HEADS, SIZE = 4, 2, 8


class Attention(torch.nn.Module):
    def __init__(self, bits: int, window: int):
        super().__init__()
        self.bits, self.window = bits, window
        scales = torch.linspace(0.02, 0.1, KV_HEADS * SIZE).reshape(1, KV_HEADS, 1, SIZE)
        self.k_scale = torch.nn.Buffer(scales) if bits else None
        self.v_scale = torch.nn.Buffer(scales.flip(-1)) if bits else None

    def forward(self, q, k, v, past_k, past_v, mask):
        return GQA(
            q, k, v, past_k, past_v, mask, HEADS, KV_HEADS, 0.3, self.window, self.k_scale, self.v_scale, self.bits
        )


def _step(module: Attention, batch: int, past: int, steps: int, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, steps, HEADS * SIZE, generator=g)
    k, v = (torch.randn(batch, steps, KV_HEADS * SIZE, generator=g) for _ in range(2))
    past_k, past_v = (torch.randn(batch, KV_HEADS, past, SIZE, generator=g) * 0.3 for _ in range(2))
    if module.bits:
        past_k, past_v = (
            quantize_cache(past_k, module.k_scale, module.bits),
            quantize_cache(past_v, module.v_scale, module.bits),
        )
    return q, k, v, past_k, past_v, torch.ones(batch, past + steps, dtype=torch.long)


@pytest.mark.parametrize("bits", [0, 8, 4], ids=["float cache", "int8 cache", "int4 cache"])
@pytest.mark.parametrize("window", [-1, 3], ids=["causal", "window 3"])
def test_the_reference_is_what_onnxruntime_computes(tmp_path, bits, window):
    """Prompts, steps after a past, several tokens after a past, batches: output and present cache
    (quantized codes bit for bit) equal onnxruntime's GroupQueryAttention's."""
    module = Attention(bits, window)
    batch, seq, past = (torch.export.Dim(n) for n in ("batch", "seq", "past"))
    dims = [{0: batch, 1: seq}] * 3 + [{0: batch, 2: past}] * 2 + [{0: batch, 1: torch.export.Dim.AUTO}]
    program = torch.export.export(module, _step(module, 2, 4, 3), dynamic_shapes=dims)
    onnx_program = torch.onnx.export(program, dynamo=True, custom_translation_table=ops.onnx_translations(21))
    onnx_program.save(str(tmp_path / "gqa.onnx"))
    session = ort.InferenceSession(str(tmp_path / "gqa.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for b, p, s in [(1, 0, 5), (2, 0, 3), (1, 6, 1), (2, 6, 1), (1, 6, 3)]:
        args = _step(module, b, p, s, seed=p + s)
        ours = module(*args)
        theirs = session.run(None, {n: a.numpy() for n, a in zip(names, args)})
        torch.testing.assert_close(torch.from_numpy(theirs[0]), ours[0], rtol=1e-5, atol=1e-6)
        for cache, expected in zip(theirs[1:], ours[1:]):
            assert np.array_equal(cache, expected.numpy())


def test_the_reference_attends_as_the_window_and_causality_say():
    """The newest query of a 4-token step after 6 past tokens sees keys 7..9 with a window of 3: its output is
    the probability-weighted mean of those values only."""
    module = Attention(0, 3)
    q, k, v, past_k, past_v, mask = _step(module, 1, 6, 4)
    out, keys, values = module(q, k, v, past_k, past_v, mask)
    head = 0
    query = q[0, -1].view(HEADS, SIZE)[head]
    seen = slice(7, 10)
    weights = torch.softmax(keys[0, 0, seen] @ query * 0.3, 0)
    torch.testing.assert_close(out[0, -1].view(HEADS, SIZE)[head], weights @ values[0, 0, seen])


@pytest.mark.parametrize(
    "family, window",
    [("llama", -1), ("llama_mha", -1), ("qwen3", -1), ("mistral", 8), ("gemma3", 8), ("phi3", -1), ("gpt2", -1)],
)
def test_transformers_attention_is_lowered_and_computes_the_same(family, window):
    """Default configs (sliding windows measured from the mask, not read from the config): every layer is
    lowered, and prompt-in-one-call and token-by-token logits equal the original graph's, past the window."""
    ids = token_ids(2, 12)
    graph = capture(build(family), (ids,), mode="decode")
    lowered, counts, skipped = fuse_group_query_attention(graph)
    nodes = [n for n in lowered.nodes if n.target is GQA]
    assert skipped == [] and counts[GQA.name()] == len(nodes) == len(graph.cache) // 2
    assert {n.args[9] for n in nodes} == {window}
    assert not any(n.target is torch.ops.aten.scaled_dot_product_attention.default for n in lowered.nodes)
    for run in (teacher_forced_logits, lambda d, x: prefill(d, x, torch.ones_like(x))[0]):
        torch.testing.assert_close(run(TorchDecoder(lowered), ids), run(TorchDecoder(graph), ids), rtol=1e-5, atol=1e-5)


class SeesAhead(TinyLlama):
    """A step whose queries see every token of the step, the later ones too: not causal."""

    def forward(self, input_ids, past_key_values, position_ids, attention_mask):
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope_at(position_ids)
        mask = attention_mask[:, None, None, :].bool()
        present = []
        for layer, past in zip(self.layers, past_key_values, strict=True):
            x, kv = layer(x, cos, sin, past, mask)
            present.append(kv)
        return self.lm_head(self.norm(x)), present


def test_attention_the_op_cannot_express_is_left_alone_with_the_reason():
    model = SeesAhead(TinyLlamaConfig(num_layers=1))
    init_weights(model, seed=0)
    graph = capture(model.eval(), (torch.zeros(2, 4, dtype=torch.long),), mode="decode")
    lowered, counts, skipped = fuse_group_query_attention(graph)
    assert not counts
    assert skipped == [
        "attention layers.0.self_attn: its mask is not causal (nor causal within a sliding window) on unpadded steps"
    ]
    assert not any(n.target is GQA for n in lowered.nodes)


def test_a_rewritten_cache_is_left_alone_and_the_onnxruntime_genai_target_names_it(tmp_path):
    spec = {
        "capture": {"mode": "decode"},
        "calibration": {"samples": 1, "seq_len": 16},
        "passes": [{"pass": "gqa_to_mla", "kv_rank": 32, "rope": {"mode": "decoupled", "dims": 8}}],
    }
    graph = compress("examples/tiny_llama", spec, out_dir=tmp_path).graph
    _, counts, skipped = fuse_group_query_attention(graph)
    assert not counts and len(skipped) == 4
    assert "its keys are not a key cache entry's cat([past, new]) (a rewritten cache)" in skipped[0]
