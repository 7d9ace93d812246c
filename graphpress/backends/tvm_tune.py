"""MetaSchedule tuning for the TVM backend, built and measured in this process.

What makes MetaSchedule run with apache-tvm 0.27.0.post1 (issue 25):

- apache-tvm-ffi 0.1.14.post1, pinned in the ``tvm`` extra: 0.1.15.x segfaults in
  ``tvm::ffi::ToJSONGraph`` (any ``tvm.ir.save_json``), which every ``TuneContext`` calls;
- a dict target with ``num-cores`` (MetaSchedule requires it; 0.27 rejects the string form),
  its ``mcpu`` the host's, so the schedules tuned here are for this CPU;
- builds and measurements in this process: MetaSchedule's ``LocalBuilder``/``LocalRunner``
  fork worker pools whose builds time out on a 2-core machine;
- TVM's tensor intrinsics (~500 TVMScript functions ``TuneContext`` imports) parsed with an
  ``inspect.stack`` that does not read every frame's source: minutes become seconds.

MetaSchedule needs static shapes (a symbolic matmul fails in its schedule rules), and its
measurements are timings, so two tunings may choose different schedules: the database
(JSON, beside the artifact) is what makes a rebuild reproducible, and a task it already
holds is not tuned again.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export
from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, PyRunner
from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture
from tvm.s_tir.meta_schedule.runner.local_runner import _worker_func as measure


@contextlib.contextmanager
def _frames_without_source() -> Iterator[None]:
    """``inspect.stack()`` as frames only (TVMScript's parser reads their variables, not their source lines)."""

    def stack(context: int = 1) -> list[inspect.FrameInfo]:
        frame, frames = sys._getframe(1), []
        while frame is not None:
            code = frame.f_code
            frames.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, None, None))
            frame = frame.f_back
        return frames

    original, inspect.stack = inspect.stack, stack
    try:
        yield
    finally:
        inspect.stack = original


def load_tensor_intrinsics() -> None:
    """Import what ``TuneContext`` imports, once, quickly (see the module's docstring)."""
    if "tvm.s_tir.tensor_intrin" not in sys.modules:
        with _frames_without_source():
            import tvm.s_tir.tensor_intrin  # noqa: F401


def host_target(cores: int | None = None) -> tvm.target.Target:
    """LLVM for this CPU with the core count MetaSchedule schedules for."""
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    return tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": cores or os.cpu_count() or 1})


@derived_object
class InProcessBuilder(PyBuilder):
    """Compiles each candidate here; a failed build is the candidate's error, not the run's."""

    def build(self, build_inputs):
        results = []
        for item in build_inputs:
            try:
                results.append(BuilderResult(default_export(default_build(item.mod, item.target, None)), None))
            except Exception as exc:  # noqa: BLE001 - MetaSchedule records it and moves on
                results.append(BuilderResult(None, f"{type(exc).__name__}: {exc}"))
        return results


@derived_object
class InProcessRunner(PyRunner):
    """Times each built candidate here, with MetaSchedule's own argument filling and evaluator."""

    def __init__(self, number: int = 3, repeat: int = 1) -> None:
        super().__init__()
        self.config = EvaluatorConfig(number=number, repeat=repeat, min_repeat_ms=0, enable_cpu_cache_flush=False)

    def run(self, runner_inputs):
        futures = []
        for item in runner_inputs:
            args = tuple(arg.as_json() for arg in item.args_info)
            try:
                costs = measure(None, None, None, self.config, 1, str(item.artifact_path), str(item.device_type), args)
                futures.append(LocalRunnerFuture(res=costs))
            except Exception as exc:  # noqa: BLE001 - a candidate that fails to run is discarded
                futures.append(LocalRunnerFuture(error_message=f"{type(exc).__name__}: {exc}"))
        return futures


@dataclass
class Tuning:
    """The database and what this call did: tasks tuned now, tasks whose records it already held."""

    database: ms.database.Database
    tuned: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)


def tune(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    database_dir: Path,
    trials: int,
    ops: Sequence[str] | None = None,
    seed: int = 0,
    strategy: str = "evolutionary",
    cost_model: str = "xgb",
) -> Tuning:
    """Tune the TIR functions of a static-shaped Relax module as imported (legalized and fused here, as the
    compiler will; those whose task name contains one of ``ops``, all when None) with ``trials`` trials in all,
    recording into the JSON database in ``database_dir``. Tasks the database already holds a record for are
    reused, not tuned."""
    load_tensor_intrinsics()
    database_dir.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(work_dir=str(database_dir))
    tasks = [
        t
        for t in ms.relax_integration.extract_tasks(fused(mod, target), target)
        if ops is None or any(op in t.task_name for op in ops)
    ]
    todo = [t for t in tasks if database.query_tuning_record(t.dispatched[0], target, t.task_name) is None]
    tuning = Tuning(database, [t.task_name for t in todo], [t.task_name for t in tasks if t not in todo])
    if not todo:
        return tuning
    with tempfile.TemporaryDirectory(prefix="graphpress-tune-") as logs:
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            todo, logs, strategy=strategy, seed=seed
        )
        ms.tune_tasks(
            tasks=contexts,
            task_weights=weights,
            work_dir=logs,
            max_trials_global=trials,
            num_trials_per_iter=min(64, trials),
            builder=InProcessBuilder(),
            runner=InProcessRunner(),
            database=database,
            cost_model=cost_model,
        )
    return tuning


def fused(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """The module as ``compile_relax`` prepares it before it looks functions up in the database (legalized, fused):
    tasks extracted from it are keyed as the compiler will ask for them."""
    from tvm import relax
    from tvm.relax import pipeline

    passes = [
        *pipeline.library_dispatch_passes(target),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    return tvm.transform.Sequential(passes)(mod)


def compile_tuned(tuning: Tuning, mod: tvm.IRModule, target: tvm.target.Target):
    """The Relax executable with every function the database holds a schedule for scheduled by it."""
    return ms.relax_integration.compile_relax(tuning.database, mod, target, None)
