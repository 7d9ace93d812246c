"""TVM backend: the final Graph imported into Relax, compiled for LLVM, validated in the Relax VM.

Compressed formats stay compressed: every ``graphpress::`` op has a Relax converter
(``graphpress.ir.ops.relax_converters()``), so the library stores packed codes and
codebooks and rebuilds inside its kernels. The graph is imported without re-running
torch.export's decompositions: they would re-trace with the example's shapes and pin
symbolic dimensions (batch 1 became a constant 1 in a decomposed ``linear``).

Writes ``<filename>`` (a shared library ``tvm.runtime.load_module`` loads; run it with
``relax.VirtualMachine``) and ``<filename>.json`` (its inputs and, for decode graphs, the
cache layout), which :class:`graphpress.runtime.TvmModule` / ``TvmDecoder`` read.
Kernels are compiled for the ``cpu`` field's CPU (default: this machine's). Float32 matmuls call OpenBLAS
(``tvm_blas``, the ``blas`` field), compressed linears and softmax rows are hand-written TIR (``tvm_linear``,
``tvm_softmax``); the other kernels use TVM's default schedules, or, with the ``tune`` field, MetaSchedule's
(``tvm_tune``) in copies of ``main`` specialised at the shapes tuned, where they beat the default.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import torch

from ..errors import BackendError
from ..fileio import publish_all, staging_dir
from ..ir import Graph, SubgraphBuilder, ops
from ..progress import step
from ..schema.backends import TvmBackendConfig
from .base import Backend, BackendRecord, Comparison
from .fuse_linear import fuse_format_linears
from .grouped_heads import group_repeated_heads


class TvmBackend(Backend):
    target = "tvm"
    Config = TvmBackendConfig

    def build(self, graph: Graph, inputs: list[tuple], out_dir: Path) -> BackendRecord:
        self.require("tvm", "tvm")
        import tvm

        from . import tvm_linear, tvm_math

        cfg: TvmBackendConfig = self.config
        start = time.perf_counter()
        blas, offloaded, lowered, fused, tuning = self.blas(), 0, graph, Counter(), None
        target = self.llvm_target()
        if blas is not None:  # a fused kernel's prompt path multiplies with BLAS
            lowered, fused = fuse_format_linears(graph, tvm_linear.decodes)
        try:
            mod = self.import_graph(lowered, blas)
        except Exception as exc:
            raise BackendError(f"{self.spec_path}: TVM Relax import failed: {type(exc).__name__}: {exc}") from exc
        histogram = Counter(_relax_ops(mod))
        with staging_dir(out_dir) as tmp:
            staged = tmp / cfg.filename
            try:
                with step(f"{self.spec_path} tvm: compiling for {cfg.device}"):
                    if blas is not None:
                        from . import tvm_blas

                        mod, offloaded = tvm_blas.offload(mod, blas)
                    if cfg.tune is None:
                        executable = tvm.compile(tvm_math.legalize(mod, target), target=target)
                    else:
                        executable, tuning = self.tuned(mod, target, graph, inputs, tmp)
                    options = []
                    linked = offloaded or fused.total()  # a fused kernel's prompt path calls sgemm too
                    if linked:
                        blas.copy_beside(staged)
                        options = blas.export_options()
                    executable.export_library(str(staged), options=options)
            except Exception as exc:
                raise BackendError(f"{self.spec_path}: TVM build failed: {type(exc).__name__}: {exc}") from exc
            sidecar = tmp / f"{cfg.filename}.json"
            meta = {**self.describe(graph), "blas": blas.describe() if linked else None, "cpu": _cpu(target)}
            meta["step_blas_threads"] = step_blas_threads(lowered) if linked else None
            meta["specialised"] = tuning["specialised"] if tuning else {}
            sidecar.write_text(json.dumps(meta, indent=1, sort_keys=True))
            comparison = self.validate(staged, graph, inputs)
            errors = comparison.errors
            if errors["rel_l2"] > cfg.max_error:
                raise BackendError(
                    f"{self.spec_path}: the TVM module's output differs from eager: rel_l2 = {errors['rel_l2']:.3g} "
                    f"> max_error = {cfg.max_error:g}"
                )
            if tuning:
                tuning["checked"] = self.check_specialised(staged, graph, inputs, tuning["specialised"])
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            publish_all(tmp, out_dir, last=[out_dir / cfg.filename])  # the library after its sidecar
        return BackendRecord(
            target=self.target,
            artifact=str(out_dir / cfg.filename),
            files=files,
            errors=errors,
            tolerance=cfg.max_error,
            op_histogram=dict(histogram.most_common()),
            seconds=time.perf_counter() - start,
            details={
                "device": cfg.device,
                "cpu": _cpu(target),
                "blas": {"library": f"scipy-openblas32 {blas.version}", "matmuls": offloaded} if linked else None,
                "fused_linears": dict(sorted(fused.items())),
                "tuning": tuning,
            },
            latency=comparison.latency,
        )

    def tuned(self, mod, target, graph: Graph, inputs: list[tuple], staging: Path):
        """The executable of ``mod`` with copies of ``main`` specialised at the ``tune`` field's shapes (before
        legalization, so that their kernels have static shapes), those kernels tuned into the database (starting
        from the published one: a rebuild tunes nothing new), and what was done (for the record and sidecar)."""
        import shutil

        from . import tvm_math, tvm_tune

        tune = self.config.tune
        lengths = tune.lengths or ([1] if graph.cache is not None else [_tokens(inputs)])
        if None in lengths:
            raise BackendError(f"{self.spec_path}.tune.lengths: the first input has no (batch, tokens) dimensions")
        try:
            mod, specialised = tvm_tune.specialise(mod, [(tune.batch, n) for n in lengths])
        except ValueError as exc:
            raise BackendError(f"{self.spec_path}.tune: {exc}") from exc
        mod = tvm_math.legalize(mod, target)
        name = tune.database or f"{Path(self.config.filename).stem}.tuning"
        database, published = staging / name, (self.published_dir or staging.parent) / name
        if published.is_dir():
            shutil.copytree(published, database)
        tuning_target = tvm_tune.with_cores(target)
        start = time.perf_counter()
        with step(f"{self.spec_path} tvm: tuning ({tune.trials} trials)"):
            done = tvm_tune.tune(
                mod,
                tuning_target,
                database,
                tune.trials,
                strategy=tune.strategy,
                cost_model="xgb" if tune.strategy == "evolutionary" else "random",
            )
        seconds = time.perf_counter() - start
        with step(f"{self.spec_path} tvm: compiling tuned kernels"):
            executable = tvm_tune.compile_tuned(done.kept, mod, tuning_target)
        record = {
            "database": name,
            "trials": tune.trials,
            "seconds": round(seconds, 1),
            "specialised": specialised,
            "tuned": sorted(done.tuned),
            "reused": sorted(done.reused),
            "unmeasured": sorted(done.unmeasured),
            "best_us": {task: round(s * 1e6, 2) for task, s in sorted(done.best.items())},
            "default_us": {task: round(s * 1e6, 2) for task, s in sorted(done.default.items())},
            "applied": sorted(done.applied),
        }
        return executable, record

    def check_specialised(self, path: Path, graph: Graph, inputs: list[tuple], specialised: dict) -> dict:
        """rel_l2 against eager of each specialised copy, on the first calibration input resized to its shape
        (a decode graph: that prompt from an empty cache); above ``max_error`` is an error."""
        from ..metrics import compare_outputs
        from ..runtime import TorchDecoder, TvmDecoder, TvmModule, prefill
        from .base import _eager, tensor_leaves

        checked = {}
        ours = TvmModule(path) if graph.cache is None else TvmDecoder(path)
        reference = TorchDecoder(graph) if graph.cache is not None else None
        for key in specialised:
            batch, tokens = map(int, key.split("x"))
            args = _resized(inputs[0], batch, tokens)
            with torch.no_grad():
                if graph.cache is None:
                    eager, swept = _eager(graph, [args], f"{self.spec_path} tvm: eager at {key}")
                    out, ref = ours(*args), tensor_leaves(swept[0][0] if swept else eager(*args))
                else:
                    out, ref = prefill(ours, args[0])[0], prefill(reference, args[0])[0]
            checked[key] = compare_outputs([out], [ref])["rel_l2"]
            if checked[key] > self.config.max_error:
                raise BackendError(
                    f"{self.spec_path}.tune: the copy specialised at {key} differs from eager: rel_l2 = "
                    f"{checked[key]:.3g} > max_error = {self.config.max_error:g}"
                )
        return checked

    def llvm_target(self):
        """The LLVM target for the ``cpu`` field ('host': this machine's CPU; 'generic': no ``mcpu``); a CPU
        LLVM does not know for this architecture is an error (LLVM would fall back to generic, and say so only
        on stderr)."""
        import tvm
        from tvm.target import codegen

        cpu = self.config.cpu
        if cpu == "generic":
            return tvm.target.Target(self.config.device)
        if cpu == "host":
            cpu = codegen.llvm_get_system_cpu()
        known = set(codegen.llvm_get_cpu_archlist(tvm.target.Target(self.config.device)))
        if cpu not in known:
            raise BackendError(
                f"{self.spec_path}.cpu: {cpu!r} is not a CPU LLVM knows for {codegen.llvm_get_system_triple()}; "
                f"use 'host', 'generic' or one of: {', '.join(sorted(known)[:12])}, ..."
            )
        return tvm.target.Target({"kind": self.config.device, "mcpu": cpu})

    def blas(self):
        """The BLAS the ``blas`` field asks for, or None; 'openblas' without it installed is an error."""
        from . import tvm_blas

        if self.config.blas == "none":
            return None
        found = tvm_blas.find()
        if found is None and self.config.blas == "openblas":
            raise BackendError(
                f"{self.spec_path}.blas: 'openblas' needs the scipy-openblas32 package "
                "(pip install 'graphpress[tvm]'), or set it to 'auto' or 'none'"
            )
        return found

    @staticmethod
    def import_graph(graph: Graph, blas=None):
        """Relax of the graph; fused compressed linears (``blas`` given) as :mod:`.tvm_linear`'s kernels."""
        from tvm.relax.frontend.torch import from_exported_program

        from . import tvm_linear

        fused = tvm_linear.relax_converters(blas) if blas is not None else {}
        return from_exported_program(
            prepare(graph).program,
            custom_convert_map={**ops.relax_converters(), **fused, "repeat_interleave.self_int": _repeat_interleave},
            run_ep_decomposition=False,
        )

    @staticmethod
    def describe(graph: Graph) -> dict:
        return {
            "inputs": [node.name for node in graph.user_inputs()],
            "outputs": len(graph.user_outputs()),
            "cache_layout": graph.cache.to_json() if graph.cache is not None else None,
        }

    def validate(self, path: Path, graph: Graph, inputs: list[tuple]) -> Comparison:
        from ..runtime import TvmDecoder, TvmModule

        module = TvmModule(path) if graph.cache is None else None
        return self.compare_with_eager(graph, inputs, lambda tensors: module(*tensors), lambda: TvmDecoder(path))


STEP_CACHED_BYTES = 32 << 20
"""Float32 linear weights (bytes) up to which a decoding step runs OpenBLAS on one thread: they stay in the
last-level cache, and waking a second thread for each small GEMM costs more than it saves (the example LM, 12 MB:
2.00 ms a step @ 2048 on one thread, 2.76 on two). A model that streams its weights from memory needs every
thread's bandwidth (a hidden-1024, 8-layer Llama, 350 MB: 58.3 ms on one, 31.7 on two)."""


def step_blas_threads(graph: Graph) -> int | None:
    """The sidecar's ``step_blas_threads``: one thread (``runtime.STEP_BLAS_THREADS``) where the weights BLAS
    multiplies in a step fit :data:`STEP_CACHED_BYTES`, else None (the module's count)."""
    from ..runtime import STEP_BLAS_THREADS

    tensors = graph.tensors()
    dense = sum(tensors[lin.weight].numel() * tensors[lin.weight].element_size() for lin in graph.linears())
    return STEP_BLAS_THREADS if dense <= STEP_CACHED_BYTES else None


def _tokens(inputs: list[tuple]) -> int | None:
    """The first calibration input's token count (its first tensor's second dimension), if it has one."""
    first = inputs[0][0]
    return first.shape[1] if isinstance(first, torch.Tensor) and first.dim() >= 2 else None


def _resized(args: tuple, batch: int, tokens: int) -> tuple:
    """``args`` with every tensor that shares the first one's leading (batch, tokens) dimensions repeated or
    cut to ``batch`` x ``tokens`` (token ids stay token ids, masks stay masks)."""
    lead = tuple(args[0].shape[:2])

    def resize(t):
        if not isinstance(t, torch.Tensor) or tuple(t.shape[:2]) != lead:
            return t
        reps = [-(-batch // lead[0]), -(-tokens // lead[1])] + [1] * (t.dim() - 2)
        return t.repeat(*reps)[:batch, :tokens].contiguous()

    return tuple(resize(t) for t in args)


def _cpu(target) -> str:
    """The CPU a target compiles for ('generic' without ``mcpu``)."""
    return str(target.attrs.get("mcpu", "") or "generic")


def prepare(graph: Graph) -> Graph:
    """A copy of the graph as TVM's importer takes it: masked attention spelled out, its products over grouped
    KV heads not repeated ones, no same-device moves, slice axes non-negative."""
    aten = torch.ops.aten
    work = graph.clone()
    explicit_masked_attention(work)
    scale_folded_into_query(work)
    group_repeated_heads(work)
    # transformers writes .to(x.device[, dtype]): on one device a dtype cast at most; TVM's importer lacks to.device
    for node in work.nodes:
        if node.op == "call_function" and node.target is aten.to.device:
            x, dtype = node.args[0], node.meta["val"].dtype
            if dtype != x.meta["val"].dtype:
                with work.fx.inserting_before(node):
                    x = SubgraphBuilder(work, "", node).call(aten._to_copy.default, x, dtype=dtype)
            node.replace_all_uses_with(x)
            work.fx.erase_node(node)
    # torch.cat skips legacy empty 1-D inputs (transformers' fresh cache layers start as tensor([])); TVM rejects them
    for node in work.nodes:
        if node.op == "call_function" and node.target is aten.cat.default:
            kept = [t for t in node.args[0] if not _legacy_empty(t)]
            if len(kept) < len(node.args[0]):
                if len(kept) == 1:
                    node.replace_all_uses_with(kept[0])
                    work.fx.erase_node(node)
                else:
                    node.update_arg(0, kept)
    # where(cond, x, scalar) (transformers' eager masks) as masked_fill(x * cond, ~cond, scalar), which TVM's
    # importer has; x * cond broadcasts x to the result's shape, and masked_fill overwrites what cond drops
    for node in work.nodes:
        if node.op == "call_function" and node.target is aten.where.ScalarOther:
            cond, x, other = node.args
            b = SubgraphBuilder(work, "", node)
            with work.fx.inserting_before(node):
                kept = b.call(aten.mul.Tensor, x, b.call(aten._to_copy.default, cond, dtype=x.meta["val"].dtype))
                filled = b.call(aten.masked_fill.Scalar, kept, b.call(aten.logical_not.default, cond), other)
            node.replace_all_uses_with(filled)
            work.fx.erase_node(node)
    # TVM's dynamic strided_slice (the path symbolic bounds take) rejects negative axes
    for node in work.nodes:
        is_slice = node.op == "call_function" and node.target is torch.ops.aten.slice.Tensor
        if is_slice and len(node.args) > 1 and node.args[1] < 0:
            node.update_arg(1, node.args[1] + node.args[0].meta["val"].dim())
    work._changed()
    return work


def _legacy_empty(node) -> bool:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dim() == 1 and isinstance(val.shape[0], int) and val.shape[0] == 0


def explicit_masked_attention(work: Graph) -> None:
    """Rewrite, in place, attention with a mask tensor as matmul -> softmax -> matmul.

    TVM's attention legalization checks that the key and value lengths are equal and
    cannot prove it when they are expressions (a decode step's ``past + 1``); its
    converter also takes additive float masks only. Plain matmuls have neither problem.
    """
    aten = torch.ops.aten
    masked = [
        n
        for n in work.nodes
        if n.op == "call_function"
        and n.target is aten.scaled_dot_product_attention.default
        and isinstance(n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask"), torch.fx.Node)
    ]
    for sdpa in masked:
        q, k, v = sdpa.args[:3]
        mask = sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs["attn_mask"]
        if sdpa.kwargs.get("is_causal") or sdpa.kwargs.get("enable_gqa") or len(sdpa.args) > 4:
            raise BackendError(f"{sdpa.name}: attention with a mask and other options is not lowered for TVM")
        dtype, head_dim = q.meta["val"].dtype, q.meta["val"].shape[-1]
        scale = sdpa.kwargs.get("scale") or 1 / math.sqrt(head_dim)
        b = SubgraphBuilder(work, "", sdpa)
        with work.fx.inserting_before(sdpa):
            scores = b.call(
                aten.mul.Tensor, b.call(aten.matmul.default, q, b.call(aten.transpose.int, k, -2, -1)), scale
            )
            if mask.meta["val"].dtype == torch.bool:  # 0 where attended, the dtype's lowest elsewhere
                keep = b.call(aten._to_copy.default, mask, dtype=dtype)
                mask = b.call(aten.mul.Tensor, b.call(aten.sub.Tensor, keep, 1.0), torch.finfo(dtype).max)
            probs = b.call(aten._softmax.default, b.call(aten.add.Tensor, scores, mask), -1, False)
            out = b.call(aten.matmul.default, probs, v)
        sdpa.replace_all_uses_with(out)
        work.fx.erase_node(sdpa)


def scale_folded_into_query(work: Graph) -> None:
    """Rewrite, in place, attention with an explicit ``scale`` as attention on ``q * scale * sqrt(E)``.

    TVM's importer drops SDPA's ``scale`` (its ``nn.attention`` then divides by ``sqrt(E)``, E
    the query's head dim); TransMLA's decoupled RoPE widens q/k beyond the head dim the
    original scale was for, so the two differ there.
    """
    aten = torch.ops.aten
    for sdpa in work.nodes:
        if sdpa.op != "call_function" or sdpa.target is not aten.scaled_dot_product_attention.default:
            continue
        scale = sdpa.args[6] if len(sdpa.args) > 6 else sdpa.kwargs.get("scale")
        if scale is None:
            continue
        q = sdpa.args[0]
        with work.fx.inserting_before(sdpa):
            scaled = SubgraphBuilder(work, "", sdpa).call(
                aten.mul.Tensor, q, scale * math.sqrt(q.meta["val"].shape[-1])
            )
        sdpa.update_arg(0, scaled)
        if len(sdpa.args) > 6:
            sdpa.args = sdpa.args[:6]
        sdpa.kwargs = {k: v for k, v in sdpa.kwargs.items() if k != "scale"}


def _relax_ops(mod) -> list[str]:
    """The Relax operators the main function calls (for the record's op histogram)."""
    import tvm
    from tvm import relax

    names: list[str] = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            names.append(expr.op.name)

    relax.analysis.post_order_visit(mod["main"], visit)
    return names


def _repeat_interleave(node, importer):
    """``aten.repeat_interleave.self_int`` (repeat_kv written so that export keeps lengths of 1 free), which
    the importer lacks: each slice along ``dim`` broadcast ``repeats`` times beside itself, then merged
    (Relax's ``repeat`` loses the symbolic shape)."""
    from tvm.relax import op

    bb, x = importer.block_builder, importer.env[node.args[0]]
    repeats = node.args[1]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if dim is None:
        raise NotImplementedError(f"{node.name}: repeat_interleave over the flattened tensor")
    shape = list(importer.shape_of(x))
    dim %= len(shape)
    wide = bb.emit(
        op.broadcast_to(bb.emit(op.expand_dims(x, dim + 1)), [*shape[: dim + 1], repeats, *shape[dim + 1 :]])
    )
    return bb.emit(op.reshape(wide, [*shape[:dim], shape[dim] * repeats, *shape[dim + 1 :]]))
