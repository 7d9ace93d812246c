"""weight_quant: block-affine integer weights (RTN, GPTQ, AWQ scaling) in MatMulNBits' layout."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pydantic
import pytest
import torch

from graphpress import compress
from graphpress.errors import PassPreconditionError
from graphpress.ir import capture
from graphpress.ir.ops import int_weight
from graphpress.passes import PassContext, PassReport, build_pass
from graphpress.passes.weight_quant import fit_grid, gptq, objective, rtn
from graphpress.schema import WeightQuantConfig

from .conftest import rel_err

INT = "graphpress.int_weight.default"


def quant(**fields) -> WeightQuantConfig:
    return WeightQuantConfig(**{"pass": "weight_quant", **fields})


def histogram(graph) -> Counter:
    return Counter(str(n.target) for n in graph.nodes if n.op == "call_function")


def toy(bias: bool = True):
    model = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=bias), torch.nn.ReLU(), torch.nn.Linear(48, 40)).eval()
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    return model, x


# ---------------------------------------------------------------- the format
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("block, in_features", [(16, 64), (32, 40), (64, 24)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_format_round_trip(bits, block, in_features, symmetric):
    """(code - zero) * scale per block, a padded last block, zero points packed like the codes."""
    gen = torch.Generator().manual_seed(bits + block)
    blocks = -(-in_features // block)
    codes = torch.randint(0, 2**bits, (6, in_features), generator=gen)
    zeros = None if symmetric else torch.randint(0, 2**bits, (6, blocks), generator=gen)
    scales = torch.rand(6, blocks, generator=gen)
    stored = int_weight.pack(codes, scales, zeros, bits, block)
    assert stored["q_codes"].shape == (6, blocks, block * bits // 8)
    if zeros is not None:
        assert stored["q_zeros"].shape == (6, int_weight.zero_width(blocks, bits))
    z = 2 ** (bits - 1) if zeros is None else zeros.repeat_interleave(block, 1)[:, :in_features]
    expected = (codes - z) * scales.repeat_interleave(block, 1)[:, :in_features]
    rebuilt = int_weight.int_weight(stored["q_codes"], scales, stored.get("q_zeros"), bits, block, in_features)
    assert torch.equal(rebuilt, expected.float())


def test_four_bit_codes_are_low_nibble_first():
    """MatMulNBits' byte layout: code 2i in the low nibble of byte i, code 2i + 1 in the high one."""
    codes = torch.tensor([[1, 2, 3, 4] * 4])
    stored = int_weight.pack(codes, torch.ones(1, 1), torch.tensor([[5]]), 4, 16)
    assert stored["q_codes"][0, 0, :2].tolist() == [1 | 2 << 4, 3 | 4 << 4]
    assert stored["q_zeros"].tolist() == [[5]]


# ---------------------------------------------------------------- the pass on toy graphs
def test_before_expected_op_histogram():
    """Before: two linears with dense weights. Expected: the same linears reading int_weight, no dense weight left."""
    model, x = toy()
    graph = capture(model, (x,))
    result = build_pass(quant(method="rtn", group_size=16)).run(graph, PassContext([(x,)]))
    before, after = histogram(graph), histogram(result.graph)
    assert after["aten.linear.default"] == before["aten.linear.default"] == 2
    assert after[INT] == 2 and before[INT] == 0
    names = set(result.graph.tensors())
    assert not {"0.weight", "2.weight"} & names and {"0.bias", "0.q_codes", "0.q_scales", "0.q_zeros"} <= names
    assert rel_err(result.graph.module()(x), model(x)) < 0.12  # 4 bits over 16 uniform weights: ~7% each
    assert [layer.action for layer in result.report.layers] == ["quantized", "quantized"]


def on_grid(out: int, k: int, bits: int, block: int, symmetric: bool, seed: int = 0) -> torch.Tensor:
    """A weight whose every block already lies on a grid the pass would pick: power-of-two scales, the
    extreme codes present (both for min/max, the lowest for the symmetric extreme), zero points inside."""
    gen = torch.Generator().manual_seed(seed)
    blocks = k // block
    codes = torch.randint(0, 2**bits, (out, blocks, block), generator=gen)
    codes[..., 0] = 0
    zeros = torch.full((out, blocks, 1), 2 ** (bits - 1)) if symmetric else torch.randint(0, 2**bits, (out, blocks, 1))
    if not symmetric:
        codes[..., 1] = 2**bits - 1
    else:
        codes[..., 1:] = codes[..., 1:].clamp(min=1)  # the extreme is the lowest code, unique in magnitude
    scales = 2.0 ** torch.randint(-6, 0, (out, blocks, 1), generator=gen).double()
    return ((codes - zeros) * scales).reshape(out, k)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("method, clip", [("rtn", "minmax"), ("rtn", "mse"), ("gptq", "minmax"), ("gptq", "mse")])
