"""distill: KL distillation from the original lowers the held-out KL of a lossy graph, trains only float tensors
of the declared groups (every format intact), leaves an exact rewrite alone, and is deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from examples.tiny_llama import calibration_batches
from examples.tiny_llama.data import load_split
from graphpress import compress
from graphpress.errors import PassPreconditionError, SpecError
from graphpress.ir import capture
from graphpress.metrics import logits_of
from graphpress.passes import PassContext, build_pass
from graphpress.passes.distill import decoder_blocks, hidden_error, kl, learning_rate_factor, tap
from graphpress.schema import DistillConfig, load_spec

from .families import build, token_ids


def run(graph, reference, calibration, **fields):
    config = DistillConfig(**{"pass": "distill", **fields})
    return build_pass(config).run(graph, PassContext(calibration, reference=reference))


def lossy(graph, calibration, spec: dict):
    return build_pass(load_spec({"passes": [spec]}).passes[0]).run(graph, PassContext(calibration)).graph


def held_out_kl(graph, reference, ids) -> float:
    with torch.no_grad():
        return kl(logits_of(graph.module()(ids)), logits_of(reference.module()(ids)), 1.0).item()


def test_distill_lowers_the_held_out_kl_of_a_lossy_graph(trained_llama):
    """Before: the example LM with low_rank rank 16 on its MLPs. Expected: after 30 steps on 8 calibration windows,
    the KL on held-out text it never saw is lower, and so is the report's KL on the calibration data."""
    calibration = calibration_batches(8, 64, 0)
    original = capture(trained_llama, calibration[0])
    compressed = lossy(original, calibration, {"pass": "low_rank", "targets": "layers.*.mlp.*", "rank": 16})
    held_out = load_split("heldout")[: 4 * 64].view(4, 64)
    result = run(compressed, original, calibration, steps=30, lr=1e-3, batch_size=4)
    details = result.report.details
    assert details["kl_after"] < 0.8 * details["kl_before"] and details["steps"] == 30
    assert held_out_kl(result.graph, original, held_out) < 0.9 * held_out_kl(compressed, original, held_out)
    assert len(details["loss_curve"]) == 30 and details["loss_curve"][-1] < details["loss_curve"][0]
    trained = {layer.path for layer in result.report.layers}
    assert trained and all(".mlp." in path or "norm" in path for path in trained)


def test_an_exact_rewrite_is_left_unchanged(tiny_llama):
    """qkvo_lock changes no output: the KL is already ~0, so nothing trains (Adam would move weights on noise)."""
    calibration = [(torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(s)),) for s in range(4)]
    original = capture(tiny_llama, calibration[0])
    locked = lossy(original, calibration, {"pass": "qkvo_lock", "seed": 1})
    result = run(locked, original, calibration, steps=5, lr=1e-2)
    assert result.graph is locked and not result.modified
    assert result.report.details["kl_before"] < 1e-7 and "nothing to recover" in result.report.warnings[0]


FORMATS = {
    "lut": {"pass": "weight_clustering", "bits": 4, "group_size": 16},
    "nm": {"pass": "nm_sparsity", "targets": "*", "exclude": ["lm_head"]},
    "int4": {"pass": "weight_quant", "bits": 4, "group_size": 16},
    "shift": {"pass": "shift_add", "targets": "*", "exclude": ["lm_head"]},
}


@pytest.mark.parametrize("family, form", [("llama", form) for form in sorted(FORMATS)] + [("qwen2", "lut")])
def test_formats_stay_intact_and_only_declared_groups_train(family, form):
    """On transformers models from their default configs: integer tensors (codes, indices, positions) and every
    tensor outside the groups are byte-identical after distillation; the format's float tensors changed; the user's
    model is untouched (values and grads)."""
    model, ids = build(family), token_ids(2, 12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    original = capture(model, (ids,))
    compressed = lossy(original, [(ids,)], FORMATS[form])
    result = run(compressed, original, [(ids,)], steps=3, lr=1e-3, batch_size=1, train=["compressed"])
    old, new = compressed.tensors(), result.graph.tensors()
    assert old.keys() == new.keys()
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and all(new[k].is_floating_point() for k in changed)
    untouched = {k for k, v in old.items() if original.tensors().get(k) is v}  # embeddings, norms, skipped layers
    assert untouched and not changed & untouched
    assert all(torch.equal(v, before[k]) and v.grad is None for k, v in model.state_dict(keep_vars=True).items())


@pytest.mark.parametrize("absorb, hidden", [(False, 0.0), (True, 0.0), (False, 1.0)])
def test_a_decode_graph_trains_through_its_steps(absorb, hidden):
    """Teacher forcing through the step graph: an MLA decode graph (latent cache) fed each sample's ids one token
    per step, against the original decode graph; the KL over those steps goes down and the cache layout stays.
    With ``hidden``, the blocks' outputs of every step are matched too."""
    model, calibration = build("llama"), [(token_ids(2, 10, seed=s),) for s in range(2)]
    original = capture(model, calibration[0], mode="decode")
    converted = lossy(
        original,
        calibration,
        {"pass": "gqa_to_mla", "kv_rank": 4, "absorb": absorb, "rope": {"mode": "decoupled", "dims": 8}},
    )
    result = run(converted, original, calibration, steps=4, lr=3e-3, batch_size=2, hidden=hidden)
    details = result.report.details
    assert details["kl_after"] < 0.9 * details["kl_before"]
    if hidden:
        assert details["blocks"] == ["model.layers.0", "model.layers.1"]
        assert details["hidden_after"] < 0.9 * details["hidden_before"]
    assert result.graph.cache == converted.cache and any("kv_down" in layer.path for layer in result.report.layers)


def test_same_seed_same_bytes_and_another_seed_differs(tiny_llama):
    calibration = [(torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(s)),) for s in range(6)]
    original = capture(tiny_llama, calibration[0])
    compressed = lossy(original, calibration, {"pass": "weight_clustering", "bits": 3, "targets": "layers.0.mlp.*"})
    runs = [run(compressed, original, calibration, steps=4, lr=1e-3, batch_size=2, seed=s).graph for s in (0, 0, 1)]
    tensors = [g.tensors() for g in runs]
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])
    assert any(not torch.equal(tensors[0][k], tensors[2][k]) for k in tensors[0])


