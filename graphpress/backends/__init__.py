"""Backends: one module per target, each lowering the final Graph and validating the artifact."""

from __future__ import annotations

from pydantic import BaseModel

from .base import Backend, BackendRecord
from .cuda import CudaBackend
from .hf import HfBackend
from .mlir import MlirBackend
from .onnx import OnnxBackend
from .tvm import TvmBackend

BACKENDS: dict[str, type[Backend]] = {
    OnnxBackend.target: OnnxBackend,
    TvmBackend.target: TvmBackend,
    MlirBackend.target: MlirBackend,
    CudaBackend.target: CudaBackend,
    HfBackend.target: HfBackend,
}


def build_backend(config: BaseModel, spec_path: str = "backends") -> Backend:
    return BACKENDS[config.target](config, spec_path)


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendRecord",
    "CudaBackend",
    "HfBackend",
    "MlirBackend",
    "OnnxBackend",
    "TvmBackend",
    "build_backend",
]
