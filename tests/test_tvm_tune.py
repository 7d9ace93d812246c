"""MetaSchedule tuning in this process: the pinned apache-tvm-ffi keeps it from crashing (0.1.15.x segfaults in
ToJSONGraph), a tuned module matches eager, and a second tuning into the same database tunes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")


def linear_module():
    """A Linear(16, 24) on a (2, 16) input, imported as graphpress's TVM backend imports graphs (static shapes)."""
    from tvm.relax.frontend.torch import from_exported_program

    layer = torch.nn.Linear(16, 24)
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    program = torch.export.export(layer, (x,))
    return from_exported_program(program), x, layer(x).detach()


def run(executable, x: torch.Tensor) -> np.ndarray:
    vm = tvm.relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()


def test_metaschedule_tunes_here_and_a_second_tuning_reuses_the_database(tmp_path):
    """Before: a linear's matmul, untuned. Expected: 4 trials recorded in the JSON database, the compiled module
    equal to eager; tuned again into the same folder, the matmul is reused, nothing is measured."""
    from graphpress.backends.tvm_tune import compile_tuned, host_target, tune

    mod, x, expected = linear_module()
    target = host_target(cores=1)
    first = tune(mod, target, tmp_path, trials=4, ops=["matmul"], strategy="replay-trace", cost_model="random")
    assert first.tuned == ["fused_matmul_add"] and first.reused == []
    records = first.database.get_all_tuning_records()
    assert len(records) == 4 and all(r.run_secs for r in records)
    assert {p.name for p in tmp_path.iterdir()} == {"database_workload.json", "database_tuning_record.json"}
    np.testing.assert_allclose(run(compile_tuned(first, mod, target), x), expected.numpy(), rtol=1e-5, atol=1e-6)
    again = tune(mod, target, tmp_path, trials=4, ops=["matmul"], strategy="replay-trace", cost_model="random")
    assert again.tuned == [] and again.reused == ["fused_matmul_add"]
    assert len(again.database.get_all_tuning_records()) == 4