def test_what_distill_cannot_train_is_refused_naming_the_field(tiny_llama):
    ids = torch.randint(0, 256, (1, 16))
    original = capture(tiny_llama, (ids,))
    with pytest.raises(PassPreconditionError, match=r"passes\.train: no float tensor of the groups \['compressed'\]"):
        run(original, original, [(ids,)], train=["compressed"])
    with pytest.raises(Exception, match=r"train"):
        DistillConfig(**{"pass": "distill", "train": ["everything"]})


def test_the_schedule_warms_up_then_decays_to_zero():
    config = DistillConfig(**{"pass": "distill", "steps": 10, "warmup": 2})
    factors = [learning_rate_factor(config, s) for s in range(11)]
    assert factors[:3] == [0.5, 1.0, 1.0] and factors[10] == 0.0
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))
    assert learning_rate_factor(config.model_copy(update={"schedule": "constant"}), 7) == 1.0


def test_the_report_plots_the_loss_curve_beside_the_error_before_and_after(tiny_llama, tmp_path):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    spec = {
        "passes": [
            {"pass": "low_rank", "targets": "layers.0.mlp.*", "rank": 4},
            {"pass": "distill", "steps": 4, "lr": 1e-3, "batch_size": 1},
        ],
        "verify": {"max": 10.0},
    }
    result = compress(tiny_llama, spec, (ids,), out_dir=tmp_path, progress=False)
    lossy_pass, distilled = result.report.passes
    assert distilled["details"]["steps"] == 4 and len(distilled["details"]["loss_curve"]) == 4
    assert distilled["verification"]["rel_l2"] < lossy_pass["verification"]["rel_l2"]
    assert (tmp_path / "plots" / "passes-1-loss.png").stat().st_size > 0
    assert "passes-1-loss.png" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptneox", "qwen2moe"])
def test_the_hidden_loss_taps_each_decoder_blocks_residual_stream(family):
    """Before: a transformers model from its default config, captured. Expected: one tapped output per decoder block
    (the outermost numbered modules; MoE experts are nested, not blocks), equal to what transformers returns as
    that layer's hidden state (the last layer's is returned after the final norm, so it is not compared)."""
    model, ids = build(family), token_ids(2, 12)
    module = capture(model, (ids,)).program.module()
    blocks = decoder_blocks(module.graph)
    assert len(blocks) == model.config.num_hidden_layers and all(b.rpartition(".")[2].isdigit() for b in blocks)
    taps = tap(module, blocks)
    module(ids)
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
    for i, block in enumerate(blocks[:-1]):
        assert taps[block].count == 1
        torch.testing.assert_close(taps[block].joined(), states[i + 1].flatten(), rtol=1e-5, atol=1e-6)
    assert hidden_error({b: t.joined() for b, t in taps.items()}, {b: t.joined() for b, t in taps.items()}) == 0


def test_the_hidden_loss_goes_down_beside_the_kl(trained_llama):
    """The example LM with 2:4 MLPs, distilled with hidden 1: the blocks' relative error and the KL both fall."""
    calibration = calibration_batches(4, 32, 0)
    original = capture(trained_llama, calibration[0])
    compressed = lossy(original, calibration, {"pass": "nm_sparsity", "targets": "layers.*.mlp.*"})
    details = run(compressed, original, calibration, steps=10, lr=1e-3, batch_size=2, hidden=1.0).report.details
    assert details["blocks"] == [f"layers.{i}" for i in range(4)]
    assert 0 < details["hidden_after"] < 0.9 * details["hidden_before"]
    assert details["kl_after"] < details["kl_before"]


def test_distill_reads_data_of_its_own(tiny_llama, tmp_path):
    """``data.tokens``: windows of a token file, not the calibration data; the report names the file. A file
    shorter than one window, or text for a model without a tokenizer, is refused naming the field."""
    tokens = tmp_path / "distill.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, 256, 4096))
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    lossy_pass = {"pass": "low_rank", "targets": "layers.0.mlp.*", "rank": 4}
    data = {"tokens": str(tokens), "samples": 6, "seq_len": 32}
    spec = {"passes": [lossy_pass, {"pass": "distill", "steps": 2, "data": data}], "verify": {"max": 10.0}}
    details = compress(tiny_llama, spec, (ids,), progress=False).report.passes[1]["details"]
    assert details["data"] == str(tokens) and details["samples"] == 6
    spec["passes"][1]["data"]["seq_len"] = 8192
    with pytest.raises(SpecError, match=r"passes\[1\]\.data\.tokens.*fewer than"):
        compress(tiny_llama, spec, (ids,), out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    spec["passes"][1]["data"] = {"text": str(tokens)}
    with pytest.raises(SpecError, match=r"passes\[1\]\.data\.text.*no tokenizer"):
        compress(tiny_llama, spec, (ids,), progress=False)
    with pytest.raises(Exception, match=r"give one of data\.text and data\.tokens"):
        DistillConfig(**{"pass": "distill", "data": {"samples": 4}})
