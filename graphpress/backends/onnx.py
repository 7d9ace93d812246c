"""ONNX backend: ``torch.onnx.export(dynamo=True)`` of the final graph, validated in onnxruntime.

The exported program's symbolic dimensions become named dynamic axes, so the
.onnx file takes any batch and sequence length the captured graph did. With ``ort_contrib_ops``, integer
weights are fused into their linears and lowered to ``MatMulNBits``. Weights
go to an external data file when the model would cross protobuf's 2 GB limit
(or when the spec asks).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..errors import BackendError, first_line
from ..fileio import publish_all, staging_dir
from ..ir import Graph, ops
from ..ir.decode import STEP_INPUTS
from ..ir.ops.fused import FUSED
from ..ir.ops.int_weight import PACKED_TYPES, matmul_nbits_runs
from ..progress import step
from ..schema import OnnxBackendConfig
from . import onnx_genai
from .base import Backend, BackendRecord, Comparison
from .fuse_gqa import fuse_group_query_attention
from .fuse_linear import fuse_format_linears
from .fuse_norm import fuse_rms_norms
from .latent_kv import latent_as_key_value
from .onnx_pieces import Pieces
from .onnx_store import LARGE, fold_stored, holds_large_constant, nbytes, read_lazily, with_placeholders

INT_WEIGHT = torch.ops.graphpress.int_weight.default

STREAMED_PIECE_MB = 256  # a streamed run's model is validated in pieces of this many MiB of weights
EXTERNAL_ABOVE = 64 * 2**20  # onnxruntime maps external weights; inline ones it holds twice at load
GENAI_TOKENS = 16  # greedy tokens onnxruntime-genai must agree on


@contextlib.contextmanager
def _quiet_exporter_logs():
    """The exporter logs a warning per optional torchvision op it cannot register, and its copy of the program
    warns that torch's own pytree code uses a deprecated ``LeafSpec`` check: noise for our users (it printed
    into their progress bars on every run)."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


