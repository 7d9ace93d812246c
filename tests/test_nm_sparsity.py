"""nm_sparsity: N:M masks, compressed storage that stays compressed in ONNX, least-squares refit."""

from __future__ import annotations

import onnx
import pydantic
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphpress import compress
from graphpress.errors import PassPreconditionError
from graphpress.ir import capture
from graphpress.ir.channels import channel_producers, permute_input_channels
from graphpress.ir.ops.bitstream import pack_bits
from graphpress.ir.ops.nm_sparse import nm_weight
from graphpress.passes import PassContext, build_pass
from graphpress.passes.nm_sparsity import keep, kept_fraction, search_permutation
from graphpress.schema import LowRankConfig, NmSparsityConfig, WeightClusteringConfig

from .conftest import rel_err


def sparsity(**fields) -> NmSparsityConfig:
    return NmSparsityConfig(**{"pass": "nm_sparsity", **fields})


@pytest.fixture(scope="module")
def calibration():
    gen = torch.Generator().manual_seed(4)
    return [(torch.randint(0, 256, (2, 64), generator=gen),) for _ in range(2)]


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 8), (4, 16)])
def test_format_round_trip_and_group_budget(n, m):
    score = torch.randn(6, 32, generator=torch.Generator().manual_seed(m)).abs()
    columns, within = keep(score, n, m)
    weight = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    values = weight.gather(1, columns)
    dense = nm_weight(values, pack_bits(within, m.bit_length() - 1), n, m, 32)
    assert ((dense != 0).reshape(6, -1, m).sum(-1) <= n).all()
    assert torch.equal(dense.gather(1, columns), values)
    kept_scores = score.gather(1, columns).reshape(6, -1, n).min(-1).values
    dropped = score.masked_fill(dense != 0, -1).reshape(6, -1, m).max(-1).values
    assert (kept_scores >= dropped).all()  # the n best of every group are kept


