"""PassManager: spec order, ordering constraints, requires failures, verification after each pass."""

from typing import Literal

import pytest
import torch

from graphpress import PassPreconditionError, VerificationError
from graphpress.ir import capture
from graphpress.passes import LayerReport, Pass, PassContext, PassManager, PassReport, Verifier, build_pass
from graphpress.schema import LowRankConfig, PassConfig, VerifyConfig, load_spec

CALLS: list[str] = []


class ScaleConfig(PassConfig):
    pass_: Literal["scale"] = "scale"
    factor: float = 1.0


class Scale(Pass):
    """Test pass: multiplies the selected linears' weights by ``factor`` (1.0 is exact)."""

    name = "scale"
    Config = ScaleConfig

    def requires(self, graph, ctx):
        self.require_linears(graph, ctx)

    def apply(self, graph, ctx) -> PassReport:
        CALLS.append(f"{self.name}:{self.config.factor}")
        report = self.new_report()
        for lin in self.selected_linears(graph, ctx):
            graph.set_weight(lin.weight, graph.weight(lin.weight) * self.config.factor)
            report.layers.append(LayerReport(lin.path, "scaled", lin.params, lin.params))
        return report


class AfterScale(Scale):
    name = "after_scale"
    after = ("scale",)


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8, bias=False)  # so scaling it by s scales the output by s

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.fixture
def setup():
    inputs = [(torch.randn(4, 8),) for _ in range(2)]
    graph = capture(MLP(), inputs[0])
    CALLS.clear()
    return graph, PassContext(inputs), inputs


def test_passes_run_in_spec_order_and_report_each(setup):
    graph, ctx, _ = setup
    pm = PassManager([Scale(ScaleConfig(factor=2.0)), Scale(ScaleConfig(factor=0.5, targets="up"))])
    result = pm.run(graph, ctx)
    assert CALLS == ["scale:2.0", "scale:0.5"]
    assert [len(r.layers) for r in result.report.children] == [2, 1]
    assert torch.equal(result.graph.weight("up.weight"), graph.weight("up.weight"))  # x2 then x0.5
    assert torch.equal(result.graph.weight("down.weight"), 2 * graph.weight("down.weight"))


def test_passes_are_functional(setup):
    graph, ctx, inputs = setup
    before = graph(*inputs[0])
    Scale(ScaleConfig(factor=3.0)).run(graph, ctx)
    assert torch.equal(graph(*inputs[0]), before)


def test_ordering_constraint_is_checked_before_running(setup):
    with pytest.raises(
        PassPreconditionError, match=r"passes\[0\] \(after_scale\) must run after scale \(passes\[1\]\)"
    ):
        PassManager([AfterScale(ScaleConfig()), Scale(ScaleConfig())])
    PassManager([Scale(ScaleConfig()), AfterScale(ScaleConfig())])  # the right order is accepted
    assert CALLS == []


def test_requires_failure_names_the_spec_field(setup):
    graph, ctx, _ = setup
    pm = PassManager([Scale(ScaleConfig()), Scale(ScaleConfig(targets="layers.*.mlp"))])
    with pytest.raises(
        PassPreconditionError, match=r"passes\[1\]\.targets: 'layers\.\*\.mlp'.*linear layers in this graph: down, up"
    ):
        pm.run(graph, ctx)


def test_verification_fails_when_error_exceeds_max(setup):
    graph, ctx, inputs = setup
    verifier = Verifier(VerifyConfig(metric="rel_l2", max=0.1), graph, inputs)
    pm = PassManager([Scale(ScaleConfig(factor=1.0)), Scale(ScaleConfig(factor=1.5, targets="down"))], verifier)
    with pytest.raises(VerificationError, match=r"passes\[1\] \(scale\): rel_l2 = 0\.5 .* verify\.max = 0\.1"):
        pm.run(graph, ctx)


def test_verification_warns_and_records(setup):
    graph, ctx, inputs = setup
    verifier = Verifier(VerifyConfig(max=0.1, on_fail="warn"), graph, inputs)
    pm = PassManager([Scale(ScaleConfig(factor=1.0)), Scale(ScaleConfig(factor=1.5, targets="down"))], verifier)
    with pytest.warns(UserWarning, match="exceeds verify.max"):
        result = pm.run(graph, ctx)
    first, second = (r.verification for r in result.report.children)
    assert first["passed"] and first["rel_l2"] == 0.0
    assert not second["passed"] and second["rel_l2"] == pytest.approx(0.5, rel=1e-6)
    assert result.report.children[1].warnings


def test_pipelines_nest(setup):
    graph, ctx, _ = setup
    inner = PassManager([Scale(ScaleConfig(factor=2.0))])
    outer = PassManager([inner, Scale(ScaleConfig(factor=2.0, targets="up"))])
    result = outer.run(graph, ctx)
    assert CALLS == ["scale:2.0", "scale:2.0"]
    assert torch.equal(result.graph.weight("up.weight"), 4 * graph.weight("up.weight"))


def test_registry_builds_passes_from_the_spec():
    spec = load_spec({"passes": [{"pass": "low_rank", "rank": 2}]})
    built = build_pass(spec.passes[0])
    assert built.name == "low_rank" and isinstance(built.config, LowRankConfig)
    with pytest.raises(TypeError, match="takes a LowRankConfig"):
        type(built)(ScaleConfig())


def test_calibration_statistics_are_collected_once_per_graph_content(setup, monkeypatch):
    graph, ctx, _ = setup
    runs = []
    original = type(graph).run_with_taps
    monkeypatch.setattr(type(graph), "run_with_taps", lambda self, *a, **k: (runs.append(1), original(self, *a, **k)))
    linears = graph.linears()
    ctx.linear_inputs(graph, linears)
    ctx.linear_inputs(graph.clone(), linears)  # a clone has the same content: no new sweep
    assert len(runs) == len(ctx.calibration_inputs)
