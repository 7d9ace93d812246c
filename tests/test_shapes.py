"""Shapes: artifacts are validated beyond the calibration shapes, and a shape capture did not promise is named."""

from __future__ import annotations

import pytest
import torch

from graphpress import ShapeError, compress
from graphpress.backends.onnx import OnnxBackend
from graphpress.ir import capture
from graphpress.ir.shapes import other_shape, shape_problems
from graphpress.schema import OnnxBackendConfig

from .families import build, token_ids


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))


def test_a_second_shape_inside_the_captured_ranges(tiny_llama, ids):
    """Batch + 1, half the length; a mask given beside the ids follows the same length symbol."""
    assert [t.shape for t in other_shape(capture(tiny_llama, (ids,)), [ids])] == [(2, 12)]
    assert other_shape(capture(tiny_llama, (ids,), dynamic=False), [ids]) is None
    model = build("llama")
    mask = torch.ones(1, 8, dtype=torch.long)
    graph = capture(model, (token_ids(1, 8), mask))
    resized = other_shape(graph, [token_ids(1, 8), mask])
    assert [t.shape for t in resized] == [(2, 4), (2, 4)]
    assert torch.equal(resized[0][1], token_ids(1, 8)[0, :4])  # values wrapped from the given ones


def test_shape_problems_name_the_input_and_dimension(tiny_llama, ids):
    static = capture(tiny_llama, (ids,), dynamic=False)
    [problem] = shape_problems(static, [torch.zeros(2, 24, dtype=torch.long)])
    assert problem.startswith("input_ids dimension 0 is 2; the graph was captured for exactly 1")
    model = build("llama")
    graph = capture(model, (token_ids(1, 8), torch.ones(1, 8, dtype=torch.long)))
    [problem] = shape_problems(graph, [token_ids(1, 8), torch.ones(1, 6, dtype=torch.long)])
    assert "attention_mask dimension 1 is 6 but input_ids dimension 1 is 8; they must be equal" in problem


def test_the_compressed_model_names_a_shape_it_cannot_take(tiny_llama, ids):
    result = compress(tiny_llama, {"capture": {"dynamic": False}, "passes": [], "backends": []}, (ids,))
    with pytest.raises(ShapeError, match=r"input_ids dimension 0 is 3; the graph was captured for exactly 1"):
        result.model(torch.zeros(3, 24, dtype=torch.long))
    assert result.model(input_ids=ids).shape == (1, 24, 256)


@pytest.mark.parametrize("mode", ["forward", "decode"])
def test_backends_validate_at_a_second_shape(tiny_llama, ids, mode):
    result = compress(tiny_llama, {"capture": {"mode": mode}, "passes": [], "verify": {"max": 1.0}}, (ids,))
    shapes = result.report.backends[0]["details"]["validated_shapes"]
    expect = ["1x24", "2x12"] if mode == "forward" else ["decode: 1x24 token by token", "decode: prompt 2x12"]
    assert shapes == expect
    assert "Validated at input shapes: " in result.artifacts["report_md"].read_text()


def test_an_artifact_wrong_at_batch_two_fails_validation(tiny_llama, ids):
    """An artifact that is right only at the calibration shape (as one with a baked-in batch would be) no longer
    passes: the second shape's outputs are compared too."""
    graph = capture(tiny_llama, (ids,))
    eager = graph.module()

    def batch_one_only(tensors):
        out = eager(*tensors)
        return [out if tensors[0].shape[0] == 1 else torch.zeros_like(out)]

    backend = OnnxBackend(OnnxBackendConfig(target="onnx"))
    assert backend.compare_with_eager(graph, [(ids,)], lambda t: [eager(*t)], None).errors["rel_l2"] < 1e-6
    assert backend.compare_with_eager(graph, [(ids,)], batch_one_only, None).errors["rel_l2"] > 0.5