class OnnxBackend(Backend):
    target = "onnx"
    Config = OnnxBackendConfig

    def streams(self, graph: Graph) -> bool:
        """A forward graph's initializers are written from the store one at a time (:mod:`.onnx_store`)."""
        return graph.cache is None and self.config.runtime == "onnxruntime"

    def build(self, graph: Graph, inputs: list[tuple], out_dir: Path) -> BackendRecord:
        import onnx

        cfg: OnnxBackendConfig = self.config
        start = time.perf_counter()
        external = cfg.external_data == "always" or (
            cfg.external_data == "auto" and graph.summary().bytes >= EXTERNAL_ABOVE
        )
        genai = cfg.runtime == "onnxruntime-genai"
        reference, not_lowered, latent = graph, [], 0
        if genai and graph.cache is not None:
            graph, latent, not_lowered = latent_as_key_value(graph)
        if genai:
            onnx_genai.check(graph, self.spec_path, tuple(not_lowered))
        if cfg.validation_piece_mb is not None and graph.cache is not None:
            raise BackendError(
                f"{self.spec_path}.validation_piece_mb: a decode graph is validated step by step in one session; "
                "pieces are for forward graphs"
            )
        fused: Counter[str] = Counter()
        contrib = cfg.ort_contrib_ops or genai  # onnxruntime-genai is onnxruntime: MatMulNBits as stored
        if contrib:
            graph, fused = fuse_format_linears(graph, _runs_packed)
            graph, norms = fuse_rms_norms(graph)
            fused.update(norms)
        if genai:
            positions = onnx_genai.context_length(self.source)  # unknown: RoPE stays ahead of the op
            graph, attention, notes = fuse_group_query_attention(graph, positions)
            fused.update(attention)
            not_lowered += notes
        with staging_dir(out_dir) as tmp:
            staged = tmp / cfg.filename
            try:
                with (
                    step(f"{self.spec_path} onnx: exporting"),
                    contextlib.redirect_stdout(io.StringIO()),
                    _quiet_exporter_logs(),
                ):
                    exported, lazies = with_placeholders(graph) if graph.lazy else (graph, {})
                    exported.forget_pending_symbols()
                    program = torch.onnx.export(
                        exported.program,
                        dynamo=True,
                        opset_version=cfg.opset,
                        verbose=False,
                        custom_translation_table=ops.onnx_translations(cfg.opset, cfg.matmul_accuracy_level),
                        optimize=False,
                    )
                    read_lazily(program.model, lazies)
                    _optimize(program.model)
                    if not cfg.node_metadata:
                        _strip_node_metadata(program.model)
                if graph.cache is not None:
                    _name_decode_io(program.model, graph.cache)
                else:
                    _name_forward_io(program.model, graph)
                program.save(str(staged), external_data=external)
            except Exception as exc:
                raise BackendError(f"{self.spec_path}: torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
            try:
                comparison = self.validate(staged, reference, inputs)
            except Exception as exc:
                half = _half_precision(graph)
                if "NOT_IMPLEMENTED" in str(exc) and half:
                    raise BackendError(
                        f"{self.spec_path}: onnxruntime (CPU) cannot run this {half} model: "
                        f'{first_line(exc)}. Capture in float32 for it: "capture": {{"dtype": "float32"}}'
                    ) from exc
                raise
            errors = comparison.errors
            if errors["rel_l2"] > cfg.max_error:
                raise BackendError(
                    f"{self.spec_path}: onnxruntime output differs from eager: rel_l2 = {errors['rel_l2']:.3g} "
                    f"> max_error = {cfg.max_error:g}"
                )
            agreement, notes = None, []
            if genai:
                notes = onnx_genai.write(tmp, graph, cfg.filename, self.source)
                notes += [f"{self.spec_path}: {why}" for why in not_lowered]
                agreement = self.run_in_genai(tmp, reference, inputs)
                if agreement is None:
                    notes.append("onnxruntime-genai is not installed: the folder was written, not run")
            model = onnx.load(str(staged), load_external_data=False)
            histogram = Counter(f"{n.domain + '::' if n.domain else ''}{n.op_type}" for n in model.graph.node)
            files = {path.name: path.stat().st_size for path in sorted(tmp.iterdir())}
            # the .onnx last, so it never points at missing external data
            publish_all(tmp, out_dir, last=[out_dir / cfg.filename])
        artifact = out_dir / cfg.filename
        return BackendRecord(
            target=self.target,
            artifact=str(artifact),
            files=files,
            errors=errors,
            tolerance=cfg.max_error,
            op_histogram=dict(histogram.most_common()),
            seconds=time.perf_counter() - start,
            details={
                "opset": cfg.opset,
                "external_data": external,
                **({"contrib_ops": dict(sorted(fused.items()))} if contrib else {}),
                **(
                    {"runtime": cfg.runtime, "latent_as_key_value": latent, "onnxruntime_genai": agreement}
                    if genai
                    else {}
                ),
            },
            latency={**comparison.latency, **({"pieces": self.pieces} if self.pieces else {})},
            warnings=self.unpacked_at_load(graph) + notes,
        )

    def run_in_genai(self, folder: Path, graph: Graph, inputs: list[tuple]) -> dict | None:
        """onnxruntime-genai's greedy tokens on the folder equal those of ``graph``'s eager decode loop, or the
        build fails. With int8 activations (``matmul_accuracy_level`` > 0) the file computes other logits by
        design: agreement is recorded, not required (the output error is still held to ``max_error``)."""
        import importlib.util

        if importlib.util.find_spec("onnxruntime_genai") is None:
            return None
        prompt = inputs[0][0][:1, :8]
        agreement = onnx_genai.greedy_agreement(folder, graph, prompt, GENAI_TOKENS)
        if agreement["agree"] < agreement["generated"] and not self.config.matmul_accuracy_level:
            raise BackendError(
                f"{self.spec_path}: onnxruntime-genai's greedy tokens differ from graphpress's decode loop at "
                f"generated token {agreement['agree']} of {agreement['generated']}"
            )
        return agreement

    def unpacked_at_load(self, graph: Graph) -> list[str]:
        """Stored formats onnxruntime will hold dense: LUT, N:M and shift weights always (no op of its runs them);
        integer weights (already fused ones aside) at opset 18, which has no packed form for them, and 2- and 3-bit
        codes, which have none that onnxruntime keeps packed without ``ort_contrib_ops``."""
        cfg: OnnxBackendConfig = self.config
        formats = [n for n in graph.nodes if n.op == "call_function" and n.target in FUSED]
        others = Counter(n.target.name().removeprefix("graphpress::") for n in formats if n.target is not INT_WEIGHT)
        dense = [
            n.args[3] for n in formats if n.target is INT_WEIGHT and not (cfg.opset >= 21 and n.args[3] in PACKED_TYPES)
        ]
        warnings = []
        if others:
            warnings.append(
                f"{self.spec_path}: {', '.join(f'{k} x{v}' for k, v in sorted(others.items()))}: onnxruntime has no op "
                "that runs these formats packed, and its constant folding rebuilds them into dense weights when the "
                "session loads (the file is smaller, the session is not; a session made with "
                "disabled_optimizers=['ConstantFolding'] keeps them packed and rebuilds them at every run instead)"
            )
        folded = [n for n in formats if n.target is INT_WEIGHT and cfg.opset >= 21 and n.args[3] in PACKED_TYPES]
        if folded and not cfg.ort_contrib_ops:
            warnings.append(
                f"{self.spec_path}: {len(folded)} integer-weight linear(s) are blocked DequantizeLinear + MatMul, which "
                "onnxruntime fuses into MatMulNBits as the session loads, at a transient cost it keeps in the process "
                "(measured: 1.08 GB resident after loading a 2-layer hidden-1024 model, 0.15 GB with MatMulNBits "
                'stored): "ort_contrib_ops": true stores MatMulNBits itself'
            )
        if dense:
            advice = []
            if cfg.opset < 21 and set(dense) & set(PACKED_TYPES):
                advice.append(
                    '"opset": 21 keeps 4- and 8-bit weights packed (a blocked DequantizeLinear onnxruntime fuses '
                    "into MatMulNBits)"
                )
            if 2 in dense and not cfg.ort_contrib_ops:
                advice.append('"ort_contrib_ops": true runs 2-bit weights as MatMulNBits')
            warnings.append(
                f"{self.spec_path}: {len(dense)} integer-weight linear(s) "
                f"({', '.join(sorted({f'{b}-bit' for b in dense}))}) are stored packed in the file but onnxruntime "
                "unpacks them into dense weights when the session loads (more memory than the original at run time)"
                + (": " + "; ".join(advice) if advice else "")
            )
        return warnings

    pieces = 0
    """How many pieces the file was validated in (0: one session)."""

    def validate(self, path: Path, graph: Graph, inputs: list[tuple]) -> Comparison:
        """The file against eager on ``inputs``: a forward graph's in one session, or piece by piece
        (:mod:`.onnx_pieces`) when it is streamed or the spec sets ``validation_piece_mb``."""
        import onnxruntime as ort

        from ..runtime import OnnxDecoder, session_options

        piece_mb = self.config.validation_piece_mb or (STREAMED_PIECE_MB if graph.lazy else None)
        if graph.cache is None and piece_mb is not None:
            pieces = Pieces(path, int(piece_mb * 2**20), self.spec_path)
            self.pieces = len(pieces)
            return self.compare_with_eager(graph, inputs, pieces, lambda: OnnxDecoder(path))
        session = None
        if graph.cache is None:
            session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])

        def run(tensors):
            names = [i.name for i in session.get_inputs()]
            if len(tensors) != len(names):
                raise BackendError(
                    f"{self.spec_path}: the ONNX model takes {len(names)} tensor inputs, got {len(tensors)}"
                )
            feeds = {name: t.detach().cpu().numpy() for name, t in zip(names, tensors)}
            return [torch.from_numpy(np.asarray(o)) for o in session.run(None, feeds)]

        return self.compare_with_eager(graph, inputs, run, lambda: OnnxDecoder(path))