@pytest.mark.parametrize("storage", ["compressed", "dense"])
def test_every_group_keeps_at_most_n(trained_llama, calibration, storage):
    graph = capture(trained_llama, calibration[0])
    result = build_pass(sparsity(targets="layers.*.mlp.*", storage=storage)).run(graph, PassContext(calibration))
    module = result.graph.module()
    with torch.no_grad():
        for layer in result.report.layers:
            path = layer.path
            if storage == "dense":
                weight = result.graph.weight(f"{path}.weight")
            else:
                values, positions = (result.graph.weight(f"{path}.nm_{k}") for k in ("values", "positions"))
                weight = nm_weight(values, positions, 2, 4, values.shape[1] * 2)
            assert ((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all()
            before, after = layer.details["weight_bytes"]
            assert after <= (0.6 if storage == "compressed" else 1.0) * before
    assert rel_err(module(calibration[0][0]), trained_llama(calibration[0][0])) < 0.3


def test_activation_scores_and_refit_lower_the_output_error(trained_llama, calibration):
    graph = capture(trained_llama, calibration[0])

    def output_error(**fields):
        report = build_pass(sparsity(targets="layers.*.mlp.*", **fields)).run(graph, PassContext(calibration)).report
        return sum(layer.details["output_error"] for layer in report.layers)

    magnitude, wanda = output_error(), output_error(score="activation")
    refit = output_error(score="activation", update=True)
    assert refit < wanda < magnitude


def test_onnx_stays_compressed_and_matches_eager(tmp_path):
    spec = {
        "calibration": {"samples": 2, "seq_len": 64},
        "verify": {"max": 0.3},
        "passes": [{"pass": "nm_sparsity", "targets": "layers.*.mlp.*", "score": "activation", "update": True}],
    }
    result = compress("examples/tiny_llama", spec, out_dir=tmp_path)
    record = result.report.backends[0]
    assert record["errors"]["rel_l2"] < 1e-5 and "ScatterElements" in record["op_histogram"]
    model = onnx.load(str(result.artifacts["onnx"]))
    largest = max(len(t.raw_data) for t in model.graph.initializer)
    assert largest <= 704 * 256 * 4 // 2  # no dense MLP weight was folded back into the file
    dense_mlp = 3 * 704 * 256 * 4 * 4
    baseline = compress("examples/tiny_llama", {**spec, "passes": []}, out_dir=tmp_path / "base")
    saved = baseline.artifacts["onnx"].stat().st_size - result.artifacts["onnx"].stat().st_size
    assert saved >= 0.4 * dense_mlp  # 2:4 stores 0.53x of the dense bytes


def test_low_rank_then_2_4_then_4_bit_clustering_on_the_same_layers(tmp_path):
    spec = {
        "calibration": {"samples": 2, "seq_len": 64},
        "verify": {"max": 0.5},
        "passes": [
            {
                "pass": "low_rank",
                "targets": "layers.*.mlp.*",
                "method": "whitened_svd",
                "rank": {"budget": {"param_ratio": 0.6}},
                "rank_multiple": 16,
            },
            {
                "pass": "nm_sparsity",
                "targets": "layers.*.mlp.*",
                "score": "activation",
                "update": True,
                "permute": True,
                "permute_rounds": 4,
            },
            {"pass": "weight_clustering", "targets": "layers.*.mlp.*", "bits": 4, "group_size": 16},
        ],
    }
    result = compress("examples/tiny_llama", spec, out_dir=tmp_path)
    assert [p["name"] for p in result.report.passes] == ["low_rank", "nm_sparsity", "weight_clustering"]
    clustered = {layer["path"] for layer in result.report.passes[2]["layers"]}
    assert {"layers.0.mlp.down_proj.0", "layers.0.mlp.down_proj.1"} <= clustered
    graph = result.graph
    for lin in graph.stored_linears("layers.*.mlp.*"):
        values, positions, n, m, in_features = lin.op.args
        assert lin.format == "graphpress::nm_weight" and values.target is torch.ops.graphpress.lut_weight.default
    record = result.report.backends[0]
    assert record["errors"]["rel_l2"] < 1e-5  # onnxruntime vs eager
    ops = record["op_histogram"]
    assert "ScatterElements" in ops and "Gather" in ops
    model = onnx.load(str(result.artifacts["onnx"]))
    largest_mlp = max(len(t.raw_data) for t in model.graph.initializer if ".mlp." in t.name)
    dense_factor = 256 * 90 * 4  # the smallest low-rank factor is larger than this, dense in fp32
    assert largest_mlp < dense_factor // 4


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(2, 6), m=st.sampled_from([4, 8]), seed=st.integers(0, 2**16))
def test_permutation_search_is_a_permutation_that_never_loses_score(rows, groups, m, seed):
    score = torch.rand(rows, groups * m, generator=torch.Generator().manual_seed(seed)).double()
    n = m // 2
    perm = search_permutation(score, n, m, rounds=8)
    assert torch.equal(perm.sort().values, torch.arange(groups * m))
    permuted = score[:, perm]
    assert kept_fraction(permuted, keep(permuted, n, m)[0]) >= kept_fraction(score, keep(score, n, m)[0]) - 1e-12


def test_permutation_search_separates_large_channels():
    # channels 0-3 are large in every row: in one 2:4 group half of them are lost; spread out, none is
    score = torch.full((3, 16), 0.01).double()
    score[:, :4] = 1.0
    perm = search_permutation(score, 2, 4, rounds=8)
    permuted = score[:, perm]
    assert kept_fraction(permuted, keep(permuted, 2, 4)[0]) > kept_fraction(score, keep(score, 2, 4)[0])
    assert ((permuted.reshape(3, 4, 4) == 1.0).sum(-1) <= 2).all()


def test_permutation_folds_into_producers_and_keeps_the_function(trained_llama, calibration):
    graph = capture(trained_llama, calibration[0])
    tokens = calibration[0][0]
    expected = graph.module()(tokens)
    linears = {lin.path: lin for lin in graph.linears()}
    down = linears["layers.0.mlp.down_proj"]
    producers = channel_producers(graph, down)
    assert [p.path for p in producers] == ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"]
    for unfoldable in ("layers.0.self_attn.q_proj", "layers.0.self_attn.o_proj", "layers.0.mlp.up_proj"):
        assert channel_producers(graph, linears[unfoldable]) is None  # behind a norm or a head reshape
    work = graph.clone()
    perm = torch.randperm(down.in_features, generator=torch.Generator().manual_seed(0))
    permute_input_channels(work, down, producers, perm)
    assert not torch.equal(work.weight(down.weight), graph.weight(down.weight))
    assert rel_err(work.module()(tokens), expected) < 1e-6
    low_rank = build_pass(LowRankConfig(**{"pass": "low_rank", "targets": "layers.0.mlp.up_proj", "rank": 64}))
    factored = low_rank.run(graph, PassContext(calibration)).graph
    second = next(lin for lin in factored.linears() if lin.path == "layers.0.mlp.up_proj.1")
    assert [p.path for p in channel_producers(factored, second)] == ["layers.0.mlp.up_proj.0"]


def test_permute_raises_the_kept_score_and_stays_exact_before_masking(trained_llama, calibration):
    graph = capture(trained_llama, calibration[0])
    result = build_pass(sparsity(targets="layers.*.mlp.*", permute=True, permute_rounds=4)).run(
        graph, PassContext(calibration)
    )
    layers = {layer.path: layer.details for layer in result.report.layers}
    down = layers["layers.0.mlp.down_proj"]
    assert down["kept_score"] > down["kept_score_unpermuted"]
    assert "kept_score_unpermuted" not in layers["layers.0.mlp.up_proj"]
    assert "layers.0.mlp.gate_proj" in result.report.warnings[0] and "down_proj" not in result.report.warnings[0]
    plain = build_pass(sparsity(targets="layers.*.mlp.*")).run(graph, PassContext(calibration)).report
    assert {lay.path: lay.details["kept_score"] for lay in plain.layers}["layers.0.mlp.down_proj"] == pytest.approx(
        down["kept_score_unpermuted"]
    )


def test_nm_sparsity_refuses_weights_already_clustered(trained_llama, calibration):
    graph = capture(trained_llama, calibration[0])
    cfg = WeightClusteringConfig(**{"pass": "weight_clustering", "targets": "layers.0.mlp.down_proj", "bits": 4})
    clustered = build_pass(cfg).run(graph, PassContext(calibration)).graph
    with pytest.raises(PassPreconditionError, match=r"layers.0.mlp.down_proj \(graphpress::lut_weight\); run nm_sp"):
        build_pass(sparsity(targets="layers.0.mlp.*")).run(clustered, PassContext(calibration))


def test_bad_configs_are_refused(trained_llama, calibration):
    graph = capture(trained_llama, calibration[0])
    with pytest.raises(pydantic.ValidationError, match="n must be smaller than m"):
        sparsity(n=4, m=4)
    with pytest.raises(pydantic.ValidationError, match="m"):
        sparsity(m=6)
    with pytest.raises(PassPreconditionError, match="matches no linear layer"):
        build_pass(sparsity(targets="nothing.*")).run(graph, PassContext(calibration))
    low_rank = build_pass(LowRankConfig(**{"pass": "low_rank", "targets": "layers.0.mlp.up_proj", "rank": 50}))
    low_rank = low_rank.run(graph, PassContext(calibration))
    with pytest.raises(PassPreconditionError, match=r"m: 16 does not divide the 50 inputs of layers.0.mlp.up_proj.1"):
        build_pass(sparsity(targets="layers.0.mlp.up_proj.1", n=2, m=16)).run(low_rank.graph, PassContext(calibration))
