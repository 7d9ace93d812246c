"""compress(): load spec -> capture -> calibrate -> passes (verified after each) -> backends -> report."""

from __future__ import annotations

import copy
import inspect
import platform
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import evaluation
from .backends import build_backend
from .backends.base import tensor_leaves
from .calibration import calibration_from_files
from .errors import CaptureError
from .execution import engine
from .fileio import claimed_output, previous_run_files, publish_all, remove_stale, staging_dir, write_manifest
from .ir import Graph, capture
from .ir.decode import STEP_INPUTS
from .ir.shapes import check_shapes
from .journal import Journal, Journaled, run_identity
from .model_source import ModelSource, load_source, stored_weights
from .passes import PassContext, PassManager, Verifier, build_pass
from .progress import Progress, step
from .report import PLOTS_DIR, CompressionReport, write_report
from .schema import Spec, load_spec
from .streaming import JOBS_DIR, in_memory, spill_store, streams


class CompressedModel(torch.nn.Module):
    """The final graph, called as the original model is: positional arguments, or keywords by the names of the
    inputs it was captured with (``result.model(input_ids=ids)``, as transformers users write it)."""

    def __init__(self, graph: Graph):
        super().__init__()
        self.graph = graph
        if not graph.lazy:  # a streamed run's model is read from disk when first called, not here
            self.graph_module = graph.module()
        names = _argument_names(graph)
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        self.signature = inspect.Signature([inspect.Parameter(n, kind) for n in names])

    def forward(self, *args, **kwargs):
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(
                f"the compressed model takes the inputs it was captured with, {self.signature}: {exc} (capture "
                "another input by giving it in example_inputs)"
            ) from None
        if not hasattr(self, "graph_module"):
            self.graph_module = self.graph.module()
        try:
            return self.graph_module(*bound.args)
        except Exception:
            check_shapes(self.graph, tensor_leaves(bound.args))  # a shape capture did not promise: say which
            raise


def _argument_names(graph: Graph) -> list[str]:
    """The names of the graph's positional arguments: the decode step's, or the captured forward's (an argument
    that is not one tensor, e.g. a list, is named by its position)."""
    if graph.cache is not None:
        return [*STEP_INPUTS, "cache"]
    leaves = iter(node.name for node in graph.user_inputs())
    names = []
    for i, spec in enumerate(graph.program.call_spec.in_spec.child(0).children()):
        taken = [next(leaves) for _ in range(spec.num_leaves)]
        names.append(taken[0] if spec.is_leaf() else f"args_{i}")
    return names


@dataclass
class CompressionResult:
    model: torch.nn.Module
    """The compressed model, runnable in eager PyTorch and called as the original is (a :class:`CompressedModel`:
    positional or keyword arguments)."""
    graph: Graph
    report: CompressionReport
    artifacts: dict[str, Path] = field(default_factory=dict)
    """Written files: the first backend of each target under its target ("onnx", "tvm", "mlir", "cuda"),
    a later one of the same target under its spec path ("backends[3]"); "report_json", "report_md",
    "report_html", and each figure as "plot:<name>.png"."""
    out_dir: Path | None = None


def compress(
    model: torch.nn.Module | str | Path,
    spec: Spec | dict | str | Path,
    example_inputs: tuple | None = None,
    *,
    calibration_data: Iterable | None = None,
    out_dir: str | Path | None = None,
    progress: bool | None = None,
) -> CompressionResult:
    """Compress ``model`` as ``spec`` says; never modifies ``model``.

    ``model`` is an nn.Module, a model directory or 'module:factory'. Calibration data
    comes from ``calibration_data`` (tuples of positional inputs), else from the model
    directory's ``calibration_batches``, else the example inputs alone. Artifacts and
    the report go to ``out_dir`` (a new temporary directory if not given). ``progress``
    shows bars on stderr for the long steps; ``None`` shows them when stderr is a terminal.
    """
    with Progress(progress).activate():
        return _compress(model, spec, example_inputs, calibration_data, out_dir)


def _compress(model, spec, example_inputs, calibration_data, out_dir) -> CompressionResult:
    spec = load_spec(spec)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="graphpress-"))
    with claimed_output(out):  # checked and locked before any work
        return _run(model, spec, example_inputs, calibration_data, out)


def _run(model, spec: Spec, example_inputs, calibration_data, out: Path) -> CompressionResult:
    stream = streams(spec, model)
    with spill_store(out, stream) as spill:
        return _pipeline(model, spec, example_inputs, calibration_data, out, stream, spill)


