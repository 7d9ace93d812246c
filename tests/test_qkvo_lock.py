"""qkvo_lock (MergeLock): outputs unchanged to fp32 rounding, weights far from mergeable."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch

from examples.tiny_llama.data import load_split
from graphpress import compress
from graphpress.errors import PassPreconditionError
from graphpress.ir import capture
from graphpress.metrics import perplexity
from graphpress.passes import PassContext, build_pass
from graphpress.passes.qkvo_lock import lock_matrix
from graphpress.runtime import TorchDecoder, teacher_forced_logits
from graphpress.schema import QkvoLockConfig

from .conftest import ToyAttention, rel_err


def lock(graph, **fields):
    config = QkvoLockConfig(**{"pass": "qkvo_lock", **fields})
    return build_pass(config).run(graph, PassContext([], seed=0))


def logits(graph, ids):
    if graph.cache is not None:
        return teacher_forced_logits(TorchDecoder(graph), ids)
    out = graph.module()(ids)
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("max_condition", [1.0, 4.0, 100.0])
@pytest.mark.parametrize("rotary", [0, 16, 8])  # no RoPE, RoPE on all 16 dims, partial rotary on the first 8
def test_lock_matrices_respect_the_condition_bound_and_commute_with_rope(max_condition, rotary):
    gen = torch.Generator().manual_seed(3)
    m = lock_matrix(16, max_condition, gen, rotary)
    assert torch.linalg.cond(m) <= max_condition * (1 + 1e-9)
    half = (rotary or 16) // 2
    theta = torch.rand(half, dtype=torch.float64) * 2 * math.pi  # a half-split RoPE rotation, one angle per pair
    c, s = torch.cat((theta.cos(), theta.cos())), torch.cat((theta.sin(), theta.sin()))
    rotation = torch.eye(16, dtype=torch.float64)
    rotation[: 2 * half, : 2 * half] = torch.diag(c) + torch.diag(-s[:half], half) + torch.diag(s[:half], -half)
    commutator = (m @ rotation - rotation @ m).abs().max()
    assert (commutator < 1e-12) == bool(rotary) or max_condition == 1.0 and not rotary and commutator >= 1e-12


@pytest.mark.parametrize("mode", ["forward", "decode"])
def test_locked_example_lm_is_exact(trained_llama, mode):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    graph = capture(trained_llama, (ids,), mode=mode)
    result = lock(graph)
    assert rel_err(logits(result.graph, ids), trained_llama(ids)) < 1e-5
    assert len(result.report.layers) == trained_llama.config.num_layers
    for layer in result.report.layers:
        assert layer.details["rope_commuting"] and layer.details["max_condition"] <= 4.0
        assert min(layer.details["weight_change"].values()) > 0.3  # the weights really moved
    assert result.report.details["worst_condition"] <= 4.0


@pytest.mark.parametrize("mode", ["forward", "decode"])
def test_locked_transformers_llama_is_exact(hf_llama, mode):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    graph = capture(hf_llama, (ids,), mode=mode)
    assert rel_err(logits(lock(graph).graph, ids), hf_llama(ids).logits) < 1e-5


@pytest.mark.parametrize(
    "rope, bias, fields",
    [
        (None, False, {}),
        ("half", True, {}),
        ("interleaved", False, {}),  # GPT-J pairs (2i, 2i + 1): the permuted lock family
        ("interleaved", False, {"qk": False}),
        ("half", False, {"vo": False}),
    ],
)
def test_toy_attention_variants_are_exact(rope, bias, fields):
    torch.manual_seed(0)
    model = ToyAttention(rope, bias=bias).eval()
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    result = lock(capture(model, (x,)), **fields)
    assert rel_err(result.graph.module()(x), model(x)) < 1e-5
    details = result.report.layers[0].details
    assert details["qk_matrices"] == (0 if fields.get("qk") is False else 2)
    assert details["vo_matrices"] == (0 if fields.get("vo") is False else 2)


def test_averaging_with_a_locked_copy_breaks_the_model(trained_llama):
    """Weight averaging merges the original with a nearby copy fine, and with its locked twin not at all."""
    heldout = load_split("heldout")[:4096]
    graph = capture(trained_llama, (heldout[:64].unsqueeze(0),))
    locked = lock(graph).graph
    params = list(graph.program.graph_signature.parameters)

    def merged_perplexity(other) -> float:
        merged = graph.clone()
        for name in params:
            merged.set_weight(name, (graph.weight(name) + other(name)) / 2)
        return perplexity(merged.module(), heldout, seq_len=128)

    original = perplexity(trained_llama, heldout, seq_len=128)
    gen = torch.Generator().manual_seed(1)
    nearby = merged_perplexity(
        lambda n: graph.weight(n) * (1 + 0.01 * torch.randn(graph.weight(n).shape, generator=gen))
    )
    assert nearby < 1.02 * original
    assert merged_perplexity(locked.weight) > 2 * original


def test_same_seed_same_weights_other_seed_other_weights(trained_llama):
    graph = capture(trained_llama, (torch.randint(0, 256, (1, 8)),))
    name = "layers.0.self_attn.k_proj.weight"
    a, b, c = (lock(graph, seed=s).graph.weight(name) for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)


KEY = 6150391274561339807  # a random 63-bit key


def test_locked_model_exports_to_onnx_exactly_and_no_file_holds_the_key(tmp_path):
    spec = {
        "capture": {"mode": "decode"},
        "calibration": {"samples": 1, "seq_len": 16},
        "verify": {"max": 1e-5},
        "passes": [{"pass": "qkvo_lock", "targets": "layers.*.self_attn", "seed": KEY}],
    }
    result = compress("examples/tiny_llama", spec, out_dir=tmp_path)
    assert result.report.passes[0]["verification"]["rel_l2"] < 1e-5
    assert result.report.backends[0]["errors"]["rel_l2"] < 1e-5
    forms = [str(KEY).encode(), f"{KEY:x}".encode(), KEY.to_bytes(8, "little"), KEY.to_bytes(8, "big")]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"report.json", "report.md", "model.onnx"} <= {p.name for p in files}
    for path in files:
        data = path.read_bytes()
        assert not any(form in data for form in forms), f"{path.name} holds the lock's key"
    assert result.report.passes[0]["config"]["seed"] == result.report.spec["passes"][0]["seed"] == "<redacted>"
    assert not any("seed" in w for w in result.report.warnings)  # a 63-bit key: no warning


def test_without_a_key_each_run_draws_a_fresh_one_and_says_so():
    """The default key is not the calibration seed (public in every report): two runs lock differently."""
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    graph = capture(ToyAttention("half").eval(), (x,))
    first, second = lock(graph), lock(graph)
    name = "q_proj.weight"
    assert not torch.equal(first.graph.weight(name), second.graph.weight(name))
    assert any("fresh random key" in w for w in first.report.warnings)
    assert any("below 2^32 can be found" in w for w in lock(graph, seed=11).report.warnings)


def test_bad_input_is_refused():
    x = torch.randn(2, 8, 32)
    graph = capture(ToyAttention("reversed").eval(), (x,))
    with pytest.raises(PassPreconditionError, match="half-split or interleaved pairs.*set qk: false"):
        lock(graph)
    with pytest.raises(PassPreconditionError, match="matches no attention block.*self_attn|matches no attention"):
        lock(graph, targets="nothing.*")
    with pytest.raises(pydantic.ValidationError, match="nothing to lock"):
        QkvoLockConfig(**{"pass": "qkvo_lock", "qk": False, "vo": False})
    with pytest.raises(pydantic.ValidationError, match="greater than or equal to 1"):
        QkvoLockConfig(**{"pass": "qkvo_lock", "max_condition": 0.5})