def test_a_weight_on_the_grid_is_reproduced_exactly(bits, symmetric, method, clip):
    weight = on_grid(12, 64, bits, 16, symmetric, seed=bits)
    layer = torch.nn.Linear(64, 12, bias=False)
    layer.weight.data = weight.float()
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
    graph = capture(layer, (x,))
    config = quant(method=method, clip=clip, bits=bits, group_size=16, symmetric=symmetric, act_order=True)
    result = build_pass(config).run(graph, PassContext([(x,)]))
    node = next(n for n in result.graph.nodes if str(n.target) == INT)
    stored = [result.graph.weight(result.graph.tensor_name(a)) if a is not None else None for a in node.args[:3]]
    assert torch.equal(int_weight.int_weight(*stored, *node.args[3:]), weight.float())


def low_rank_plus_outliers(out: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, 4, generator=gen) @ torch.randn(4, k, generator=gen) + 0.1 * torch.randn(out, k, generator=gen)
    w[torch.rand(out, k, generator=gen) < 0.01] *= 25
    return w.double()


@pytest.mark.parametrize("kind, bound", [("random", 0.8), ("low_rank_outliers", 1.0)])
@pytest.mark.parametrize("bits, block, act_order", [(4, 32, False), (3, 16, True), (2, 64, False), (4, 128, True)])
def test_gptq_objective_is_not_worse_than_rtn(kind, bound, bits, block, act_order):
    """tr(dW H dW^T) on correlated calibration inputs: GPTQ's error feedback beats rounding to nearest."""
    gen = torch.Generator().manual_seed(bits * block)
    k = 128
    w = torch.randn(48, k, generator=gen).double() if kind == "random" else low_rank_plus_outliers(48, k, bits)
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    x = torch.randn(512, k, generator=gen) @ mix * torch.linspace(0.1, 3, k)
    gram = (x.T @ x).double()
    config = quant(bits=bits, group_size=block, act_order=act_order)
    grid = fit_grid(w, bits, block, False, "minmax", None, torch.float32)
    rounded = objective(grid.values(rtn(w, grid), slice(0, k)) - w, gram)
    codes, fitted = gptq(w, gram, config, block, torch.float32, act_order)
    assert objective(fitted.values(codes, slice(0, k)) - w, gram) < bound * rounded


@pytest.mark.parametrize("lazy_block", [1, 7, 128])
def test_lazy_batches_change_nothing(lazy_block):
    """The lazy batch update is a reordering of the same arithmetic: the same codes at any batch size."""
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(16, 96, generator=gen).double(), torch.randn(200, 96, generator=gen)
    gram = (x.T @ x).double()
    reference, _ = gptq(w, gram, quant(bits=3, group_size=32, lazy_block=96), 32, torch.float32, False)
    codes, _ = gptq(w, gram, quant(bits=3, group_size=32, lazy_block=lazy_block), 32, torch.float32, False)
    assert (codes != reference).float().mean() < 0.01  # float64 reassociation may flip a rare tie
    reference, _ = gptq(w, gram, quant(bits=3, group_size=32, lazy_block=96), 32, torch.float32, True)
    codes, _ = gptq(w, gram, quant(bits=3, group_size=32, lazy_block=lazy_block), 32, torch.float32, True)
    assert (codes != reference).float().mean() < 0.01  # float64 reassociation may flip a rare tie


def test_awq_scaling_alone_leaves_the_graph_exact(trained_llama):
    """The scales fold into the RMSNorm weights and the up projections: the function is unchanged, and the
    inputs the pass derives for the scaled linears equal a fresh calibration sweep of the scaled graph."""
    gen = torch.Generator().manual_seed(3)
    calibration = [(torch.randint(0, 256, (2, 32), generator=gen),)]
    graph = capture(trained_llama, calibration[0])
    p = build_pass(quant(awq=True, targets="layers.0.*"))
    work, ctx, report = graph.clone(), PassContext(calibration), PassReport("weight_quant", {})
    linears = p.selected_linears(work, ctx)
    inputs = ctx.linear_inputs(work, linears)
    scaled = p.activation_scales(work, linears, inputs, report)
    assert len(scaled) == 6  # q, k, v (input_layernorm), gate, up (post_attention_layernorm), down (up's rows)
    assert "layers.0.self_attn.o_proj" in report.warnings[0]  # behind the attention: not foldable
    assert rel_err(work.module()(*calibration[0]), graph.module()(*calibration[0])) < 1e-5
    fresh = PassContext(calibration).linear_inputs(work, work.linears("layers.0.*"))
    from graphpress.passes.weight_quant import _scaled_inputs

    for lin in work.linears("layers.0.*"):
        if lin.node.name in scaled:
            derived = _scaled_inputs(inputs[lin.node.name], scaled[lin.node.name])
            assert rel_err(derived.gram, fresh[lin.node.name].gram) < 1e-5