def _runs_packed(weight_op) -> bool:
    """Integer weights in a form ``MatMulNBits`` takes: fused so that they lower to it."""
    return weight_op.target is INT_WEIGHT and matmul_nbits_runs(*weight_op.args[3:5])


def _half_precision(graph: Graph) -> str | None:
    """'bfloat16' / 'float16' when the graph stores tensors in one (onnxruntime's CPU kernels mostly lack them)."""
    for tensor in graph.tensors().values():
        if tensor.dtype in (torch.bfloat16, torch.float16):
            return str(tensor.dtype).removeprefix("torch.")
    return None


def _optimize(model) -> None:
    """The exporter's optimizer, minus folds that expand stored data.

    Constant folding would turn a compressed weight's rebuild (unpack + Gather/Scatter)
    into the dense weight and store that: the file would grow back. Folds whose result is
    no bigger than their constant inputs (a transposed weight, a reshaped shape) still run:
    those of large stored tensors as lazy tensors (:func:`fold_stored`: computed as the file
    is written, one at a time), the small rest in onnxscript's optimizer.
    """
    import onnxscript.optimizer

    quantized, sources = _dequantize_inputs(model.graph)
    derived = _stored_sources(model.graph)
    fold_stored(model, quantized)

    def should_fold(node) -> bool | None:
        if node in quantized:
            return True
        if holds_large_constant(node):
            return False
        sizes = [nbytes(v) for v in node.outputs], [nbytes(v) for v in node.inputs if v is not None]
        if None in sizes[0] or None in sizes[1]:
            return None
        return False if sum(sizes[0]) > max(sum(sizes[1]), LARGE) else None

    onnxscript.optimizer.optimize_ir(model, should_fold=should_fold)
    for (node, i), name in sources.items():  # a folded tensor takes the name of the stored one it replaces
        value = node.inputs[i]
        if value is not None and value.is_initializer() and name not in model.graph.initializers:
            _rename_initializer(model.graph, value, name)
    for value in list(model.graph.initializers.values()):  # a transposed weight: the weight's name
        name = derived.get(value.name)
        if name is not None and name not in model.graph.initializers:
            _rename_initializer(model.graph, value, name)


