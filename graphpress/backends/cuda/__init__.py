"""CUDA backend: the final graph with its compressed linears fused, saved as a torch.export program.

Every ``linear(x, <format>_weight(...))`` becomes one fused op (:mod:`graphpress.backends.fuse_linear`), and
a decode step's attention becomes ``decode_attention`` or, over a KIVI cache,
``quantized_decode_attention`` (:mod:`.fuse_attention`). Their CUDA implementations are
Triton kernels that decode weights and cache tiles in registers (:mod:`.kernels`); on CPU tensors the same program runs the ops' references. Writes
``model.pt2`` (``torch.export.save``); :func:`load` registers the kernels and returns
the runnable module (``load("out/model.pt2").to("cuda")``).

Validation: the fused program on CPU (the reference path) against the unfused graph on
the calibration inputs; where a GPU is present, also on it, through the kernels.
"""

from __future__ import annotations

import contextlib
import copy
import pickle
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import torch

from ...errors import BackendError, first_line
from ...fileio import publish_all, staging_dir, verify_published
from ...ir import Graph
from ...schema.backends import CudaBackendConfig
from ..base import Backend, BackendRecord, Comparison, tensor_leaves
from ..fuse_linear import fuse_format_linears
from . import kernels
from .fuse_attention import fuse_decode_attention


def load(path: str | Path) -> torch.nn.Module:
    """The module a cuda backend wrote, its fused ops running the Triton kernels on CUDA tensors.

    A ``.pt2`` archive may hold pickles, and ``torch.export.load`` unpickles some of them with
    ``weights_only=False``: a crafted file would run code as it loads. Here every pickle is
    read weights-only and pickled objects are refused (graphpress never writes any), so loading
    cannot run code. The program's ops still run when it is called: load programs you trust.
    """
    verify_published(path)
    kernels.register()
    try:
        with _weights_only():
            return torch.export.load(str(path)).module()
    except (pickle.UnpicklingError, _PickledObject) as exc:
        raise BackendError(
            f"{path}: holds pickled objects, not just tensors ({first_line(exc)}); not loaded: unpickling them "
            "could run code. graphpress's cuda backend never writes these: was the file made elsewhere?"
        ) from None


class _PickledObject(Exception):
    pass


@contextlib.contextmanager
def _weights_only():
    """torch.load forced to weights_only=True and raw unpickling refused while torch.export reads an archive."""
    real_load = torch.load

    def load_weights(f, *args, **kwargs):
        kwargs["weights_only"] = True
        return real_load(f, *args, **kwargs)

    def refuse(*_args, **_kwargs):
        raise _PickledObject("a pickled object, not a tensor")

    with (
        mock.patch.object(torch, "load", load_weights),
        mock.patch.object(pickle, "loads", refuse),
        mock.patch.object(torch._C, "_pickle_load_obj", refuse),
    ):
        yield


class CudaBackend(Backend):
    target = "cuda"
    Config = CudaBackendConfig

    def build(self, graph: Graph, inputs: list[tuple], out_dir: Path) -> BackendRecord:
        cfg: CudaBackendConfig = self.config
        start = time.perf_counter()
        kernels.register()
        fused, counts = fuse_format_linears(graph)
        if graph.cache is not None:
            fused, attention = fuse_decode_attention(fused)
            counts += attention
        comparison = self.validate(fused, graph, inputs, "cpu")
        errors = comparison.errors
        details = {"fused": dict(sorted(counts.items())), "kernels": kernels.available(), "gpu": None}
        if torch.cuda.is_available():
            gpu = self.validate(fused, graph, inputs, "cuda")
            details["gpu"] = {"device": torch.cuda.get_device_name(), **gpu.errors}
            details["gpu"]["latency"] = {**gpu.latency, "device": details["gpu"]["device"]}
        worst = max(errors["rel_l2"], details["gpu"]["rel_l2"] if details["gpu"] else 0.0)
        if worst > cfg.max_error:
            raise BackendError(
                f"{self.spec_path}: the fused program differs from the graph: rel_l2 = {worst:.3g} "
                f"> max_error = {cfg.max_error:g}"
            )
        with staging_dir(out_dir) as tmp:
            staged = tmp / cfg.filename
            torch.export.save(fused.program, str(staged))
            files = {staged.name: staged.stat().st_size}
            publish_all(tmp, out_dir)
        histogram = Counter(str(n.target) for n in fused.nodes if n.op == "call_function")
        return BackendRecord(
            target=self.target,
            artifact=str(out_dir / cfg.filename),
            files=files,
            errors=errors,
            tolerance=cfg.max_error,
            op_histogram=dict(histogram.most_common()),
            seconds=time.perf_counter() - start,
            details=details,
            latency=details["gpu"]["latency"]
            if details["gpu"]
            else {**comparison.latency, "device": "cpu (op references)"},
        )

    def validate(self, fused: Graph, graph: Graph, inputs: list[tuple], device: str) -> Comparison:
        """The fused program on ``device`` against the unfused graph (eager, CPU)."""
        decoder = _DeviceDecoder(fused, device)

        def run(tensors):
            return [t.cpu() for t in tensor_leaves(decoder.module(*(t.to(device) for t in tensors)))]

        return self.compare_with_eager(graph, inputs, run, lambda: decoder)


def _module_on(graph: Graph, device: str) -> torch.nn.Module:
    """The graph's module on ``device``. Off the CPU it is a copy: the module's parameters are
    the program's own (shared by its clones and the user's result), which ``.to`` would move."""
    module = graph.module()
    return module if device == "cpu" else copy.deepcopy(module).to(device)


class _DeviceDecoder:
    """A decode graph stepped on a device, tensors handed back on the CPU."""

    def __init__(self, graph: Graph, device: str):
        self.layout, self.device = graph.cache, device
        self.module = _module_on(graph, device)

    @torch.no_grad()
    def step(self, input_ids, attention_mask, position_ids, cache):
        inputs = (input_ids, attention_mask, position_ids)
        logits, present = self.module(*(t.to(self.device) for t in inputs), [t.to(self.device) for t in cache])
        return logits.cpu(), [t.cpu() for t in present]
