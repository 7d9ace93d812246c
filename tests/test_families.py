"""Every major decoder family, built from its default config, through capture and the ONNX backend.

Each graph is captured at batch 1 and run at batch 3 and another length: forward graphs
against the model's logits, decode graphs teacher-forced token by token against the same.
"""

from __future__ import annotations

import pytest
import torch

from graphpress import compress
from graphpress.ir import capture
from graphpress.metrics import logits_of
from graphpress.runtime import OnnxDecoder, TorchDecoder, teacher_forced_logits

from .conftest import rel_err, state_hash
from .families import (
    CALIBRATION,
    DENSE,
    ENCODERS,
    EXACT,
    FAMILIES,
    LOSSY,
    MOE,
    REFUSED,
    build,
    build_encoder,
    matrix_config,
    run_pass,
    run_pass_on,
    token_ids,
)

pytest.importorskip("transformers")

MODES = ("forward", "decode")


@pytest.fixture(scope="module")
def models():
    return {}


def family(models, name):
    if name not in models:
        models[name] = build(name)
    return models[name]


@pytest.fixture(scope="module")
def graphs():
    return {}


def captured(models, graphs, name, mode):
    """The family's graph captured once per mode (on 1 x 12 ids) and shared: passes clone what they rewrite."""
    if (name, mode) not in graphs:
        graphs[name, mode] = capture(family(models, name), (token_ids(1, 12),), mode=mode)
    return graphs[name, mode]


def logits(graph, ids):
    with torch.no_grad():
        if graph.cache is not None:
            return teacher_forced_logits(TorchDecoder(graph), ids)
        return logits_of(graph(ids))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", FAMILIES)
def test_default_config_captures_and_runs_at_other_shapes(models, graphs, name, mode):
    model = family(models, name)
    before, config = state_hash(model), model.config.to_dict()
    graph = captured(models, graphs, name, mode)
    assert state_hash(model) == before and model.config.to_dict() == config and model.config.use_cache
    other = token_ids(3, 17, seed=1)
    with torch.no_grad():
        expected = model(other).logits
    assert rel_err(logits(graph, other), expected) < 1e-5


TVM_FAMILIES = ["gpt2", "phi3", "qwen3", "gemma2", "gptneox"]  # Conv1D, fused, QK-norm, eager, partial rotary


def artifact_logits(target: str, path, mode: str, ids: torch.Tensor) -> torch.Tensor:
    """Logits of an ONNX file (onnxruntime) or a TVM library, forward or decode (teacher-forced)."""
    from graphpress.runtime import TvmDecoder, TvmModule

    if mode == "decode":
        return teacher_forced_logits((OnnxDecoder if target == "onnx" else TvmDecoder)(path), ids)
    if target == "tvm":
        return TvmModule(path)(ids)[0]
    import onnxruntime as ort

    session = ort.InferenceSession(str(path))
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0])


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "target"), [(n, "onnx") for n in FAMILIES] + [(n, "tvm") for n in TVM_FAMILIES])
def test_artifacts_of_default_configs_run_at_other_shapes(models, name, target, mode, tmp_path):
    if target == "tvm":
        pytest.importorskip("tvm")
    model = family(models, name)
    spec = {"capture": {"mode": mode}, "backends": [{"target": target}]}
    result = compress(model, spec, (token_ids(1, 12),), out_dir=tmp_path, progress=False)
    other = token_ids(3, 17, seed=1)
    with torch.no_grad():
        expected = model(other).logits
    assert rel_err(artifact_logits(target, result.artifacts[target], mode, other), expected) < 1e-5


# ---------------------------------------------------------------- family x pass
@pytest.mark.slow
@pytest.mark.parametrize("pass_name", [*EXACT, *LOSSY])
@pytest.mark.parametrize("name", FAMILIES)
def test_every_pass_on_every_family(models, graphs, name, pass_name):
    """Exact passes are exact (<= 1e-5 on held-out ids, batch 3), lossy ones run; refusals name the block and why.
    The pass runs on the family's shared capture, as ``compress`` runs it (``test_api`` covers the rest)."""
    from graphpress.errors import PassPreconditionError

    model = family(models, name)
    mode, config = matrix_config(model, pass_name)
    graph = captured(models, graphs, name, mode)
    if (name, pass_name) in REFUSED:
        with pytest.raises(PassPreconditionError, match=REFUSED[name, pass_name]):
            run_pass_on(graph, config)
        return
    result, report = run_pass_on(graph, config)
    assert report["layers"], f"{pass_name} changed nothing in {name}"
    other = token_ids(3, 14, seed=2)
    with torch.no_grad():
        expected = model(other).logits
    error = rel_err(logits(result.graph, other), expected)
    if pass_name in EXACT:
        assert error < 1e-5
    else:
        assert 0 < error < 1.0


