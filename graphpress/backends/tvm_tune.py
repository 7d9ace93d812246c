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

MetaSchedule needs static shapes (a symbolic matmul fails in its schedule rules): the backend's
``tune`` field adds copies of ``main`` specialised at the (batch, tokens) a user runs
(:func:`specialise`) and the runtime calls a copy where its input has that shape; the dynamic
``main`` keeps TVM's default schedules. Its measurements are timings, so two tunings may choose
different schedules: the database (JSON, beside the artifact) is what makes a rebuild
reproducible, and a task it already holds is not tuned again.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tvm
from tvm import relax
from tvm import tirx as tir
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.arg_info import ArgInfo
from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, PyRunner, RunnerInput
from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture
from tvm.s_tir.meta_schedule.runner.local_runner import _worker_func as measure
from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

from ..progress import note
from ..runtime import unpinned_tvm_threads

SCHEDULED = "tirx.is_scheduled"
"""The PrimFunc attribute of a kernel scheduled by hand (graphpress's TIR kernels, BLAS calls): not a task."""


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
    return with_cores(tvm.target.Target({"kind": "llvm", "mcpu": cpu}), cores)


def with_cores(target: tvm.target.Target, cores: int | None = None) -> tvm.target.Target:
    """``target`` with the ``num-cores`` MetaSchedule requires (default: this machine's)."""
    return tvm.target.Target({**target.export(), "num-cores": cores or os.cpu_count() or 1})


def tunable(func: tir.PrimFunc) -> bool:
    """A task MetaSchedule can and should schedule: static shapes (its rules fail on symbolic ones), not
    :data:`SCHEDULED` by hand, not a reshape (the VM runs those as views of their input)."""
    static = all(isinstance(d, tir.IntImm) for param in func.params for d in getattr(param, "shape", ()))
    return static and not func.attrs.get(SCHEDULED, False) and not relax.analysis.has_reshape_pattern(func)


def specialise(mod: tvm.IRModule, sizes: Sequence[tuple[int, int]]) -> tuple[tvm.IRModule, dict[str, str]]:
    """``mod`` with one copy of ``main`` per (batch, tokens): its first input's leading symbolic dimensions
    bound to them (a static dimension must equal its size); returns the module and ``"BxT" -> function``.
    A static ``main`` needs no copy: it is tuned as it is."""
    main = mod["main"]
    shape = main.params[0].ty.shape.values[:2] if main.params else []
    symbolic = [d for d in shape if isinstance(d, tir.Var)]
    if not symbolic:
        return mod, {}
    functions, names = dict(mod.functions_items()), {}
    for batch, tokens in sizes:
        copy = relax.utils.copy_with_new_vars(main)  # a Relax variable may be defined in one function only
        leading = copy.params[0].ty.shape.values[:2]  # its own symbolic variables, renewed with the rest
        bound = {d: size for d, size in zip(leading, (batch, tokens)) if isinstance(d, tir.Var)}
        clash = [
            f"dimension {i} is {int(d)}, not {size}"
            for i, (d, size) in enumerate(zip(shape, (batch, tokens)))
            if isinstance(d, tir.IntImm) and int(d) != size
        ]
        if clash:
            raise ValueError(f"main's first input is static where tune asks for another size: {', '.join(clash)}")
        name = f"main_b{batch}_t{tokens}"
        functions[tvm.ir.GlobalVar(name)] = copy.bind_symbolic_vars(bound).with_attr("global_symbol", name)
        names[f"{batch}x{tokens}"] = name
    return tvm.IRModule(functions, attrs=mod.attrs), names


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
                costs = measure(
                    _alloc_arguments, None, None, self.config, 1, str(item.artifact_path), str(item.device_type), args
                )
                futures.append(LocalRunnerFuture(res=costs))
            except Exception as exc:  # noqa: BLE001 - a candidate that fails to run is discarded
                futures.append(LocalRunnerFuture(error_message=f"{type(exc).__name__}: {exc}"))
        return futures


@derived_object
class _Progress(PyMeasureCallback):
    """A progress line per measured batch: trials so far and the task's best latency."""

    def __init__(self, trials: int) -> None:
        super().__init__()
        self.trials, self.done, self.best = trials, 0, {}

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        self.done += len(runner_results)
        name = task_scheduler.tasks_[task_id].ctx.task_name
        costs = [_mean(r.run_secs) for r in runner_results if r.run_secs]
        if costs:
            self.best[name] = min(self.best.get(name, float("inf")), min(costs))
        best = f"{self.best[name] * 1e6:.1f} us" if name in self.best else "no candidate ran"
        note(f"tune: {self.done}/{self.trials} trials, {name}: best {best}")


def _alloc_arguments(device, args_info, alloc_repeat: int):
    """MetaSchedule's argument filling, integers as zeros: random ones are out-of-range indices (an embedding's
    ``take``, a LUT's codes), and a gather through them reads outside its table (it crashed the process)."""
    random = tvm.get_global_func("tvm.contrib.random.random_fill_for_measure")

    def fill(tensor) -> None:
        if str(tensor.dtype).startswith(("int", "uint", "bool")):
            tensor.copyfrom(np.zeros(tuple(tensor.shape), dtype=str(tensor.dtype)))
        else:
            random(tensor)

    return alloc_argument_common(fill, device, args_info, alloc_repeat)


