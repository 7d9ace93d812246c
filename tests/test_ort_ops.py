"""onnxruntime's fused ops as graphpress ops, and the rules that lower a graph to them (the onnxruntime-genai
target; norms also with ort_contrib_ops): group_query_attention (GroupQueryAttention) and rms_norm
(SimplifiedLayerNormalization)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from examples.tiny_llama.model import TinyLlama, TinyLlamaConfig, init_weights
from graphpress import compress
from graphpress.backends.fuse_gqa import fuse_group_query_attention
from graphpress.backends.fuse_norm import fuse_rms_norms
from graphpress.backends.latent_kv import latent_as_key_value
from graphpress.ir import ops
from graphpress.ir.capture import capture
from graphpress.ir.ops.kv_quant import kv_quantize_static_reference as quantize_cache
from graphpress.runtime import TorchDecoder, prefill, teacher_forced_logits

from .families import build, token_ids

ort = pytest.importorskip("onnxruntime")
GQA = torch.ops.graphpress.group_query_attention.default
HEADS, KV_HEADS, SIZE = 4, 2, 16  # onnxruntime rotates heads of a multiple of 16


class Attention(torch.nn.Module):
    def __init__(self, bits: int, window: int, rope: str | None = None):
        super().__init__()
        self.bits, self.window, self.interleaved = bits, window, rope == "interleaved"
        scales = torch.linspace(0.02, 0.1, KV_HEADS * SIZE).reshape(1, KV_HEADS, 1, SIZE)
        self.k_scale = torch.nn.Buffer(scales) if bits else None
        self.v_scale = torch.nn.Buffer(scales.flip(-1)) if bits else None
        angles = torch.arange(32.0)[:, None] * 10000.0 ** -(torch.arange(SIZE // 2) / (SIZE // 2))
        self.cos = torch.nn.Buffer(angles.cos()) if rope else None
        self.sin = torch.nn.Buffer(angles.sin()) if rope else None

    def forward(self, q, k, v, past_k, past_v, mask, positions):
        rope = (positions if self.cos is not None else None, self.cos, self.sin)
        config = (HEADS, KV_HEADS, 0.3, self.window, self.interleaved, self.k_scale, self.v_scale, self.bits)
        return GQA(q, k, v, past_k, past_v, mask, *rope, *config)


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
    positions = torch.arange(past, past + steps).expand(batch, -1)
    return q, k, v, past_k, past_v, torch.ones(batch, past + steps, dtype=torch.long), positions


@pytest.mark.parametrize("bits", [0, 8, 4], ids=["float cache", "int8 cache", "int4 cache"])
@pytest.mark.parametrize(
    "window, rope", [(-1, None), (3, None), (-1, "half"), (3, "interleaved")], ids=["causal", "window", "rope", "both"]
)
def test_the_reference_is_what_onnxruntime_computes(tmp_path, bits, window, rope):
    """Prompts, steps after a past, several tokens after a past, batches, RoPE in the op (half-split and
    interleaved pairs): output and present cache (quantized codes bit for bit) equal onnxruntime's
    GroupQueryAttention's."""
    module = Attention(bits, window, rope)
    batch, seq, past = (torch.export.Dim(n) for n in ("batch", "seq", "past"))
    dims = [{0: batch, 1: seq}] * 3 + [{0: batch, 2: past}] * 2 + [{0: batch, 1: torch.export.Dim.AUTO}]
    program = torch.export.export(module, _step(module, 2, 4, 3), dynamic_shapes=[*dims, {0: batch, 1: seq}])
    onnx_program = torch.onnx.export(program, dynamo=True, custom_translation_table=ops.onnx_translations(21))
    onnx_program.save(str(tmp_path / "gqa.onnx"))
    session = ort.InferenceSession(str(tmp_path / "gqa.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for b, p, s in [(1, 0, 5), (2, 0, 3), (1, 6, 1), (2, 6, 1), (1, 6, 3)]:
        args = _step(module, b, p, s, seed=p + s)
        ours = module(*args)
        theirs = session.run(None, {n: a.numpy() for n, a in zip(names, args)})
        torch.testing.assert_close(torch.from_numpy(theirs[0]), ours[0], rtol=1e-5, atol=1e-5)
        for cache, expected in zip(theirs[1:], ours[1:]):
            if expected.is_floating_point():  # RoPE's products round in their own order
                torch.testing.assert_close(torch.from_numpy(cache), expected, rtol=1e-6, atol=1e-6)
            else:
                assert np.array_equal(cache, expected.numpy())


def test_the_reference_attends_as_the_window_and_causality_say():
    """The newest query of a 4-token step after 6 past tokens sees keys 7..9 with a window of 3: its output is
    the probability-weighted mean of those values only."""
    module = Attention(0, 3)
    q, k, v, past_k, past_v, mask, positions = _step(module, 1, 6, 4)
    out, keys, values = module(q, k, v, past_k, past_v, mask, positions)
    head = 0
    query = q[0, -1].view(HEADS, SIZE)[head]
    seen = slice(7, 10)
    weights = torch.softmax(keys[0, 0, seen] @ query * 0.3, 0)
    torch.testing.assert_close(out[0, -1].view(HEADS, SIZE)[head], weights @ values[0, 0, seen])


@pytest.mark.parametrize(
    "family, window, rotary",
    [
        ("llama", -1, True),
        ("llama_mha", -1, True),
        ("qwen3", -1, True),
        ("mistral", 8, True),
        ("gemma3", 8, "onnxruntime rotates heads of a multiple of 16 dims, these have 24"),
        ("phi3", -1, False),
        ("gpt2", -1, False),
    ],
)
def test_transformers_attention_is_lowered_and_computes_the_same(family, window, rotary):
    """Default configs (sliding windows measured from the mask, not read from the config; RoPE tables read off
    the graph at every position): every layer is lowered, RoPE moves into the op where it can (else the reason
    is given; GPT-2 has none, Phi-3's split of a fused QKV is not matched as one), and prompt-in-one-call and
    token-by-token logits equal the original graph's, past the window."""
    ids = token_ids(2, 12)
    graph = capture(build(family), (ids,), mode="decode")
    lowered, counts, notes = fuse_group_query_attention(graph, positions=64)
    nodes = [n for n in lowered.nodes if n.target is GQA]
    assert counts[GQA.name()] == len(nodes) == len(graph.cache) // 2
    assert {n.args[12] for n in nodes} == {window}
    assert {n.args[7] is not None for n in nodes} == {rotary is True}
    expected = [f"RoPE stays outside GroupQueryAttention: {rotary}"] * len(nodes) if isinstance(rotary, str) else []
    assert [note.split(": ", 1)[1] for note in notes] == expected
    assert not any(n.target is torch.ops.aten.scaled_dot_product_attention.default for n in lowered.nodes)
    if rotary is True:  # one pair of tables, shared, covering the 64 positions
        tables = {n: t for n, t in lowered.tensors().items() if n.startswith("group_query_attention.")}
        assert sorted(tables) == ["group_query_attention.rope0.cos_cache", "group_query_attention.rope0.sin_cache"]
        head = nodes[0].args[0].meta["val"].shape[-1] // nodes[0].args[9]
        assert {tuple(t.shape) for t in tables.values()} == {(64, head // 2)}
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
        "attention layers.0.self_attn: not lowered to GroupQueryAttention: its mask is not causal (nor causal within "
        "a sliding window) on unpadded steps"
    ]
    assert not any(n.target is GQA for n in lowered.nodes)


@pytest.mark.parametrize("bits", [0, 4], ids=["float latent", "4-bit static latent"])
def test_absorbed_mla_attends_as_one_key_value_head_and_then_lowers(tmp_path, bits):
    """gqa_to_mla's latent and RoPE key are no key/value pair, so GroupQueryAttention leaves them; as one head of
    [latent, RoPE key] for both key and value (the output cut to the latent's channels) they are, exactly, at
    twice the latent's bytes, and then every layer lowers with the same logits."""
    side = {"bits": 4, "axis": "channel"}
    quant = {"pass": "kv_cache_quant", "scales": "static", "residual": 0, "key": side, "value": side, "latent": side}
    spec = {
        "capture": {"mode": "decode"},
        "calibration": {"samples": 1, "seq_len": 16},
        "passes": [{"pass": "gqa_to_mla", "kv_rank": 32, "rope": {"mode": "decoupled", "dims": 16}}]
        + ([quant] if bits else []),
        "verify": {"max": 1.0},
    }
    graph = compress("examples/tiny_llama", spec, out_dir=tmp_path).graph
    _, counts, skipped = fuse_group_query_attention(graph)
    assert not counts and len(skipped) == 4
    assert "its keys are not a key cache entry's cat([past, new]) (a rewritten cache)" in skipped[0]

    widened, rewritten, notes = latent_as_key_value(graph)
    suffix, width = (".codes", 24) if bits else ("", 48)
    assert (rewritten, notes) == (4, [])
    assert [(e.name, e.shape) for e in widened.cache][:2] == [
        (f"layers.0.key{suffix}", (None, 1, None, width)),
        (f"layers.0.value{suffix}", (None, 1, None, width)),
    ]
    assert widened.cache.bytes_per_token == 2 * graph.cache.bytes_per_token
    lowered, counts, _ = fuse_group_query_attention(widened)
    assert counts[GQA.name()] == 4
    ids = token_ids(2, 12)
    for run in (teacher_forced_logits, lambda d, x: prefill(d, x, torch.ones_like(x))[0]):
        expected = run(TorchDecoder(graph), ids)
        for rewritten_graph in (widened, lowered):
            torch.testing.assert_close(run(TorchDecoder(rewritten_graph), ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "family, norms",
    [("llama", 5), ("qwen3", 9), ("gemma", 5), ("gemma3", 13), ("phi3", 5), ("gpt2", 0)],
    ids=["llama", "qwen3 (QK-norm)", "gemma (1 + w)", "gemma3 (four a layer)", "phi3", "gpt2 (LayerNorm: none)"],
)
def test_every_rms_norm_becomes_one_op_and_computes_the_same(family, norms):
    """Default configs, two layers: every RMSNorm (and nothing else) becomes rms_norm; no pow/rsqrt is left
    where every norm was one, and the logits are unchanged."""
    ids = token_ids(2, 6)
    graph = capture(build(family), (ids,), mode="decode")
    fused, counts = fuse_rms_norms(graph)
    assert counts[torch.ops.graphpress.rms_norm.default.name()] == norms
    if norms:
        assert not any(n.target is torch.ops.aten.rsqrt.default for n in fused.nodes)
    torch.testing.assert_close(
        teacher_forced_logits(TorchDecoder(fused), ids), teacher_forced_logits(TorchDecoder(graph), ids), rtol=0, atol=0
    )


def test_rms_norm_exports_as_onnxruntimes_simplified_layer_normalization(tmp_path):
    class Norm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, 16))

        def forward(self, x):
            return torch.ops.graphpress.rms_norm(x, self.weight, 1e-5)

    model, x = Norm(), torch.randn(2, 3, 16)
    program = torch.export.export(model, (x,), dynamic_shapes=[{0: torch.export.Dim.AUTO}])
    onnx_program = torch.onnx.export(program, dynamo=True, custom_translation_table=ops.onnx_translations(18))
    onnx_program.save(str(tmp_path / "norm.onnx"))
    assert [n.op_type for n in onnx_program.model.graph] == ["SimplifiedLayerNormalization"]
    session = ort.InferenceSession(str(tmp_path / "norm.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-5, atol=1e-6)
