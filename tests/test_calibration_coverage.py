"""A linear no calibration signal reaches (an expert no token was routed to) gets the data-free criterion.

Activation-aware criteria weigh by X^T X; where it is zero they would whiten by zero, score
every weight 0 or refit every weight to 0. The pass uses the data-free form there, says so
naming the layer, and the stored weights are exactly the data-free run's.
"""

import pytest
import torch

from graphpress.ir import capture
from graphpress.passes import PassContext, build_pass
from graphpress.schema import load_spec


class HalfDead(torch.nn.Module):
    """``dead``'s input is exactly zero on every input: the calibration never reaches it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.live = torch.nn.Linear(16, 16)
        self.dead = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.live(x) + self.dead(x * 0)


def run(config: dict):
    spec = load_spec({"passes": [{**config, "targets": "dead"}]})
    inputs = [(torch.randn(8, 16, generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    return build_pass(spec.passes[0]).run(capture(HalfDead(), inputs[0]), PassContext(inputs))


@pytest.mark.parametrize(
    ("aware", "data_free"),
    [
        ({"pass": "low_rank", "method": "whitened_svd", "rank": 4}, {"pass": "low_rank", "method": "svd", "rank": 4}),
        ({"pass": "nm_sparsity", "score": "activation", "update": True}, {"pass": "nm_sparsity"}),
        (
            {"pass": "weight_clustering", "bits": 2, "weighting": "activation", "group_size": 4},
            {"pass": "weight_clustering", "bits": 2, "group_size": 4},
        ),
    ],
)
def test_unreached_linear_gets_the_data_free_criterion(aware, data_free):
    result, expected = run(aware), run(data_free)
    assert [w for w in result.report.warnings if w.startswith("dead: no calibration input reached it")]
    assert not expected.report.warnings
    stored = {k: v for k, v in result.graph.tensors().items() if k.startswith("dead.")}
    assert stored and stored.keys() == {k for k in expected.graph.tensors() if k.startswith("dead.")}
    for name, value in stored.items():
        assert torch.allclose(value.float(), expected.graph.weight(name).float(), atol=1e-6), name


def test_a_calibration_that_cannot_fit_in_memory_is_refused_before_the_sweep(monkeypatch):
    """Every row of every targeted linear's input is held until the sweep ends: estimated up front."""
    from graphpress.errors import PassPreconditionError
    from graphpress.schema import LowRankConfig

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    x = torch.randn(4, 8, 64)
    graph = capture(model, (x,))
    swept = []
    monkeypatch.setattr("graphpress.passes.context.available_memory", lambda: 100_000)
    monkeypatch.setattr("graphpress.passes.context.run_calibration_sample", lambda *a: swept.append(1))
    config = LowRankConfig(**{"pass": "low_rank", "method": "whitened_svd", "rank": 8})
    with pytest.raises(PassPreconditionError, match=r"over 320 calibration rows needs about .* GiB, more than"):
        build_pass(config).run(graph, PassContext([(x,)] * 10))
    assert swept == []