@dataclass
class Tuning:
    """The database and what this call did: tasks tuned now, tasks whose records it already held, tasks the
    budget left without a measured candidate, each task's best latency and its default schedule's (seconds,
    measured alike), and ``kept``: the records that beat the default (``applied``), which :func:`compile_tuned`
    applies."""

    database: ms.database.Database
    tuned: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    unmeasured: list[str] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=dict)
    default: dict[str, float] = field(default_factory=dict)
    applied: list[str] = field(default_factory=list)
    kept: ms.database.Database = field(default_factory=lambda: ms.database.MemoryDatabase())


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
    """Tune the :func:`tunable` TIR functions of a Relax module (legalized and fused here, as the compiler will;
    those whose task name contains one of ``ops``, all when None) with ``trials`` trials in all, recording into
    the JSON database in ``database_dir``. Tasks the database already holds a record for are reused, not tuned."""
    load_tensor_intrinsics()
    unpinned_tvm_threads()  # measured as the library will run
    database_dir.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(work_dir=str(database_dir))
    tasks = [
        t
        for t in ms.relax_integration.extract_tasks(fused(mod, target), target)
        if tunable(t.dispatched[0]["main"]) and (ops is None or any(op in t.task_name for op in ops))
    ]
    todo = [t for t in tasks if database.query_tuning_record(t.dispatched[0], target, t.task_name) is None]
    tuning = Tuning(database, reused=[t.task_name for t in tasks if t not in todo])
    if todo:
        progress = _Progress(trials)
        with tempfile.TemporaryDirectory(prefix="graphpress-tune-") as logs, _quiet(logs):
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                todo, logs, strategy=strategy, seed=seed
            )
            ms.tune_tasks(
                tasks=contexts,
                task_weights=weights,
                work_dir=logs,
                max_trials_global=trials,
                num_trials_per_iter=max(1, min(64, trials // len(todo))),  # every task a share at first
                builder=InProcessBuilder(),
                runner=InProcessRunner(),
                database=database,
                cost_model=cost_model,
                measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"), progress],
            )
    for t in tasks:
        record = database.query_tuning_record(t.dispatched[0], target, t.task_name)
        if record is None or not record.run_secs:
            continue
        tuning.best[t.task_name] = _mean(record.run_secs)
        default = _default_latency(t.dispatched[0], target)
        if default is not None:
            tuning.default[t.task_name] = default
        if default is None or tuning.best[t.task_name] < default:
            tuning.kept.commit_workload(t.dispatched[0])
            tuning.kept.commit_tuning_record(record)
            tuning.applied.append(t.task_name)
    for t in todo:
        (tuning.tuned if t.task_name in tuning.best else tuning.unmeasured).append(t.task_name)
    return tuning


def _mean(seconds) -> float:
    return sum(map(float, seconds)) / len(seconds)


def _default_latency(mod: tvm.IRModule, target: tvm.target.Target) -> float | None:
    """A task's latency with TVM's default schedule (its loops as written), built and timed as candidates are.
    MetaSchedule's CPU rules always parallelize, so a tiny kernel's best candidate can lose to it: a decoding
    step's 256-wide add took 8 us tuned (waking the thread pool), well under 1 us as written."""
    (built,) = InProcessBuilder().build([BuilderInput(mod, target)])
    if built.error_msg is not None:
        return None
    try:
        runner_input = RunnerInput(built.artifact_path, "cpu", ArgInfo.from_prim_func(mod["main"]))
        (future,) = InProcessRunner().run([runner_input])
        result = future.result()
    finally:
        Path(built.artifact_path).unlink(missing_ok=True)
    return _mean(result.run_secs) if result.run_secs else None


@contextlib.contextmanager
def _quiet(logs: str) -> Iterator[None]:
    """MetaSchedule's logging for one tuning: its per-task INFO/DEBUG lines (hundreds) kept off the console
    (warnings pass), its log files in ``logs`` closed afterwards, and its logger as it was (MetaSchedule rebuilds
    the logger's configuration from the handlers it finds, and fails on one without a name: pytest's, say)."""
    name = "tvm.s_tir.meta_schedule"
    logger = logging.getLogger(name)
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers = []
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for child in [logger, *(lg for key, lg in logging.Logger.manager.loggerDict.items() if key.startswith(name))]:
            for handler in getattr(child, "handlers", [])[:]:
                if isinstance(handler, logging.FileHandler) and handler.baseFilename.startswith(logs):
                    handler.close()
                    child.removeHandler(handler)
        logger.handlers, logger.propagate = saved[0], saved[2]
        logger.setLevel(saved[1])


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


def compile_tuned(database: ms.database.Database, mod: tvm.IRModule, target: tvm.target.Target):
    """The Relax executable with every function the database holds a schedule for scheduled by it (a tuning's
    ``kept``: the schedules that beat the default); the module prepared as :func:`fused`, then TVM's CPU
    pipeline; ``target`` with ``num-cores``, as tuned."""
    with target, database, tvm.transform.PassContext(opt_level=3):
        mod = relax.transform.MetaScheduleApplyDatabase()(fused(mod, target))
    return tvm.compile(mod, target=target)
