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
    np.testing.assert_allclose(
        run(compile_tuned(first.database, mod, target), x), expected.numpy(), rtol=1e-5, atol=1e-6
    )
    again = tune(mod, target, tmp_path, trials=4, ops=["matmul"], strategy="replay-trace", cost_model="random")
    assert again.tuned == [] and again.reused == ["fused_matmul_add"]
    assert len(again.database.get_all_tuning_records()) == 4


class Affine(torch.nn.Module):
    def forward(self, x):
        return (x * 2 + 1).reshape(x.shape[0], -1)


def symbolic_module(static_batch: bool = False):
    """Relax of ``(x * 2 + 1).reshape(b, t * 8)`` over x (b, t, 8), b (unless static) and t symbolic (not
    legalized: the backend specialises before it legalizes, so that each copy's kernels are static)."""
    from tvm.relax.frontend.torch import from_exported_program

    dims = {1: torch.export.Dim("t", min=2, max=64)}
    if not static_batch:
        dims[0] = torch.export.Dim("b", min=2, max=8)
    program = torch.export.export(Affine(), (torch.randn(2, 4, 8),), dynamic_shapes=(dims,))
    return from_exported_program(program, run_ep_decomposition=False)


def test_specialise_adds_a_static_copy_of_main_per_size():
    """Before: main over (b, t, 8). Expected: main unchanged, main_b1_t4 and main_b3_t16 over static shapes, each
    computing what main does at that shape."""
    from graphpress.backends.tvm_tune import specialise

    mod, names = specialise(symbolic_module(), [(1, 4), (3, 16)])
    assert names == {"1x4": "main_b1_t4", "3x16": "main_b3_t16"}
    assert [int(d) for d in mod["main_b3_t16"].params[0].ty.shape.values] == [3, 16, 8]
    assert not all(isinstance(d, tvm.tirx.IntImm) for d in mod["main"].params[0].ty.shape.values)
    vm = tvm.relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    x = torch.randn(3, 16, 8)
    for name in ("main", "main_b3_t16"):
        np.testing.assert_allclose(vm[name](tvm.runtime.tensor(x.numpy()))[0].numpy(), Affine()(x).numpy(), rtol=1e-6)


def test_specialise_keeps_a_static_dimension_and_refuses_another_size():
    from graphpress.backends.tvm_tune import specialise

    mod, names = specialise(symbolic_module(static_batch=True), [(2, 5)])
    assert names == {"2x5": "main_b2_t5"}
    with pytest.raises(ValueError, match="static where tune asks for another size: dimension 0 is 2, not 1"):
        specialise(symbolic_module(static_batch=True), [(1, 5)])
    static = linear_module()[0]
    assert specialise(static, [(1, 5)]) == (static, {})


def test_tunable_kernels_are_static_unscheduled_and_not_reshapes():
    """The elementwise kernel of a static copy is a task; its symbolic twin, the reshape (a view at run time) and a
    kernel marked scheduled by hand are not."""
    from graphpress.backends.tvm_tune import SCHEDULED, specialise, tunable

    mod, _ = specialise(symbolic_module(), [(1, 4)])
    mod = tvm.relax.transform.LegalizeOps()(mod)
    kernels = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    static = [f for f in kernels.values() if all(isinstance(d, tvm.tirx.IntImm) for p in f.params for d in p.shape)]
    assert {tunable(f) for f in kernels.values()} == {True, False}
    assert len(kernels) == 6 and len(static) == 3
    assert [tunable(f) for f in static if not tvm.relax.analysis.has_reshape_pattern(f)] == [True, True]
    assert not any(tunable(f) for f in kernels.values() if tvm.relax.analysis.has_reshape_pattern(f))
    assert not any(tunable(f.with_attr(SCHEDULED, True)) for f in static)


def tune_backend(**tune):
    from graphpress.backends import build_backend
    from graphpress.schema import TvmBackendConfig

    config = {"trials": 24, "strategy": "replay-trace", **tune}
    return build_backend(TvmBackendConfig(target="tvm", tune=config), "backends[0]")


FRESH_PROCESS = """
import sys, numpy as np, torch
from graphpress.runtime import TvmModule
module = TvmModule(sys.argv[1])
print(sorted(module.specialised))
for k, path in enumerate(sys.argv[2:]):
    np.save(f"{path}.out.npy", module(torch.from_numpy(np.load(path)))[0].numpy())
"""


