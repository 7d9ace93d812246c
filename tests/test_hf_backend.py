"""hf backend: a transformers checkpoint of a compressed model whose architecture transformers can express, loaded
back from the folder alone with the graph's logits; anything else refused by name, nothing written."""

from __future__ import annotations

import pytest
import torch

from graphpress import BackendError, compress
from graphpress.backends import HfBackend
from graphpress.metrics import logits_of

from .families import build

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
    real = HfBackend._state

    def perturbed(self, graph, model):
        state = real(self, graph, model)
        key = next(k for k in state if k.endswith("mlp.up_proj.weight"))
        state[key] = state[key] * 1.5
        return state

    monkeypatch.setattr(HfBackend, "_state", perturbed)
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