def test_qk_norm_families_are_locked_on_values_and_outputs_only(models):
    """A QK-norm does not commute with a query-key lock: qkvo_lock locks V/O, exactly, and says so."""
    for name in ("qwen3", "gemma3"):
        _, report = run_pass(family(models, name), *EXACT["qkvo_lock"])
        assert all(
            layer["details"]["qk_matrices"] == 0 and layer["details"]["vo_matrices"] == 2 for layer in report["layers"]
        )
        assert any("QK-norm" in w for w in report["warnings"])


def test_partial_rotary_keeps_rope_on_the_rotary_dims_only(models, graphs):
    """GPT-NeoX turns 4 of 16 head dims: 'decoupled' keeps RoPE on at most 4 x 4 key dims, the rest are latent."""
    from graphpress.errors import PassPreconditionError

    model = family(models, "gptneox")
    with pytest.raises(PassPreconditionError, match=r"rope\.dims: 24 exceeds the 16 rotary key dimensions"):
        config = {"pass": "gqa_to_mla", "rope": {"mode": "decoupled", "dims": 24}}
        run_pass_on(captured(models, graphs, "gptneox", "decode"), config)
    other = token_ids(3, 14, seed=2)
    with torch.no_grad():
        expected = model(other).logits
    errors = []
    for rank in (24, 64, 112):
        config = {"pass": "gqa_to_mla", "kv_rank": rank, "rope": {"mode": "decoupled"}}
        result, report = run_pass_on(captured(models, graphs, "gptneox", "forward"), config)
        assert report["layers"][0]["details"]["cache_numbers_per_token"] == (128, rank + 16)
        errors.append(rel_err(logits(result.graph, other), expected))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5  # 112 = 2 x 64 - 16: full rank


def test_fused_and_conv1d_projections_become_one_linear_per_piece(models):
    """Phi-3's qkv_proj / gate_up_proj, GPT-2's Conv1D c_attn, GPT-NeoX's per-head query_key_value."""
    expected = {
        "phi3": ("model.layers.0.self_attn.qkv_proj", [64, 32, 32], "model.layers.0.mlp.gate_up_proj", [128, 128]),
        "gpt2": ("transformer.h.0.attn.c_attn", [64, 64, 64], None, None),
        "gptneox": ("gpt_neox.layers.0.attention.query_key_value", [64, 64, 64], None, None),
    }
    for name, (qkv, widths, gate_up, mlp_widths) in expected.items():
        graph = capture(family(models, name), (token_ids(1, 12),))
        assert [lin.out_features for lin in graph.linears(f"{qkv}.*")] == widths
        block = graph.attention_blocks()[0]
        assert [p.path for p in (block.q_proj, block.k_proj, block.v_proj)] == [f"{qkv}.{i}" for i in range(3)]
        if gate_up:
            assert [lin.out_features for lin in graph.linears(f"{gate_up}.*")] == mlp_widths
        assert len(graph.mlp_blocks()) == 2 and len(graph.attention_blocks()) == 2


SPARSE_ROUTING = (token_ids(1, 2, seed=0),)  # 4 token-expert rows: some expert of layer 0 gets none (both families)


