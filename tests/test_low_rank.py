"""low_rank (truncated SVD): exactness at full rank, Eckart-Young optimality, skipping, reports."""

import pytest
import torch

from graphpress import PassPreconditionError
from graphpress.ir import capture
from graphpress.metrics import perplexity
from graphpress.passes import PassContext, build_pass
from graphpress.passes.low_rank import factor
from graphpress.schema import load_spec

from .conftest import rel_err


def low_rank(**config):
    spec = load_spec({"passes": [{"pass": "low_rank", **config}]})
    return build_pass(spec.passes[0])


class Toy(torch.nn.Module):
    def __init__(self, in_features=48, hidden=40, out_features=24):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(in_features, hidden)
        self.fc2 = torch.nn.Linear(hidden, out_features)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def run(model, pass_, n=3):
    inputs = [(torch.randn(5, model.fc1.in_features),) for _ in range(n)]
    graph = capture(model, inputs[0])
    return graph, pass_.run(graph, PassContext(inputs)), inputs


def linear_ops(graph) -> int:
    return sum(1 for n in graph.fx.nodes if n.target is torch.ops.aten.linear.default)


def test_full_rank_is_exact_and_makes_two_linears_per_layer():
    """Before: fc1 -> gelu -> fc2. Expected: fc1.0 -> fc1.1 -> gelu -> fc2.0 -> fc2.1, same outputs."""
    model = Toy()
    graph, result, inputs = run(model, low_rank(rank=48, only_if_smaller=False))
    assert linear_ops(graph) == 2 and linear_ops(result.graph) == 4
    assert [lin.path for lin in result.graph.linears()] == ["fc1.0", "fc1.1", "fc2.0", "fc2.1"]
    assert [layer.details["rank"] for layer in result.report.layers] == [40, 24]  # clamped to min(in, out)
    for (x,) in inputs:
        assert rel_err(result.graph(x), model(x)) <= 1e-5
    assert all(layer.details["weight_error"] < 1e-5 for layer in result.report.layers)


def test_exact_for_a_weight_of_matching_rank():
    model = Toy()
    with torch.no_grad():
        u, v = torch.randn(40, 6), torch.randn(6, 48)
        model.fc1.weight.copy_(u @ v)  # rank 6
    graph, result, inputs = run(model, low_rank(targets="fc1", rank=6))
    (layer,) = result.report.layers
    assert layer.action == "factored"
    assert layer.params_after == 6 * (48 + 40) + 40 < layer.params_before
    assert layer.details["weight_error"] < 1e-5 and layer.details["output_error"] < 1e-5
    for (x,) in inputs:
        assert rel_err(result.graph(x), model(x)) <= 1e-5
    assert result.graph.summary().params == graph.summary().params - layer.params_before + layer.params_after


def test_truncation_error_is_the_tail_of_the_spectrum():
    """Eckart-Young: ||W - B A||_F^2 = sum of the discarded squared singular values, and it falls with rank."""
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    s = torch.linalg.svdvals(weight)
    errors = []
    for rank in (4, 16, 32, 63):
        a, b, _ = factor(weight, rank)
        err = (weight - b @ a).norm()
        assert err.item() == pytest.approx(s[rank:].square().sum().sqrt().item(), rel=1e-4)
        errors.append(err.item())
    assert errors == sorted(errors, reverse=True)


def test_param_ratio_and_skipping():
    model = Toy(in_features=48, hidden=40, out_features=24)
    _, result, _ = run(model, low_rank(rank={"param_ratio": 0.5}))
    fc1, fc2 = result.report.layers
    assert fc1.details["rank"] == int(0.5 * 48 * 40 / (48 + 40))
    assert fc1.params_after - 40 <= 0.5 * 48 * 40
    _, result, _ = run(model, low_rank(rank=30))
    fc1, fc2 = result.report.layers
    assert fc1.action == "skipped" and "30 x (in + out)" in fc1.details["reason"].replace("rank ", "")
    assert fc2.action == "skipped"
    assert not result.modified and result.graph.summary().params == fc1.params_before + fc2.params_before


def test_bias_is_kept_on_the_second_factor():
    model = Toy()
    _, result, _ = run(model, low_rank(targets="fc2", rank=8))
    assert torch.equal(result.graph.weight("fc2.1.bias"), model.fc2.bias.detach())
    assert "fc2.0.bias" not in result.graph.tensors()


def test_report_output_error_matches_a_direct_measurement():
    model = Toy()
    _, result, inputs = run(model, low_rank(targets="fc1", rank=5), n=2)
    (layer,) = result.report.layers
    x = torch.cat([i[0] for i in inputs])
    w = model.fc1.weight.detach()
    a, b, s = factor(w, 5)
    expected = ((x @ (b @ a).T) - x @ w.T).norm() / (x @ w.T).norm()
    assert layer.details["output_error"] == pytest.approx(expected.item(), rel=1e-4)
    assert layer.details["spectrum"] == pytest.approx(s.tolist(), rel=1e-5)


def test_targets_matching_nothing_is_a_precondition_error():
    with pytest.raises(PassPreconditionError, match=r"passes\.targets: 'mlp\.\*' .*matches no linear"):
        run(Toy(), low_rank(targets="mlp.*", rank=4))


def test_hf_llama_full_rank_exact(hf_llama):
    ids = [(torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    graph = capture(hf_llama, ids[0])
    result = low_rank(targets="layers.*", rank=10_000, only_if_smaller=False).run(graph, PassContext(ids))
    assert len(result.report.layers) == 14  # 7 linears x 2 layers
    with torch.no_grad():
        for (x,) in ids:
            assert rel_err(result.graph(x).logits, hf_llama(x).logits) <= 1e-5


def test_hf_llama_mlp_at_half_the_parameters(hf_llama):
    ids = [(torch.randint(0, 128, (2, 12)),)]
    graph = capture(hf_llama, ids[0])
    result = low_rank(targets="layers.*.mlp.*", rank={"param_ratio": 0.5}).run(graph, PassContext(ids))
    factored = [layer for layer in result.report.layers if layer.action == "factored"]
    assert len(factored) == 6
    assert all(layer.params_after <= 0.5 * layer.params_before for layer in factored)


@pytest.mark.slow
def test_trained_example_lm_perplexity(trained_llama):
    """Full rank keeps held-out perplexity; half the MLP parameters costs some, and less than a quarter does."""
    from examples.tiny_llama.data import load_split
    from examples.tiny_llama.model import calibration_batches

    heldout = load_split("heldout")[: 32 * 128]
    calib = calibration_batches(4, 128, seed=0)
    graph = capture(trained_llama, calib[0])
    base = perplexity(trained_llama, heldout, seq_len=128)
    ppl = {}
    for name, rank in {"full": 10_000, "half": {"param_ratio": 0.5}, "quarter": {"param_ratio": 0.25}}.items():
        pass_ = low_rank(targets="layers.*.mlp.*", rank=rank, only_if_smaller=name != "full")
        ppl[name] = perplexity(pass_.run(graph, PassContext(calib)).graph.module(), heldout, seq_len=128)
    assert ppl["full"] == pytest.approx(base, rel=1e-4)
    assert base < ppl["half"] < ppl["quarter"]
