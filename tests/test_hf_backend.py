"""hf backend: a transformers checkpoint of a compressed model whose architecture transformers can express, loaded
back from the folder alone with the graph's logits; anything else refused by name, nothing written."""

from __future__ import annotations

import pytest
import torch

from graphpress import BackendError, compress
from graphpress.backends import HfBackend
from graphpress.metrics import logits_of

from .families import SIZES, build

transformers = pytest.importorskip("transformers")

LOCK = {"passes": [{"pass": "qkvo_lock", "seed": 1}], "verify": {"max": 1.0}, "backends": [{"target": "hf"}]}


def ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "family, mode",
    [("llama", "forward"), ("llama", "decode"), ("qwen2", "forward"), ("gemma", "forward")],
    ids=["llama", "llama-decode", "qwen2-biases", "gemma-tied"],
)
def test_weights_only_compression_is_a_checkpoint_transformers_loads(tmp_path, family, mode):
    """qkvo_lock changes weights, not the architecture: the folder loads with AutoModelForCausalLM and computes the
    compressed graph's logits; the weights are the compressed ones, not the original's."""
    model = build(family)
    spec = {**LOCK, "capture": {"mode": mode}}
    result = compress(model, spec, (ids(),), out_dir=tmp_path, progress=False)
    record = result.report.backends[0]
    assert record["errors"]["rel_l2"] < 1e-5 and record["details"]["class"] == type(model).__name__
    folder = tmp_path / "hf"
    assert result.artifacts["hf"] == folder and (folder / "model.safetensors").exists()
    report = (tmp_path / "report.md").read_text()
    assert "## backend: hf" in report and "`hf/model.safetensors`" in report and "Ops:" not in report
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(loaded) is type(model)
    ours, theirs = loaded.state_dict(), model.state_dict()
    q = next(k for k in theirs if k.endswith("self_attn.q_proj.weight"))
    assert not torch.equal(ours[q], theirs[q])  # locked weights, not the original's
    with torch.no_grad():
        expected = model(ids()).logits
        assert ((logits_of(loaded(ids())) - expected).norm() / expected.norm()) < 1e-5


def test_new_tensors_are_refused_by_name_and_nothing_is_written(tmp_path):
    spec = {**LOCK, "passes": [{"pass": "low_rank", "targets": "layers.*.mlp.*", "rank": 8}], "verify": {"max": 10}}
    with pytest.raises(
        BackendError,
        match=r"backends\[0\]: transformers' LlamaForCausalLM cannot hold .* new tensors "
        r"model\.layers\.0\.mlp\.down_proj\.0\.weight.*tensors gone model\.layers\.0\.mlp\.down_proj\.weight",
    ):
        compress(build("llama"), spec, (ids(),), out_dir=tmp_path, progress=False)
    assert not (tmp_path / "hf").exists()


def test_two_backends_writing_one_folder_are_refused_by_field():
    from graphpress.errors import SpecError
    from graphpress.schema import load_spec

    with pytest.raises(SpecError, match=r"backends\[1\]\.folder: 'hf' is also written by backends\[0\]"):
        load_spec({"backends": [{"target": "hf"}, {"target": "hf"}]})
    load_spec({"backends": [{"target": "hf"}, {"target": "hf", "folder": "hf2"}]})


def test_a_model_that_is_not_transformers_is_refused(tiny_llama, tmp_path):
    with pytest.raises(
        BackendError, match=r"backends\[0\]: the hf target writes transformers checkpoints; .* TinyLlama"
    ):
        compress(tiny_llama, LOCK, (torch.randint(0, 256, (2, 12)),), out_dir=tmp_path, progress=False)


def test_a_checkpoint_that_computes_something_else_fails_the_logits_check(tmp_path, monkeypatch):
    real = HfBackend._checkpoint

    def perturbed(self, graph, model):
        cls, config, state = real(self, graph, model)
        key = next(k for k in state if k.endswith("mlp.up_proj.weight"))
        state[key] = state[key] * 1.5
        return cls, config, state

    monkeypatch.setattr(HfBackend, "_checkpoint", perturbed)
    with pytest.raises(BackendError, match=r"LlamaForCausalLM with the compressed weights differs .* rel_l2 = "):
        compress(build("llama"), LOCK, (ids(),), out_dir=tmp_path, progress=False)
    assert not (tmp_path / "hf").exists()


