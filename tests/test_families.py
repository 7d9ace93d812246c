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
from .families import DENSE, FAMILIES, build, token_ids

pytest.importorskip("transformers")

MODES = ("forward", "decode")


@pytest.fixture(scope="module")
def models():
    return {}


def family(models, name):
    if name not in models:
        models[name] = build(name)
    return models[name]


def logits(graph, ids):
    with torch.no_grad():
        if graph.cache is not None:
            return teacher_forced_logits(TorchDecoder(graph), ids)
        return logits_of(graph(ids))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", FAMILIES)
def test_default_config_captures_and_runs_at_other_shapes(models, name, mode):
    model = family(models, name)
    before, config = state_hash(model), model.config.to_dict()
    graph = capture(model, (token_ids(1, 12),), mode=mode)
    assert state_hash(model) == before and model.config.to_dict() == config and model.config.use_cache
    other = token_ids(3, 17, seed=1)
    with torch.no_grad():
        expected = model(other).logits
    assert rel_err(logits(graph, other), expected) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", DENSE)
def test_onnx_of_default_config_runs_at_other_shapes(models, name, mode, tmp_path):
    import onnxruntime as ort

    model = family(models, name)
    result = compress(model, {"capture": {"mode": mode}}, (token_ids(1, 12),), out_dir=tmp_path, progress=False)
    other = token_ids(3, 17, seed=1)
    with torch.no_grad():
        expected = model(other).logits
    if mode == "decode":
        got = teacher_forced_logits(OnnxDecoder(result.artifacts["onnx"]), other)
    else:
        session = ort.InferenceSession(str(result.artifacts["onnx"]))
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: other.numpy()})[0])
    assert rel_err(got, expected) < 1e-5