def _rename_initializer(graph, value, name: str) -> None:
    graph.initializers.pop(value.name)
    value.name = name
    graph.register_initializer(value)


def _stored_sources(graph) -> dict[str, str]:
    """Per value computed from constants only, the one stored tensor it derives from (a weight's transpose:
    ``layers.0.mlp.up_proj.weight``), where there is exactly one; the exporter's own constants (``val_3``)
    do not count. A folded value keeps its name, so this names the initializer folding makes of it."""
    sources: dict[str, set[str]] = {}
    for node in graph:
        found: set[str] = set()
        for value in node.inputs:
            if value is None:
                continue
            if value.is_initializer():
                found |= set() if re.fullmatch(r"val_\d+", value.name) else {value.name}
            elif value.name in sources:
                found |= sources[value.name]
            else:
                break
        else:
            for value in node.outputs:
                sources[value.name] = found
    return {name: next(iter(found)) for name, found in sources.items() if len(found) == 1}


def _dequantize_inputs(graph) -> tuple[set, dict]:
    """The nodes computing a ``DequantizeLinear``'s integer data or zero points: all constant for an integer
    weight (the codes' unpacking into uint4/uint8), folded whatever their intermediate sizes, since the result
    is as small as the stored codes and is what onnxruntime keeps packed. Also, per (node, input), the one stored
    tensor an input is computed from (``layers.0.mlp.up_proj.q_codes``): the folded tensor's name."""
    cone, sources = set(), {}
    for node in graph.all_nodes():
        if node.op_type != "DequantizeLinear" or node.domain != "":
            continue
        for i, value in enumerate(node.inputs):
            upstream, stored, stack = set(), set(), [value]
            while stack:
                v = stack.pop()
                if v is None:
                    continue
                if v.is_initializer():
                    stored.add(v.name)
                producer = v.producer()
                if producer is not None and producer not in upstream:
                    upstream.add(producer)
                    stack += producer.inputs
            if i != 1:
                cone |= upstream
            if len(stored) == 1:
                sources[(node, i)] = stored.pop()
        codes = sources.get((node, 0), "")
        if (node, 2) not in sources and codes.endswith(".q_codes") and node.inputs[2] is not None:
            sources[(node, 2)] = codes.removesuffix("q_codes") + "q_zeros"  # symmetric: constant zero points
    return cone, sources


def _strip_node_metadata(model) -> None:
    """Drop the exporter's per-node source traces and module paths (~1.4 KB a node: a third
    of a small compressed model's file). Model-level metadata (the cache layout) stays."""
    for node in model.graph.all_nodes():
        node.metadata_props.clear()
    for function in model.functions.values():
        for node in function:
            node.metadata_props.clear()