def test_a_checkpoint_folder_streamed_or_loaded_gives_the_same_bytes(tmp_path):
    """From a checkpoint folder (with its tokenizer file carried over), streamed or loaded in memory: one
    checkpoint, byte for byte."""
    build("llama").save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.json").write_text('{"model": {}}')
    spec = {**LOCK, "calibration": {"samples": 2, "seq_len": 12}}
    for stream in (True, False):
        compress(str(tmp_path / "ckpt"), {**spec, "execution": {"stream": stream}}, out_dir=tmp_path / str(stream))
    streamed, loaded = (tmp_path / str(s) / "hf" for s in (True, False))
    assert (streamed / "tokenizer.json").read_text() == '{"model": {}}'
    for name in ("model.safetensors", "config.json"):
        assert (streamed / name).read_bytes() == (loaded / name).read_bytes()


NM = {"pass": "nm_sparsity", "targets": "*", "exclude": ["lm_head"]}
LUT = {"pass": "weight_clustering", "bits": 4, "group_size": 16}


@pytest.mark.parametrize(
    "passes",
    [
        [LUT],
        [NM],
        [NM, {**LUT, "targets": "*", "exclude": ["lm_head"]}],  # N:M whose kept values are palettized: nested
        [{"pass": "weight_quant", "bits": 4, "group_size": 16}],
        [{"pass": "shift_add", "targets": "*", "exclude": ["lm_head"]}],
    ],
    ids=["lut", "nm", "nm+lut", "int4", "shift"],
)
def test_dense_rebuilds_every_format_into_weights_transformers_holds(tmp_path, passes):
    """``dense``: a compressed-format model is refused without it (with the hint), and with it written as the dense
    weights it stands for: the loaded checkpoint computes the compressed graph's logits."""
    model, spec = build("llama"), {"passes": passes, "verify": {"max": 10.0}, "backends": [{"target": "hf"}]}
    with pytest.raises(BackendError, match=r'cannot hold .* "dense": true writes compressed-format weights'):
        compress(model, spec, (ids(),), out_dir=tmp_path / "refused", progress=False)
    spec["backends"] = [{"target": "hf", "dense": True}]
    result = compress(model, spec, (ids(),), out_dir=tmp_path / "dense", progress=False)
    assert result.report.backends[0]["errors"]["rel_l2"] < 1e-5
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense" / "hf").eval()
    with torch.no_grad():
        expected = logits_of(result.model(ids()))
        assert ((loaded(ids()).logits - expected).norm() / expected.norm()) < 1e-5
    weight = loaded.state_dict()["model.layers.0.mlp.up_proj.weight"]
    if passes[0] is NM:  # 2:4 by default: two of every four inputs zero
        assert torch.equal(
            (weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1),
            torch.full((weight.shape[0], weight.shape[1] // 4), 2),
        )
    if passes == [LUT]:  # at most 16 values per group of 16 rows
        assert weight[:16].unique().numel() <= 16


def mla(kv_rank: int, absorb: bool, **rope) -> dict:
    """gqa_to_mla as DeepSeek's layout needs it: decoupled RoPE on a key that turns like one head (16 dims)."""
    rope = {"mode": "decoupled", "dims": 16, "per_frequency": True, **rope}
    return {"pass": "gqa_to_mla", "kv_rank": kv_rank, "absorb": absorb, "rope": rope}


def mqa_llama() -> torch.nn.Module:
    """Llama with one KV head: RoRoPE keeps all of its RoPE in DeepSeek's one-head key, so the conversion is exact."""
    config = transformers.LlamaConfig(**{**SIZES, "num_key_value_heads": 1})
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(
    "family, kv_rank, absorb, mode",
    [
        ("mqa", 16, False, "forward"),
        ("mqa", 16, True, "forward"),
        ("llama", 8, False, "forward"),
        ("llama", 8, True, "decode"),
        ("qwen2", 8, True, "forward"),
    ],
    ids=["mqa-exact", "mqa-exact-absorbed", "gqa-lossy", "gqa-lossy-absorbed-decode", "qwen2-query-bias"],
)
def test_gqa_to_mla_is_a_deepseek_checkpoint_transformers_runs(tmp_path, family, kv_rank, absorb, mode):
    """TransMLA's deliverable: DeepseekV3ForCausalLM, loaded from the folder alone, computes the converted graph's
    logits; where the conversion is exact (one KV head, full rank), the original's logits and greedy tokens."""
    model = mqa_llama() if family == "mqa" else build(family)
    kv_heads = model.config.num_key_value_heads
    spec = {"passes": [mla(kv_rank, absorb)], "capture": {"mode": mode}, "verify": {"max": 10.0}}
    result = compress(model, {**spec, "backends": [{"target": "hf"}]}, (ids(),), out_dir=tmp_path, progress=False)
    record = result.report.backends[0]
    assert record["errors"]["rel_l2"] < 1e-5 and record["details"]["class"] == "DeepseekV3ForCausalLM"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(loaded).__name__ == "DeepseekV3ForCausalLM"
    # non-absorbed: the rotated keys of all KV heads (16 each) less the RoPE key's 16; values per KV head
    nope, v_dim = (kv_rank, kv_rank) if absorb else (kv_heads * 16 - 16, 16)
    config = loaded.config
    assert (config.kv_lora_rank, config.qk_rope_head_dim, config.qk_nope_head_dim, config.v_head_dim) == (
        kv_rank,
        16,
        nope,
        v_dim,
    )
    assert config.first_k_dense_replace == 2 and not config.rope_interleave
    # DeepSeek's q_proj has no bias: Qwen2's query takes the q_lora path, [x; 1] through an identity norm
    assert config.q_lora_rank == (65 if family == "qwen2" else None)
    with torch.no_grad():
        ours = loaded(ids()).logits
        if mode == "forward":  # the graph's logits, independently of the backend's own check
            expected = logits_of(result.model(ids()))
            assert ((ours - expected).norm() / expected.norm()) < 1e-5
        if kv_heads == 1:  # an exact conversion: the original model's logits and tokens
            original = model(ids()).logits
            assert ((ours - original).norm() / original.norm()) < 1e-5
            prompt = ids(1, 6)
            assert torch.equal(
                loaded.generate(prompt, max_new_tokens=8, do_sample=False),
                model.generate(prompt, max_new_tokens=8, do_sample=False),
            )


@pytest.mark.parametrize(
    "family, conversion, error",
    [
        (
            "llama",
            {"pass": "gqa_to_mla", "kv_rank": 16, "rope": {"mode": "after_up_projection"}},
            r"after_up_projection.* convert with rope.mode 'decoupled'",
        ),
        ("llama", mla(16, False, dims=8), r"turns at table columns .* rope.per_frequency true and rope.dims equal"),
        (
            "llama",
            {**mla(16, False), "targets": "layers.0.*"},
            r"model\.layers\.1\.self_attn is not converted by gqa_to_mla",
        ),
        ("mistral", mla(16, False), r"MistralConfig\.sliding_window = 8: DeepSeek's attention is global"),
    ],
    ids=["after-up", "rope-dims", "some-layers", "sliding-window"],
)
def test_what_deepseeks_layout_cannot_express_is_refused_with_the_reason(tmp_path, family, conversion, error):
    spec = {"passes": [conversion], "verify": {"max": 10.0}, "backends": [{"target": "hf"}]}
    with pytest.raises(BackendError, match=r"backends\[0\]\.layout: .*" + error):
        compress(build(family), spec, (ids(),), out_dir=tmp_path, progress=False)
    assert not (tmp_path / "hf").exists()


def test_the_layout_same_refuses_mla_tensors_naming_deepseek(tmp_path):
    spec = {"passes": [mla(16, False)], "verify": {"max": 10.0}, "backends": [{"target": "hf", "layout": "same"}]}
    with pytest.raises(
        BackendError, match=r"cannot hold .* new tensors .*kv_down.* layout \(\"layout\": \"deepseek_v3\"\)"
    ):
        compress(build("llama"), spec, (ids(),), out_dir=tmp_path, progress=False)


@pytest.mark.parametrize("rms", [1e-3, 1.0, 1e3])
def test_deepseeks_latent_norm_is_the_identity_on_the_scaled_latent(rms):
    """kv_a_layernorm (eps fixed at 1e-6) on sigma c with weight sqrt(eps) / sigma gives c back: the relative error
    sigma^2 mean(c^2) / (2 eps) is below float32's resolution for latents of any scale here."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    from graphpress.backends.hf_deepseek import LATENT_EPS, SIGMA

    norm = DeepseekV3RMSNorm(64)
    assert norm.variance_epsilon == LATENT_EPS
    norm.weight.data.fill_(LATENT_EPS**0.5 / SIGMA)
    c = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * rms
    with torch.no_grad():
        assert ((norm(c * SIGMA) - c).norm() / c.norm()) < 1e-6