def _pipeline(model, spec: Spec, example_inputs, calibration_data, out: Path, stream: bool, spill) -> CompressionResult:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    dtype = None if spec.capture.dtype == "model" else getattr(torch, spec.capture.dtype)
    source = model if isinstance(model, ModelSource) else _source(model, example_inputs, stream, dtype)
    if source.example_inputs is None:
        raise CaptureError("compress() needs example_inputs for an nn.Module (a tuple of positional inputs)")
    calibration, verification, calibration_source, verified_on, warnings = _calibration(source, spec, calibration_data)
    evaluation_tokens = evaluation.prepare(spec.evaluate, source.tokenize) if spec.evaluate else None

    t = time.perf_counter()
    n = len(calibration)
    model, example_inputs, both = _in_dtype(
        spec.capture.dtype, source.model, source.example_inputs, calibration + verification
    )
    calibration, verification = both[:n], both[n:]
    with step(f"capturing {source.name} ({spec.capture.mode}) with torch.export"):
        tokens = 1 if spec.capture.step_tokens == 1 else None
        original = capture(
            model,
            example_inputs,
            mode=spec.capture.mode,
            dynamic=spec.capture.dynamic,
            step_tokens=tokens,
            stored=stored_weights(source),
        )
    original.spill = spill
    timings["capture"] = time.perf_counter() - t
    if spec.evaluate:
        evaluation.check(original, _argument_names(original), model, evaluation_tokens)
    if original.cache is not None and original.cache.step_tokens == 1 and tokens is None:
        warnings.append(
            f"capture.step_tokens: {type(model).__name__}'s attention pins the query length under torch.export "
            "(an eager kernel branching on it), so the decode step takes one token: prompts run token by token. "
            'Load the model with attn_implementation="sdpa" for one graph that takes a prompt in one call'
        )

    t = time.perf_counter()
    verifier = Verifier(spec.verify, original, verification)
    pipeline = PassManager([build_pass(p) for p in spec.passes], verifier)
    journal = None
    if spill is not None:  # a long run: its finished jobs are kept, so an interrupted run resumes from them
        journal = Journal(spill.path.parent / JOBS_DIR, run_identity(spec, source.directory, calibration))
    with engine(spec.execution) as runner:
        jobs = runner if journal is None else Journaled(runner, journal)
        ctx = PassContext(calibration, spec.calibration.seed, engine=jobs, reference=original, tokenize=source.tokenize)
        result = pipeline.run(original, ctx)
    timings["passes"] = time.perf_counter() - t

    with staging_dir(out) as stage:  # the run's files appear together at the end, or not at all
        artifacts: dict[str, Path] = {}
        records, backends = [], []
        t = time.perf_counter()
        whole = None  # the streamed graph read into memory, for the backends that build from the whole model
        for i, backend_config in enumerate(spec.backends):
            backend = build_backend(backend_config, f"backends[{i}]")
            backend.source = source
            backend.published_dir = out
            deployed = result.graph
            if deployed.lazy and not backend.streams(deployed):
                whole = whole or in_memory(deployed, f"backends[{i}] ({backend.target})")
                deployed = whole
            record = backend.build(deployed, calibration, stage)
            record.artifact = str(out / Path(record.artifact).relative_to(stage))
            artifacts[record.target if record.target not in artifacts else f"backends[{i}]"] = Path(record.artifact)
            record.details["validated_shapes"] = backend.validated_shapes
            record.warnings += backend.shape_warnings
            records.append(record.to_dict())
            backends.append(backend)
        timings["backends"] = time.perf_counter() - t
        scores = {}
        if spec.evaluate:
            t = time.perf_counter()
            scores, failed = evaluation.evaluate(
                spec.evaluate, evaluation_tokens, source.tokenize, model, original, result.graph, backends, records
            )
            warnings += failed
            timings["evaluate"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - start
        report = _report(source, spec, original, result, records, calibration, calibration_source, timings, warnings)
        report.evaluation = scores
        if journal is not None:
            report.capture["resumed_jobs"] = journal.resumed
        report.calibration["verification"] = {"samples": len(verification), "source": verified_on}
        with step("writing the report"):
            written = {name: out / p.relative_to(stage) for name, p in write_report(report, stage).items()}
        files = [*(out / p.relative_to(stage) for p in stage.rglob("*") if p.is_file())]
        manifest = write_manifest(out, stage, files)
        previous = previous_run_files(out)
        publish_all(stage, out, last=[*artifacts.values(), *written.values(), manifest], mirror=[PLOTS_DIR])
        remove_stale(out, previous, {*files, manifest})
    if journal is not None:
        journal.close()
    artifacts.update(written)
    return CompressionResult(CompressedModel(result.graph), result.graph, report, artifacts, out)


def _report(source, spec, original, result, records, calibration, calibration_source, timings, warnings):
    return CompressionReport(
        model=source.name,
        spec=spec.model_dump(mode="json", by_alias=True),
        original=original.summary().to_dict(),
        compressed=result.graph.summary().to_dict(),
        passes=[r.to_dict() for r in result.report.children],
        backends=records,
        calibration={"samples": len(calibration), "source": calibration_source, "seed": spec.calibration.seed},
        capture={
            "mode": spec.capture.mode,
            "dtype": _graph_dtype(original),
            "model_dtype": _stored_dtype(source.weights) if source.weights is not None else _dtype(source.model),
            "inputs": original.input_ranges(),
            "streamed": original.spill is not None,
        },
        timings={k: round(v, 3) for k, v in timings.items()},
        environment={"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()},
        warnings=warnings
        + [w for r in result.report.children for w in r.warnings]
        + [w for r in records for w in r.get("warnings", [])],
    )


def _in_dtype(dtype: str, model: torch.nn.Module, example_inputs: tuple, calibration: list[tuple]):
    """The model and its floating-point inputs in ``dtype`` (a converted copy; 'model': as they are)."""
    target = getattr(torch, dtype, None)
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtype == "model" or floats == {target}:
        return model, example_inputs, calibration

    def cast(inputs: tuple) -> tuple:
        return tuple(x.to(target) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)

    with step(f"converting a copy of the model to {dtype}"):
        converted = copy.deepcopy(model).to(target)
    return converted, cast(example_inputs), [cast(b) for b in calibration]


def _graph_dtype(graph: Graph) -> str:
    """The floating-point dtype the graph's parameters are stored in (read from their stand-ins, not their data)."""
    return _dtype_names(graph.stored(n).dtype for n in graph.program.graph_signature.parameters)


def _stored_dtype(weights) -> str:
    """The floating-point dtype a streamed checkpoint is stored in (its model may be read in another)."""
    return _dtype_names(s.dtype for s in weights.entries.values())


def _dtype(model: torch.nn.Module) -> str:
    """The floating-point dtype the model's parameters are stored in (the one the passes store in)."""
    return _dtype_names(p.dtype for p in model.parameters())


def _dtype_names(dtypes) -> str:
    """The floating-point ones among ``dtypes``, named and joined ('bfloat16', 'float16/float32'; 'none')."""
    names = {str(d).removeprefix("torch.") for d in dtypes if d.is_floating_point}
    return "/".join(sorted(names)) or "none"


def _source(model, example_inputs, stream: bool, dtype: torch.dtype | None) -> ModelSource:
    """A streamed checkpoint is opened in the capture dtype (each tensor converted as read); others are converted
    after loading, by :func:`_in_dtype`."""
    if isinstance(model, torch.nn.Module):
        source = ModelSource(model, name=type(model).__name__)
    else:
        source = load_source(model, lazy=stream, dtype=dtype if stream else None)
    if example_inputs is not None:
        source.example_inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    return source


def _calibration(source: ModelSource, spec: Spec, data: Iterable | None):
    """(calibration batches, verification batches, where each came from, warnings). Verification is on inputs
    the passes were not fitted to unless ``verify.data`` says 'calibration' (see VerifyConfig.data)."""
    cfg, held_out = spec.calibration, spec.verify.samples if spec.verify.data == "held_out" else 0
    same = "the calibration data (verify.data)"
    if data is not None:
        batches = [b if isinstance(b, tuple) else (b,) for b in data]
        kept = min(held_out, len(batches) // 2)
        if kept:
            n = len(batches)
            return batches[:-kept], batches[-kept:], "user data", f"held out: the last {kept} of {n} batches given", []
        if held_out:
            why = "the calibration data itself: one batch given, none to hold out (give more to verify on new ones)"
            return batches, batches, "user data", why, [f"verify: {why}"]
        return batches, batches, "user data", same, []
    files = calibration_from_files(cfg, source.tokenize, held_out)
    if files is not None:
        batches, others = files
        if not held_out:
            return batches, batches, cfg.text or cfg.tokens, same, []
        if others:
            return (
                batches,
                others,
                cfg.text or cfg.tokens,
                f"{len(others)} windows sharing no token with calibration's",
                [],
            )
        why = "the calibration data itself: the file has no window the calibration windows do not touch"
        return batches, batches, cfg.text or cfg.tokens, why, [f"verify: {why}"]
    if source.calibration_batches is not None:
        batches = source.calibration_batches(cfg.samples, cfg.seq_len, cfg.seed)
        if not held_out:
            return batches, batches, "model directory", same, []
        others = source.calibration_batches(held_out, cfg.seq_len, cfg.seed + 1)
        return batches, others, "model directory", "other windows of the model directory's data (seed + 1)", []
    warning = "no calibration data given: calibrating on the example inputs alone"
    if not held_out:
        return [source.example_inputs], [source.example_inputs], "example inputs", same, [warning]
    others = [random_like(source.example_inputs, cfg.seed + 1 + i) for i in range(held_out)]
    return [source.example_inputs], others, "example inputs", "random inputs shaped like the example inputs", [warning]


def random_like(inputs: tuple, seed: int) -> tuple:
    """Inputs of the example's shapes and dtypes, drawn with ``seed``: integer tensors uniformly within the
    example's own range (token ids; an all-ones mask or all-zero token types stay so), floating ones with the
    example's mean and spread; anything else as given."""
    gen = torch.Generator().manual_seed(seed)

    def draw(x):
        if not isinstance(x, torch.Tensor) or x.dtype == torch.bool or x.numel() == 0:
            return x
        if not x.is_floating_point():
            low, high = int(x.min()), int(x.max())
            return torch.randint(low, high + 1, x.shape, generator=gen, dtype=x.dtype)
        spread = x.float().std() if x.numel() > 1 else torch.tensor(1.0)
        return (torch.randn(x.shape, generator=gen) * spread + x.float().mean()).to(x.dtype)

    return tuple(draw(x) for x in inputs)