@pytest.mark.parametrize("name", sorted(MOE))
def test_moe_experts_become_one_linear_each(models, name, tmp_path):
    """3-D expert parameters run by grouped_mm: one linear per expert, named by index, exact where experts get no rows."""
    from graphpress.passes import PassContext

    model = family(models, name)
    inter = getattr(model.config, "moe_intermediate_size", None) or model.config.intermediate_size
    graph = capture(model, (token_ids(1, 12),))
    experts = graph.linears("model.layers.0.mlp.experts.*")
    prefix = "model.layers.0.mlp.experts"
    assert [(lin.path, lin.out_features, lin.in_features) for lin in experts] == [
        *((f"{prefix}.{e}.gate_up_proj", 2 * inter, 64) for e in range(4)),
        *((f"{prefix}.{e}.down_proj", 64, inter) for e in range(4)),
    ]
    assert not [name for name, t in graph.tensors().items() if t.dim() == 3]
    rows = PassContext([SPARSE_ROUTING]).linear_inputs(graph, experts)
    assert min(rows[lin.node.name].count for lin in experts) == 0
    result = compress(model, {"passes": []}, (token_ids(1, 12),), out_dir=tmp_path, progress=False)
    for ids in (SPARSE_ROUTING[0], token_ids(3, 17, seed=1)):
        with torch.no_grad():
            expected = model(ids).logits
        assert rel_err(logits(graph, ids), expected) < 1e-5
        assert rel_err(artifact_logits("onnx", result.artifacts["onnx"], "forward", ids), expected) < 1e-5


EXPERT_PASSES = {
    "whitened_svd": {"pass": "low_rank", "method": "whitened_svd", "rank": 8},
    "fisher_svd": {"pass": "low_rank", "method": "fisher_svd", "rank": 8},
    "nm_sparsity": {"pass": "nm_sparsity", "score": "activation", "update": True},
    "weight_clustering": {"pass": "weight_clustering", "bits": 4, "group_size": 16, "weighting": "activation"},
    "shift_add": {"pass": "shift_add"},
}


@pytest.mark.slow
@pytest.mark.parametrize("config", EXPERT_PASSES.values(), ids=list(EXPERT_PASSES))
def test_moe_expert_linears_as_pass_targets(models, config, tmp_path):
    """``*experts.*`` selects every expert's linears; one no calibration token reached is compressed data-free, and said."""
    model = family(models, "mixtral")
    spec = {"passes": [{**config, "targets": "*experts.*"}], "verify": {"max": 100.0}}
    result = compress(model, spec, SPARSE_ROUTING, calibration_data=[SPARSE_ROUTING], out_dir=tmp_path, progress=False)
    report = result.report.passes[0]
    assert sorted(layer["path"] for layer in report["layers"]) == sorted(
        f"model.layers.{i}.mlp.experts.{e}.{proj}"
        for i in range(2)
        for e in range(4)
        for proj in ("gate_up_proj", "down_proj")
    )
    unreached = "model.layers.0.mlp.experts.3.gate_up_proj: no calibration"
    assert any(w.startswith(unreached) for w in report["warnings"]) == (config["pass"] != "shift_add")
    other = token_ids(3, 17, seed=1)
    with torch.no_grad():
        compressed = logits_of(result.model(other))
        assert 0 < rel_err(compressed, model(other).logits) < 1.0
    assert rel_err(artifact_logits("onnx", result.artifacts["onnx"], "forward", other), compressed) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", DENSE)
def test_locked_and_sparsified_family_in_onnx(models, name, tmp_path):
    """qkvo_lock then 2:4 on the MLPs, through onnxruntime at another batch and length."""
    model = family(models, name)
    passes = [EXACT["qkvo_lock"][1], {"pass": "nm_sparsity", "targets": "*mlp*", "exclude": ["*gate"]}]
    spec = {"passes": passes, "verify": {"max": 100.0}}
    result = compress(model, spec, (token_ids(1, 12),), calibration_data=CALIBRATION, out_dir=tmp_path, progress=False)
    other = token_ids(3, 17, seed=1)
    with torch.no_grad():
        expected = logits_of(result.model(other))
    assert rel_err(artifact_logits("onnx", result.artifacts["onnx"], "forward", other), expected) < 1e-5


@pytest.mark.parametrize("pass_name", ["qkvo_lock", "low_rank"])
@pytest.mark.parametrize("name", ENCODERS)
def test_encoders_from_default_configs(name, pass_name):
    """BertModel and ViTModel: captured at batch 1, exact passes exact at batch 3 (and another length)."""
    model, inputs = build_encoder(name)
    config = EXACT[pass_name][1]
    spec = {"passes": [config], "backends": []}
    result = compress(model, spec, (inputs(1),), calibration_data=[(inputs(2, 16, seed=3),)], progress=False)
    other = inputs(3, 17, seed=1)
    with torch.no_grad():
        expected = model(other).last_hidden_state
        assert rel_err(result.model(other).last_hidden_state, expected) < 1e-5
    assert len(result.graph.attention_blocks()) == 2 and len(result.graph.mlp_blocks()) == 2