# ---------------------------------------------------------------- the example LM and transformers
@pytest.fixture(scope="module")
def calibration():
    gen = torch.Generator().manual_seed(3)
    return [(torch.randint(0, 256, (2, 64), generator=gen),) for _ in range(2)]


def test_gptq_beats_rtn_on_the_example_lm(trained_llama):
    """On held-out ids; with 1024 calibration rows (fewer than a layer's inputs overfit GPTQ's Hessian)."""
    gen = torch.Generator().manual_seed(4)
    calibration = [(torch.randint(0, 256, (2, 128), generator=gen),) for _ in range(4)]
    graph = capture(trained_llama, calibration[0])
    held_out = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(9))
    expected = trained_llama(held_out)

    def error(**fields):
        result = build_pass(quant(targets="layers.*", **fields)).run(graph, PassContext(calibration))
        return rel_err(result.graph.module()(held_out), expected), result.report

    rounded, report = error(method="rtn")
    corrected, _ = error(method="gptq")
    assert corrected < 0.8 * rounded  # measured 0.70x here; the perplexity goal is benchmarks/weight_quant.py's
    weights = sum(layer.details["bytes"] for layer in report.layers)
    dense = sum(layer.params_before - (layer.params_after or 0) for layer in report.layers) * 4
    assert weights <= 0.14 * dense  # 4 bits + an fp32 scale and a 4-bit zero point per 128 weights


def test_on_a_transformers_llama_with_its_default_config(hf_llama):
    """Default config (use_cache on, cache objects returned): AWQ folds into its RMSNorms, GPTQ quantizes every
    decoder linear."""
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    spec = {"passes": [quant(targets="layers.*", awq=True, group_size=16).model_dump(by_alias=True)], "backends": []}
    result = compress(hf_llama, spec, (ids,), calibration_data=[(ids,)], progress=False)
    report = result.report.passes[0]
    assert len(report["layers"]) == 14 and report["details"]["awq_alpha"]
    assert histogram(result.graph)[INT] == 14
    with torch.no_grad():
        error = rel_err(result.model(ids).logits, hf_llama(ids).logits)
    assert 0 < error < 0.05


