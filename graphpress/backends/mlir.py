"""MLIR backend: the final Graph as MLIR text in one of torch-mlir's four output dialects.

torch-mlir lowers aten ops only, so every ``graphpress::`` op is first replaced by its
decomposition (the op's reference, written in plain aten arithmetic:
``graphpress.ir.ops.decompositions()``); the compressed tensors stay the module's
constants and the rebuild becomes ordinary tensor code. Before writing, the text is
parsed back and verified in a fresh MLIR context with every dialect registered, and the
decomposed program is run against the graph (the numbers the MLIR encodes, checked in
PyTorch: this backend compiles nothing it could run).

``tosa`` takes static shapes only: its graph is re-exported with the shapes of the first
calibration input (decode graphs: one step after a short prefix), which the record names.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from ..errors import BackendError
from ..fileio import publish_all, staging_dir
from ..ir import Graph, ops
from ..progress import step
from ..schema.backends import MlirBackendConfig
from .base import Backend, BackendRecord, Comparison, tensor_leaves

STATIC_PREFIX = 8
"""Cached tokens before the step a static decode graph (tosa) is specialised to."""


class MlirBackend(Backend):
    target = "mlir"
    Config = MlirBackendConfig
    shape_hint = (
        "decomposing re-traces the graph at the calibration shapes, and a batch of 1 there becomes a constant: "
        "calibrate with a batch of 2 or more, or set static_shapes"
    )

    def build(self, graph: Graph, inputs: list[tuple], out_dir: Path) -> BackendRecord:
        self.require("torch_mlir", "mlir")
        cfg: MlirBackendConfig = self.config
        start = time.perf_counter()
        if graph.cache is not None and any(e.max_len is not None for e in graph.cache):
            raise BackendError(
                f"{self.spec_path}: decode steps with a quantized KV cache (kv_cache_quant) are not lowered to MLIR: "
                "decomposing re-traces the step, and the trace cannot prove the keys' and values' lengths (codes "
                "plus window, related only at run time) equal, nor keep a flush of 0 or 1 tokens symbolic. "
                "Use the onnx or tvm backend for them."
            )
        example = self.static_example(graph, inputs) if cfg.static else None
        try:
            program = decomposed(graph, example)
        except Exception as exc:
            raise BackendError(
                f"{self.spec_path}: decomposing graphpress ops to aten failed: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            comparison = self.validate(
                program, graph, inputs, example
            )  # first: torch-mlir freezes the program in place
        except Exception as exc:
            raise BackendError(
                f"{self.spec_path}: the decomposed program does not run: {type(exc).__name__}: {_first_lines(exc, 2)}"
            ) from exc
        errors = comparison.errors
        if errors["rel_l2"] > cfg.max_error:
            raise BackendError(
                f"{self.spec_path}: the decomposed program differs from the graph: rel_l2 = {errors['rel_l2']:.3g} "
                f"> max_error = {cfg.max_error:g}"
            )
        try:
            with step(f"{self.spec_path} mlir: lowering to {cfg.dialect}"):
                text = to_mlir(program, cfg.dialect)
        except Exception as exc:
            raise BackendError(
                f"{self.spec_path}: torch-mlir could not lower the graph to {cfg.dialect!r}: "
                f"{type(exc).__name__}: {_first_lines(exc)}"
            ) from exc
        try:
            histogram = parse_and_verify(text, cfg.dialect)
        except Exception as exc:
            raise BackendError(f"{self.spec_path}: the {cfg.dialect} MLIR does not parse back: {exc}") from exc
        if "torch.operator" in histogram:
            raise BackendError(
                f"{self.spec_path}: torch-mlir left {histogram['torch.operator']} op(s) it has no lowering for"
            )
        with staging_dir(out_dir) as tmp:
            staged = tmp / cfg.output_file
            staged.write_text(text)
            files = {staged.name: staged.stat().st_size}
            publish_all(tmp, out_dir)
        return BackendRecord(
            target=self.target,
            artifact=str(out_dir / cfg.output_file),
            files=files,
            errors=errors,
            tolerance=cfg.max_error,
            op_histogram=dict(histogram.most_common()),
            seconds=time.perf_counter() - start,
            details={
                "dialect": cfg.dialect,
                "static_shapes": [list(t.shape) for t in tensor_leaves(example)] if example else None,
            },
            latency=comparison.latency,
        )

    def static_example(self, graph: Graph, inputs: list[tuple]) -> tuple:
        """Arguments a static module is specialised to and validated on: the first calibration
        input; for decode graphs, the step after its first tokens, with the cache eager built."""
        if graph.cache is None:
            return tuple(inputs[0])
        from ..runtime import TorchDecoder, positions

        ids = inputs[0][0]
        prefix = max(1, min(STATIC_PREFIX, ids.shape[1] - 1))
        decoder, cache = TorchDecoder(graph), graph.cache.empty(ids.shape[0])
        ones = torch.ones(ids.shape[0], prefix + 1, dtype=torch.long)
        for t in range(prefix):
            _, cache = decoder.step(ids[:, t : t + 1], ones[:, : t + 1], positions(ids.shape[0], t), cache)
        return ids[:, prefix : prefix + 1], ones, positions(ids.shape[0], prefix), cache

    def validate(self, program: ExportedProgram, graph: Graph, inputs: list[tuple], example) -> Comparison:
        """The decomposed program against the graph: on the calibration inputs (decode graphs:
        teacher-forced), or for a static program on the example it was specialised to."""
        from ..metrics import compare_outputs
        from ..runtime import TorchDecoder

        module = program.module()
        if example is None:
            decoder = lambda: TorchDecoder(Graph(program, graph.cache))  # noqa: E731
            return self.compare_with_eager(graph, inputs, lambda tensors: tensor_leaves(module(*tensors)), decoder)
        with torch.no_grad():
            ours, ref = (tensor_leaves(m(*example)) for m in (module, graph.module()))
        return Comparison(compare_outputs([ours], [ref]))


def decomposed(graph: Graph, example: tuple | None = None) -> ExportedProgram:
    """The graph with every graphpress op replaced by aten ops; re-exported at ``example``'s
    shapes when given (static), else keeping the graph's symbolic dimensions."""
    if example is not None:
        program = torch.export.export(graph.module(), example, strict=False)
    else:
        program = graph.clone().program
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table

    # one pass with torch-mlir's own table too: it re-traces, and a second trace would
    # evaluate the first's shape guards on the placeholders' hints
    program = program.run_decompositions({**get_decomposition_table(), **ops.decompositions()})
    # The re-trace's shape guards restate its example sizes (a decode cache length "!= 1"); the
    # MLIR carries no guards, and validation runs lengths 0, 1, 2, ... and compares the numbers.
    program._guards_code = []
    _make_buffers_persistent(program)
    return program


