"""distill: KL distillation from the original lowers the held-out KL of a lossy graph, trains only float tensors
of the declared groups (every format intact), leaves an exact rewrite alone, and is deterministic."""

from __future__ import annotations

import pytest
import torch

from examples.tiny_llama import calibration_batches
from examples.tiny_llama.data import load_split
from graphpress import compress
from graphpress.errors import PassPreconditionError
from graphpress.ir import capture
from graphpress.metrics import logits_of
from graphpress.passes import PassContext, build_pass
from graphpress.passes.distill import kl, learning_rate_factor
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


@pytest.mark.parametrize("absorb", [False, True])
def test_a_decode_graph_trains_through_its_steps(absorb):
    """Teacher forcing through the step graph: an MLA decode graph (latent cache) fed each sample's ids one token
    per step, against the original decode graph; the KL over those steps goes down and the cache layout stays."""
    model, calibration = build("llama"), [(token_ids(2, 10, seed=s),) for s in range(2)]
    original = capture(model, calibration[0], mode="decode")
    converted = lossy(
        original,
        calibration,
        {"pass": "gqa_to_mla", "kv_rank": 4, "absorb": absorb, "rope": {"mode": "decoupled", "dims": 8}},
    )
    result = run(converted, original, calibration, steps=4, lr=3e-3, batch_size=2)
    details = result.report.details
    assert details["kl_after"] < 0.9 * details["kl_before"]
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
