"""CUDA backend: the final graph with its compressed linears fused, saved as a torch.export program.

Every ``linear(x, <format>_weight(...))`` becomes one fused op (:mod:`.fuse_linear`), and
a decode step's attention becomes ``decode_attention`` or, over a KIVI cache,
``quantized_decode_attention`` (:mod:`.fuse_attention`). Their CUDA implementations are
Triton kernels that decode weights and cache tiles in registers (:mod:`.kernels`); on CPU tensors the same program runs the ops' references. Writes
``model.pt2`` (``torch.export.save``); :func:`load` registers the kernels and returns
the runnable module (``load("out/model.pt2").to("cuda")``).

Validation: the fused program on CPU (the reference path) against the unfused graph on
the calibration inputs; where a GPU is present, also on it, through the kernels.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ...errors import BackendError
from ...ir import Graph
from ...schema.backends import CudaBackendConfig
from ..base import Backend, BackendRecord, publish, staging_dir
from . import kernels
from .fuse_attention import fuse_decode_attention
from .fuse_linear import fuse_format_linears


def load(path: str | Path) -> torch.nn.Module:
    """The module a cuda backend wrote, its fused ops running the Triton kernels on CUDA tensors."""
    kernels.register()
    return torch.export.load(str(path)).module()


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
        errors = self.validate(fused, graph, inputs, "cpu")
        details = {"fused": dict(sorted(counts.items())), "kernels": kernels.available(), "gpu": None}
        if torch.cuda.is_available():
            details["gpu"] = {"device": torch.cuda.get_device_name(), **self.validate(fused, graph, inputs, "cuda")}
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
            publish(staged, out_dir)
        histogram = {str(n.target): 0 for n in fused.nodes if n.op == "call_function"}
        for node in fused.nodes:
            if node.op == "call_function":
                histogram[str(node.target)] += 1
        return BackendRecord(
            target=self.target,
            artifact=str(out_dir / cfg.filename),
            files=files,
            errors=errors,
            tolerance=cfg.max_error,
            op_histogram=dict(sorted(histogram.items(), key=lambda kv: -kv[1])),
            seconds=time.perf_counter() - start,
            details=details,
        )

    def validate(self, fused: Graph, graph: Graph, inputs: list[tuple], device: str) -> dict[str, float]:
        """The fused program on ``device`` against the unfused graph (eager, CPU)."""
        from ...runtime import TorchDecoder

        module = fused.module().to(device)

        def run(tensors):
            outputs = module(*(t.to(device) for t in tensors))
            leaves = outputs if isinstance(outputs, (tuple, list)) else [outputs]
            return [t.cpu() for t in leaves]

        if device == "cpu":
            return self.compare_with_eager(graph, inputs, run, lambda: TorchDecoder(fused))
        return self.compare_with_eager(graph, inputs, run, lambda: _DeviceDecoder(fused, device))


class _DeviceDecoder:
    """A decode graph stepped on another device, tensors handed back on the CPU."""

    def __init__(self, graph: Graph, device: str):
        self.layout, self.device = graph.cache, device
        self.module = graph.module().to(device)

    @torch.no_grad()
    def step(self, input_ids, position_ids, cache):
        logits, present = self.module(
            input_ids.to(self.device), position_ids.to(self.device), [t.to(self.device) for t in cache]
        )
        return logits.cpu(), [t.cpu() for t in present]