def _make_buffers_persistent(program: ExportedProgram) -> None:
    """torch-mlir looks every buffer up in the state dict; non-persistent ones live in
    ``constants`` (RoPE's inv_freq): move them across, values unchanged."""
    for spec in program.graph_signature.input_specs:
        if spec.kind == InputKind.BUFFER and not spec.persistent:
            spec.persistent = True
            program.state_dict[spec.target] = program.constants.pop(spec.target)


def to_mlir(program: ExportedProgram, dialect: str) -> str:
    from torch_mlir import fx

    module = fx.export_and_import(program, output_type=dialect, decomposition_table={})  # see decomposed()
    return module.operation.get_asm(enable_debug_info=False)


def parse_and_verify(text: str, dialect: str) -> Counter[str]:
    """Parse and verify ``text`` in a fresh MLIR context; how many of each op it holds.

    No one registry knows every dialect the outputs use: ``torch-mlir-opt`` has torch-mlir's
    own (torch, tm_tensor: linalg output scatters through it) but not ``shape``, which
    StableHLO output uses; the Python bindings have every upstream dialect and StableHLO but
    not tm_tensor. Each output is checked by the one that knows all of its dialects.
    """
    ops = _python_parse(text) if dialect == "stablehlo" else _opt_parse(text)
    return Counter({name: count for name, count in ops.items() if name not in _STRUCTURE})


_STRUCTURE = {"builtin.module", "func.func", "func.return"}


def _opt_parse(text: str) -> Counter[str]:
    import torch_mlir._mlir_libs

    opt = Path(torch_mlir._mlir_libs.__file__).parent / "torch-mlir-opt"
    run = subprocess.run(
        [str(opt), "-", "-o", os.devnull, "--print-op-stats"], input=text, capture_output=True, text=True
    )
    if run.returncode != 0:
        raise BackendError(_first_lines(run.stderr))
    stats = [line.rsplit(",", 1) for line in run.stderr.splitlines() if line.count(",") == 1]
    return Counter({name.strip(): int(count) for name, count in stats})


def _python_parse(text: str) -> Counter[str]:
    from torch_mlir import ir
    from torch_mlir._mlir_libs import _stablehlo
    from torch_mlir.dialects import torch as torch_dialect

    names: Counter[str] = Counter()

    def visit(op):
        names[op.name] += 1
        return ir.WalkResult.ADVANCE

    with ir.Context() as context:
        torch_dialect.register_dialect(context)
        _stablehlo.register_dialect(context)
        module = ir.Module.parse(text)
        if not module.operation.verify():
            raise BackendError("the module does not verify")
        module.operation.walk(visit)
    return names


def _first_lines(message: BaseException | str, count: int = 6) -> str:
    lines = [line for line in str(message).splitlines() if line.strip()]
    return " | ".join(lines[:count])