def test_onnx_lowerings_match_eager(tmp_path, calibration):
    """Standard ops (opset 18: Sub/Mul; opset 21: blocked DequantizeLinear) and MatMulNBits, all == eager;
    the MatMulNBits file stores each weight's codes, scales and zero points packed, no dense copy."""
    spec = {
        "calibration": {"samples": 1, "seq_len": 32},
        "passes": [{"pass": "weight_quant", "targets": "layers.*.mlp.*", "method": "rtn", "group_size": 64}],
        "verify": {"max": 0.5},
        "backends": [
            {"target": "onnx"},
            {"target": "onnx", "opset": 21, "filename": "opset21.onnx"},
            {"target": "onnx", "ort_contrib_ops": True, "filename": "nbits.onnx"},
        ],
    }
    result = compress("examples/tiny_llama", spec, out_dir=tmp_path)
    standard, blocked, contrib = result.report.backends
    assert all(record["errors"]["rel_l2"] < 1e-5 for record in (standard, blocked, contrib))
    assert "DequantizeLinear" not in standard["op_histogram"] and blocked["op_histogram"]["DequantizeLinear"] == 12
    packed = onnx.load(str(tmp_path / "opset21.onnx")).graph.initializer  # the codes folded into uint4 tensors
    names = sorted(t.name for t in packed if t.data_type == onnx.TensorProto.UINT4)  # codes and zero points
    assert len(names) == 24 and names[:2] == ["layers.0.mlp.down_proj.q_codes", "layers.0.mlp.down_proj.q_zeros"]
    assert contrib["op_histogram"]["com.microsoft::MatMulNBits"] == 12
    model = onnx.load(str(tmp_path / "nbits.onnx"))
    packed = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.UINT8]
    assert sum(len(t.raw_data) for t in packed) == 4 * (2 * 704 * 256 + 256 * 704) // 2 + 4 * (
        2 * 704 * 2 + 256 * 6
    )  # + zero points
    assert not any("mlp" in t.name and t.name.endswith("weight") for t in model.graph.initializer)
    for name, fused in [("model.onnx", 0), ("opset21.onnx", 12), ("nbits.onnx", 12)]:
        assert loaded_as(tmp_path / name)["MatMulNBits"] == fused  # what onnxruntime holds after loading
    assert "unpacks them into dense weights" in " ".join(result.report.warnings)  # the opset-18 file, named
    assert '"opset": 21' in " ".join(result.report.warnings)
    session = ort.InferenceSession(str(tmp_path / "nbits.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(5))
    got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    np.testing.assert_allclose(got, result.model(ids).detach().numpy(), rtol=1e-4, atol=1e-4)


def loaded_as(path) -> Counter:
    """The op histogram of onnxruntime's optimised graph of ``path`` (what a session runs), and no dense copy of
    a quantized weight: every float initializer is smaller than one MLP weight (704 x 256)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path) + ".optimized"
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    model = onnx.load(options.optimized_model_filepath)
    counts = Counter(n.op_type for n in model.graph.node)
    if counts["MatMulNBits"]:
        floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
        assert all(np.prod(t.dims) < 704 * 256 for t in floats), [t.name for t in floats if np.prod(t.dims) >= 704 * 256]
    return counts


def test_three_bit_and_long_two_bit_blocks_stay_standard(tmp_path):
    """MatMulNBits runs 2/4/8 bits, 2-bit blocks up to 256: the rest lowers to standard ops, and the record says so."""
    model, x = toy()
    for bits, group, fused in [(3, 16, 0), (2, "channel", 2), (4, "channel", 2)]:
        spec = {
            "passes": [{"pass": "weight_quant", "bits": bits, "group_size": group, "method": "rtn"}],
            "verify": {"max": 0.9},
            "backends": [{"target": "onnx", "ort_contrib_ops": True}],
        }
        record = compress(model, spec, (x,), out_dir=tmp_path / f"{bits}{group}", progress=False).report.backends[0]
        assert record["op_histogram"].get("com.microsoft::MatMulNBits", 0) == fused
        assert record["details"]["contrib_ops"].get("graphpress::int_linear", 0) == fused
        assert record["errors"]["rel_l2"] < 1e-5


@pytest.mark.parametrize("level, tolerance", [(0, 1e-5), (4, 2e-2)], ids=["float activations", "int8 activations"])
def test_matmul_accuracy_level_reaches_every_matmul_nbits_node(tmp_path, level, tolerance):
    """The level is the nodes' accuracy_level; 4 (int8 activations, the genai builder's int4 CPU default) is
    validated against eager like any file, at its own, looser, error."""
    import onnx

    model, x = toy()
    spec = {
        "passes": [{"pass": "weight_quant", "bits": 4, "group_size": 32, "method": "rtn"}],
        "verify": {"max": 0.9},
        "backends": [{"target": "onnx", "ort_contrib_ops": True, "matmul_accuracy_level": level, "max_error": 0.05}],
    }
    result = compress(model, spec, (x,), out_dir=tmp_path, progress=False)
    nodes = [n for n in onnx.load(str(result.artifacts["onnx"])).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2
    assert {a.i for n in nodes for a in n.attribute if a.name == "accuracy_level"} == {level}
    assert result.report.backends[0]["errors"]["rel_l2"] < tolerance


# ---------------------------------------------------------------- composition and refusals
def test_composes_with_low_rank_and_nm_sparsity(calibration):
    """After low_rank the factors are quantized; after nm_sparsity the kept values are (nm_weight reads them)."""
    graph = capture(torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 32)).eval(), (torch.randn(8, 64),))
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    ctx = PassContext([(x,)])
    factored = build_pass(build_config({"pass": "low_rank", "targets": "0", "rank": 8, "only_if_smaller": False})).run(
        graph, ctx
    )
    sparse = build_pass(build_config({"pass": "nm_sparsity", "targets": "1", "exclude": ["0.*"]})).run(
        factored.graph, ctx
    )
    result = build_pass(quant(method="gptq", group_size=16)).run(sparse.graph, ctx)
    counts = histogram(result.graph)
    assert counts[INT] == 3 and counts["graphpress.nm_weight.default"] == 1
    assert "rounded to nearest" in result.report.warnings[0]
    nm = next(n for n in result.graph.nodes if str(n.target) == "graphpress.nm_weight.default")
    assert str(nm.args[0].target) == INT
    assert rel_err(result.graph.module()(x), sparse.graph.module()(x)) < 0.1


def build_config(fields):
    from graphpress.schema import load_spec

    return load_spec({"passes": [fields]}).passes[0]


def test_refuses_weights_another_format_stores(trained_llama, token_batch):
    graph = capture(trained_llama, (token_batch,))
    ctx = PassContext([(token_batch,)])
    clustered = build_pass(build_config({"pass": "weight_clustering", "targets": "layers.0.mlp.up_proj"})).run(
        graph, ctx
    )
    with pytest.raises(PassPreconditionError, match=r"layers\.0\.mlp\.up_proj \(graphpress::lut_weight\)"):
        build_pass(quant(targets="layers.0.mlp.*")).run(clustered.graph, ctx)
    with pytest.raises(PassPreconditionError, match="matches no linear layer"):
        build_pass(quant(targets="decoder.*")).run(graph, ctx)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"bits": 5}, "bits"),
        ({"group_size": 48}, "group_size"),
        ({"method": "awq"}, "method"),
        ({"damping": 0}, "damping"),
        ({"awq_grid": 1}, "awq_grid"),
    ],
)
def test_bad_configs_are_refused(fields, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        quant(**fields)


def test_same_spec_same_bytes(calibration, trained_llama):
    graph = capture(trained_llama, calibration[0])
    runs = [
        build_pass(quant(targets="layers.0.*", awq=True, act_order=True)).run(graph, PassContext(calibration))
        for _ in range(2)
    ]
    for name, tensor in runs[0].graph.tensors().items():
        assert torch.equal(tensor, runs[1].graph.tensors()[name])


@pytest.mark.parametrize(
    "first",
    [
        {"pass": "qkvo_lock", "targets": "layers.0.self_attn", "seed": 12345678901},
        {"pass": "gqa_to_mla", "targets": "layers.0.self_attn", "kv_rank": 64},
        {"pass": "gqa_to_mla", "targets": "layers.0.self_attn", "kv_rank": 64, "rope": {"mode": "decoupled"}},
    ],
    ids=["qkvo_lock", "gqa_to_mla", "gqa_to_mla_absorbed"],
)
def test_after_qkvo_lock_and_gqa_to_mla(first, trained_llama, calibration):
    """Their outputs are ordinary linears (locked projections, kv_down / up projections, absorbed queries):
    every linear of the layer is quantized, GPTQ on the statistics of the rewritten graph."""
    graph = capture(trained_llama, calibration[0])
    ctx = PassContext(calibration)
    rewritten = build_pass(build_config(first)).run(graph, ctx).graph
    linears = rewritten.linears("layers.0.self_attn.*")
    result = build_pass(quant(targets="layers.0.self_attn.*", group_size=32)).run(rewritten, ctx)
    assert histogram(result.graph)[INT] == len(linears) >= 4
    assert {layer.path for layer in result.report.layers} == {lin.path for lin in linears}
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(8))
    # measured 0.025 alone; 0.051 after gqa_to_mla (its up projections read the PCA latent: 2.5-4x the output
    # error of the projections they replace, docs/passes/weight_quant.md), 0.03 after qkvo_lock
    assert rel_err(result.graph.module()(ids), rewritten.module()(ids)) < 0.08


@pytest.mark.parametrize(
    "bits, opset, contrib, advice",
    [(4, 18, False, ['"opset": 21']), (4, 21, False, None), (3, 21, False, []), (2, 21, False, ['"ort_contrib_ops"'])],
)
def test_the_report_says_which_weights_onnxruntime_holds_dense(bits, opset, contrib, advice):
    """None: no dense-at-load warning. Otherwise one naming the bit widths, with only the advice that would help.
    4- and 8-bit codes at opset 21 are fused at load, at a transient memory cost the report also states."""
    from graphpress.backends import OnnxBackend
    from graphpress.schema import OnnxBackendConfig

    model, x = toy()
    graph = build_pass(quant(method="rtn", bits=bits, group_size=16)).run(capture(model, (x,)), PassContext([(x,)]))
    config = OnnxBackendConfig(target="onnx", opset=opset, ort_contrib_ops=contrib)
    warnings = OnnxBackend(config, "backends[0]").unpacked_at_load(graph.graph)
    fused = [w for w in warnings if "fuses into MatMulNBits as the session loads" in w]
    assert len(fused) == (opset >= 21 and bits in (4, 8) and not contrib)
    warnings = [w for w in warnings if w not in fused]
    if advice is None:
        assert warnings == []
        return
    (warning,) = warnings
    assert f"2 integer-weight linear(s) ({bits}-bit)" in warning
    given = [a for a in ('"opset": 21', '"ort_contrib_ops"') if a in warning]
    assert given == advice