def _name_decode_io(model, layout) -> None:
    """Inputs input_ids, attention_mask, position_ids, past_key_values.<i>.<entry>...; outputs logits,
    present.<i>.<entry>...; dimensions batch_size, sequence_length, past_sequence_length, total_sequence_length
    (parts of a rewritten cache: see :func:`_seq_name`); the layout as metadata."""
    from ..runtime import LAYOUT_KEY

    graph = model.graph
    entries = [e.name.removeprefix("layers.") for e in layout]
    names = [*STEP_INPUTS, *(f"past_key_values.{e}" for e in entries)]
    if len(graph.inputs) != len(names) or len(graph.outputs) != len(layout) + 1:
        raise BackendError(
            f"decode graph has {len(graph.inputs)} inputs / {len(graph.outputs)} outputs; "
            f"its cache layout describes {len(layout)} cache tensors"
        )
    for value, name in zip(graph.inputs, names):
        value.name = name
    for value, name in zip(graph.outputs, ["logits", *(f"present.{e}" for e in entries)]):
        value.name = name
    dims = {_dim(graph.inputs[0], 0): "batch_size", _dim(graph.inputs[1], 1): "total_sequence_length"}
    for value in graph.inputs[1 : len(STEP_INPUTS)]:
        dims.setdefault(_dim(value, 0), "batch_size")
    if layout.step_tokens is None:
        dims[_dim(graph.inputs[0], 1)] = "sequence_length"
    for value, entry in zip(graph.inputs[len(STEP_INPUTS) :], layout):
        dims.setdefault(_dim(value, 0), "batch_size")
        dims.setdefault(_dim(value, entry.seq_axis), _seq_name(entry))
    _rename_dims(graph, dims)
    _set_dim(graph.inputs[1], 1, "total_sequence_length")  # past + new, however the exporter wrote it
    for value, entry in zip(graph.outputs[1:], layout):
        if _seq_name(entry) == "past_sequence_length":
            _set_dim(value, entry.seq_axis, "total_sequence_length")
    model.metadata_props[LAYOUT_KEY] = layout.to_json()


def _seq_name(entry) -> str | None:
    """The name of a cache entry's sequence axis: ``past_sequence_length`` for one that holds every past token
    (K, V, a latent); a part of a rewritten entry (kind ``key.packed``, ``key.scale``, ...) holds fewer: a bounded
    window (``past_key_window_length``), one slot per group of tokens (``past_key_groups``) or per packed token
    (``past_value_packed_length``: the tokens flushed from the window)."""
    base = entry.kind.split(".")[0]
    if entry.max_len is not None:
        return f"past_{base}_window_length"
    if entry.tokens_per_slot > 1:
        return f"past_{base}_groups"
    return "past_sequence_length" if base == entry.kind else f"past_{base}_packed_length"


def _name_forward_io(model, graph: Graph) -> None:
    """Outputs named after the model's output structure (``logits`` for a transformers model; ``output`` for a
    lone tensor); the first dimension of every input ``batch_size`` and the second of integer inputs (token ids,
    masks, positions) ``sequence_length``, where the capture left them free."""
    from torch.utils import _pytree as pytree

    spec = graph.program.call_spec.out_spec
    if spec is not None and spec.num_leaves == len(model.graph.outputs):
        paths = [
            path for path, _ in pytree.tree_flatten_with_path(pytree.tree_unflatten(range(spec.num_leaves), spec))[0]
        ]
        names = [".".join(_key_name(k) for k in path) for path in paths]
        if len(set(names)) == len(names) and all(names):
            for value, name in zip(model.graph.outputs, names):
                value.name = name
        elif names == [""]:
            model.graph.outputs[0].name = "output"
    dims = {}
    for value in model.graph.inputs:
        dims.setdefault(_dim(value, 0), "batch_size")
        if value.dtype is not None and value.dtype.is_integer():
            dims.setdefault(_dim(value, 1), "sequence_length")
    _rename_dims(model.graph, dims)


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _symbol(d) -> str | None:
    """A dimension's symbolic name or expression (None for a fixed size)."""
    return d.value if isinstance(getattr(d, "value", None), str) else None


def _dim(value, axis: int) -> str | None:
    """The symbol of ``value``'s dimension ``axis`` (None when it is fixed or absent)."""
    if value.shape is None or axis >= len(value.shape):
        return None
    return _symbol(value.shape[axis])


def _set_dim(value, axis: int, name: str) -> None:
    from onnxscript import ir

    dims = list(value.shape)
    dims[axis] = ir.SymbolicDim(name)
    value.shape = ir.Shape(dims)


def _rename_dims(graph, names: dict) -> None:
    """Rename the exporter's symbols (``s72``) to ``names`` in every shape of the graph, expressions included."""

    from onnxscript import ir

    names = {k: v for k, v in names.items() if k is not None and re.fullmatch(r"[A-Za-z_]\w*", k)}
    if not names:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + r")\b")
    values = [*graph.inputs, *graph.outputs, *(v for node in graph.all_nodes() for v in node.outputs)]
    for value in values:
        if value.shape is None:
            continue
        dims = [
            ir.SymbolicDim(pattern.sub(lambda m: names[m.group(1)], _symbol(d))) if _symbol(d) else d
            for d in value.shape
        ]
        value.shape = ir.Shape(dims)
