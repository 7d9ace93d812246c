"""execution.engine: per-layer jobs (low_rank, weight_clustering, weight_quant, nm_sparsity) as Ray tasks give the in-process result byte for
byte."""

from __future__ import annotations

import sys

import pytest
import torch

from graphpress import compress
from graphpress.errors import SpecError
from graphpress.execution import InProcess, engine
from graphpress.ir.store import materialize
from graphpress.schema import load_spec

from .families import build

pytest.importorskip("transformers")


def ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))


LOW_RANK = {"pass": "low_rank", "targets": "layers.*", "method": "whitened_svd"}
CLUSTERING = {
    "pass": "weight_clustering",
    "targets": "layers.*",
    "group_size": 16,
    "weighting": "activation",
    "error_feedback": True,
}


def test_a_ray_engine_starts_a_local_ray_and_stops_it():
    """Ray not running: the engine starts a local one for the run and shuts it down after (first in this file, before
    the shared session below exists)."""
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    with engine(load_spec({"execution": {"engine": "ray", "num_cpus": 1}}).execution) as runner:
        assert ray.is_initialized() and runner.result(runner.submit(lambda x: x + 1, 1)) == 2
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the comparisons (starting one takes ~5 s and its workers import torch again): the engine
    uses a running Ray as it finds it."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize(
    ("job", "stream"),
    [
        ({**LOW_RANK, "rank": {"energy": 0.9}}, True),  # per layer as the sweep goes, Ray tasks fed by it
        ({**LOW_RANK, "rank": {"budget": {"param_ratio": 0.6}}}, False),  # all spectra first, in memory
        (CLUSTERING, True),  # k-means and error feedback per linear
        ({"pass": "weight_quant", "method": "gptq", "bits": 4, "group_size": 16}, True),  # GPTQ per linear
        ({"pass": "nm_sparsity", "score": "activation", "update": True}, True),  # masks and refits per linear
    ],
)
def test_local_ray_is_byte_identical_to_in_process(ray_session, tmp_path, job, stream):
    folder = tmp_path / "ckpt"
    build("llama").save_pretrained(folder)
    spec = {"calibration": {"samples": 3, "seq_len": 16}, "passes": [job], "verify": {"max": 10}, "backends": []}
    stream = {"stream": stream}
    data = [(ids(i),) for i in range(4)]
    local = compress(str(folder), {**spec, "execution": stream}, calibration_data=data, out_dir=tmp_path / "a")
    remote = compress(
        str(folder),
        {**spec, "execution": {**stream, "engine": "ray", "num_cpus": 2}},
        calibration_data=data,
        out_dir=tmp_path / "b",
    )
    ours, theirs = remote.graph.tensors(), local.graph.tensors()
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(materialize(ours[k]), materialize(theirs[k])) for k in ours)
    assert remote.report.passes[0]["layers"] == local.report.passes[0]["layers"]
    assert (remote.report.passes[0]["details"]["engine"], local.report.passes[0]["details"]["engine"]) == (
        "ray",
        "local",
    )
    assert any(
        layer["action"] in ("factored", "clustered", "quantized", "sparsified")
        for layer in local.report.passes[0]["layers"]
    )


def test_ray_not_installed_is_a_spec_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    config = load_spec({"execution": {"engine": "ray"}}).execution
    with (
        pytest.raises(SpecError, match=r"execution.engine: 'ray' needs Ray installed: pip install 'graphpress\[ray\]'"),
        engine(config),
    ):
        pass


def test_the_default_engine_runs_jobs_where_they_are_submitted():
    with engine(load_spec({}).execution) as runner:
        assert isinstance(runner, InProcess)
        assert runner.result(runner.submit(lambda x: x + 1, 1)) == 2
