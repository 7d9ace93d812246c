"""Graph vocabulary: clone, add parameters, replace a linear by a subgraph, summary, networkx."""

import pytest
import torch

from graphpress.ir import capture

from .conftest import rel_err


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 8, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def graph():
    return capture(TwoLinears(), (torch.randn(3, 16),))


def ops(graph) -> list[str]:
    return [str(n.target) for n in graph.fx.nodes if n.op == "call_function"]


def test_summary_counts_params_bytes_and_flops(graph):
    summary = graph.summary()
    assert summary.params == 16 * 32 + 32 + 32 * 8
    assert summary.bytes == 4 * summary.params
    assert summary.bytes_by_dtype == {"float32": 4 * summary.params}
    assert summary.linear_flops_per_token == 2 * (16 * 32 + 32 * 8)
    assert summary.op_histogram["aten.linear.default"] == 2


def test_replace_linear_by_a_subgraph(graph):
    """Before: fc1 -> relu -> fc2. Expected: fc1 -> relu -> fc2.0 -> fc2.1, same function."""
    x = torch.randn(5, 16)
    expected = graph(x)
    work = graph.clone()
    fc2 = work.linears("fc2")[0]
    w = work.weight(fc2.weight)
    identity = torch.eye(32)
    work.replace_linear(fc2, lambda sub, h: sub.linear(sub.linear(h, "0", identity), "1", w))
    assert ops(work) == ["aten.linear.default", "aten.relu.default", "aten.linear.default", "aten.linear.default"]
    assert [lin.path for lin in work.linears()] == ["fc1", "fc2.0", "fc2.1"]
    assert "fc2.weight" not in work.tensors()  # the replaced weight is gone
    assert sorted(work.program.state_dict) == ["fc1.bias", "fc1.weight", "fc2.0.weight", "fc2.1.weight"]
    assert rel_err(work(x), expected) < 1e-6
    assert [lin.path for lin in graph.linears()] == ["fc1", "fc2"]  # the clone's source is untouched
    assert torch.equal(graph(x), expected)


def test_replacement_must_keep_the_output_shape(graph):
    work = graph.clone()
    fc2 = work.linears("fc2")[0]
    with pytest.raises(ValueError, match="changes its output"):
        work.replace_linear(fc2, lambda sub, h: sub.linear(h, "0", torch.zeros(4, 32)))


def test_add_parameter_and_set_weight(graph):
    work = graph.clone()
    node = work.add_parameter("extra.scale", torch.ones(8))
    assert node.op == "placeholder" and work.weight("extra.scale").shape == (8,)
    with pytest.raises(ValueError, match="already has"):
        work.add_parameter("extra.scale", torch.ones(8))
    assert work.remove_unused_tensors() == ["extra.scale"]
    work.set_weight("fc2.weight", torch.zeros(8, 32))
    assert torch.count_nonzero(work(torch.randn(2, 16))) == 0
    assert torch.count_nonzero(graph(torch.randn(2, 16))) > 0
    with pytest.raises(ValueError, match="new value"):
        work.set_weight("fc2.weight", torch.zeros(8, 31))


def test_run_with_taps_sees_intermediate_values(graph):
    x = torch.randn(4, 16)
    seen = {}
    relu = next(n for n in graph.fx.nodes if n.target is torch.ops.aten.relu.default)
    graph.run_with_taps((x,), {relu.name: lambda v: seen.setdefault("relu", v)})
    model = TwoLinears()
    assert torch.allclose(seen["relu"], torch.relu(model.fc1(x)))


def test_to_networkx(graph):
    nx_graph = graph.to_networkx()
    linear_nodes = [n for n, d in nx_graph.nodes(data=True) if d["target"] == "aten.linear.default"]
    assert {nx_graph.nodes[n]["path"] for n in linear_nodes} == {"fc1", "fc2"}
    fc1_weight = next(n for n, d in nx_graph.nodes(data=True) if d["tensor"] == "fc1.weight")
    assert nx_graph.has_edge(fc1_weight, linear_nodes[0])


def test_revision_names_the_content(graph):
    work = graph.clone()
    assert work.revision == graph.revision  # same content: cached statistics carry over
    work.add_parameter("extra", torch.ones(1))
    assert work.revision != graph.revision
    other = capture(TwoLinears(), (torch.randn(3, 16),))
    assert other.revision != graph.revision


def test_clone_keeps_the_signature_when_fx_renames_a_node():
    """nn.Sequential's placeholder is called 'input'; a copied graph may call it 'input_1'."""
    graph = capture(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(2, 4),))
    clone = graph.clone()
    x = torch.randn(3, 4)
    assert torch.equal(clone(x), graph(x))


def test_program_code_is_current_after_edits(graph):
    """Edits regenerate the module's code lazily; reading ``program`` must see every edit."""
    work = graph.clone()
    fc2 = work.linears("fc2")[0]
    w = work.weight(fc2.weight)
    work.replace_linear(fc2, lambda sub, h: sub.linear(sub.linear(h, "0", torch.eye(32)), "1", w))
    code = work.program.graph_module.code
    assert "p_fc2_0_weight" in code and "p_fc2_weight" not in code