@pytest.mark.slow
def test_tuned_library_runs_its_copies_in_a_fresh_process(tiny_llama, tmp_path):
    """Before: a forward graph over (batch, tokens). Expected: copies at 1x12 and 1x5 tuned (every task measured),
    each checked against eager; the library, loaded in a fresh process, calls its copies and its dynamic main
    alike and matches eager."""
    import subprocess
    import sys

    from graphpress.ir import capture

    calibration = [(torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1)),)]
    graph = capture(tiny_llama, calibration[0])
    first = tune_backend(lengths=[12, 5]).build(graph, calibration, tmp_path)
    tuning = first.details["tuning"]
    assert tuning["specialised"] == {"1x12": "main_b1_t12", "1x5": "main_b1_t5"}
    assert tuning["tuned"] and tuning["unmeasured"] == [] and tuning["reused"] == []
    assert set(tuning["best_us"]) == set(tuning["tuned"]) and all(us > 0 for us in tuning["best_us"].values())
    assert set(tuning["default_us"]) == set(tuning["tuned"])  # each kernel's loops as written, timed alike
    best, default = tuning["best_us"], tuning["default_us"]  # rounded to 0.01 us: ties either way
    assert all(best[t] <= default[t] if t in tuning["applied"] else best[t] >= default[t] for t in tuning["tuned"])
    assert set(tuning["checked"]) == {"1x12", "1x5"} and max(tuning["checked"].values()) < 1e-5
    assert {"model.tuning/database_workload.json", "model.tuning/database_tuning_record.json"} <= set(first.files)
    inputs = [torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(2)) for shape in [(1, 5), (2, 9)]]
    paths = []
    for k, ids in enumerate(inputs):
        paths.append(str(tmp_path / f"ids{k}.npy"))
        np.save(paths[-1], ids.numpy())
    out = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "model.so"), *paths], check=True, capture_output=True
    )
    assert out.stdout.decode().split("\n")[0] == "['1x12', '1x5']"
    for ids, path in zip(inputs, paths):
        np.testing.assert_allclose(np.load(f"{path}.out.npy"), tiny_llama(ids).detach().numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_second_run_into_the_same_folder_reuses_the_tuning_database(tmp_path):
    """compress builds its backends in a staging folder: the database it starts from is the published one."""
    from graphpress import compress

    spec = {
        "calibration": {"samples": 1, "seq_len": 16},
        "backends": [{"target": "tvm", "tune": {"trials": 24, "strategy": "replay-trace"}}],
    }
    first = compress("examples/tiny_llama", spec, out_dir=tmp_path).report.backends[0]["details"]["tuning"]
    assert first["tuned"] and first["unmeasured"] == [] and first["specialised"] == {"1x16": "main_b1_t16"}
    assert (tmp_path / "model.tuning" / "database_tuning_record.json").is_file()
    again = compress("examples/tiny_llama", spec, out_dir=tmp_path).report.backends[0]["details"]["tuning"]
    assert again["tuned"] == [] and again["reused"] == first["tuned"]


@pytest.mark.slow
def test_tuned_decode_step_generates_like_eager(tiny_llama, tmp_path):
    """A decode graph's copy is its one-token step (batch 1): validation's token-by-token logits run it."""
    from graphpress.ir import capture

    calibration = [(torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1)),)]
    record = tune_backend(trials=8).build(capture(tiny_llama, calibration[0], mode="decode"), calibration, tmp_path)
    assert record.details["tuning"]["specialised"] == {"1x1": "main_b1_t1"}
    assert record.details["tuning"]["tuned"] and record.errors["rel_l2"] < 1e-5


def test_tune_config_is_checked_by_field():
    from pydantic import ValidationError

    from graphpress.schema import TvmBackendConfig

    with pytest.raises(ValidationError, match="tune\n.*cpu is 'generic', not 'host'"):
        TvmBackendConfig(target="tvm", cpu="generic", tune={})
    with pytest.raises(ValidationError, match="tune.lengths\n.*lengths repeat"):
        TvmBackendConfig(target="tvm", tune={"lengths": [8, 8]})
    with pytest.raises(ValidationError, match="tune.trial\n.*Extra inputs"):
        TvmBackendConfig(target="tvm", tune={"trial": 8})
    assert TvmBackendConfig(target="tvm", tune={}).tune.trials == 256


def test_resized_inputs_repeat_or_cut_what_shares_the_first_inputs_leading_dims():
    from graphpress.backends.tvm import _resized

    ids, mask, other = torch.arange(6).reshape(2, 3), torch.ones(2, 3), torch.zeros(4)
    big, big_mask, same = _resized((ids, mask, other), 3, 7)
    assert big.tolist() == [[0, 1, 2, 0, 1, 2, 0], [3, 4, 5, 3, 4, 5, 3], [0, 1, 2, 0, 1, 2, 0]]
    assert big_mask.shape == (3, 7) and same is other
    assert _resized((ids,), 1, 2)[0].tolist() == [[0, 1]]


@pytest.mark.slow
def test_tuned_decode_step_of_a_default_config_gpt2(tmp_path):
    """transformers' GPT-2 with its default config (use_cache on): its step's copy shares no Relax variable with
    main (FuseOps refused the module when a variable was defined in both)."""
    from graphpress.ir import capture

    from .families import build

    ids = torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(0))
    graph = capture(build("gpt2"), (ids,), mode="decode")
    record = tune_backend(trials=8).build(graph, [(ids,)], tmp_path)
    assert record.details["tuning"]["specialised"] == {"1x1": "main_b1_t1"}
    assert record.errors["rel_l2"] < 1e-5 and record.details["tuning"]["checked"]["1x1"] < 1e-5
