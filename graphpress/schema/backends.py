"""Backend configurations, selected by their ``"target"`` key."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from .base import StrictModel


class OnnxBackendConfig(StrictModel):
    """Export with torch.onnx (dynamo) and validate in onnxruntime on the calibration inputs."""

    target: Literal["onnx"]
    opset: int = Field(18, ge=18, le=23, description="ONNX opset of the default domain.")
    external_data: Literal["auto", "always", "never"] = Field(
        "auto", description="Store weights beside the .onnx file; 'auto' does so above 2 GB (protobuf's limit)."
    )
    max_error: float = Field(
        1e-4, gt=0, description="Largest rel_l2 between onnxruntime and eager outputs before the backend fails."
    )
    filename: str = Field("model.onnx", pattern=r"^[\w.-]+\.onnx$")
    node_metadata: bool = Field(
        False,
        description="Keep the exporter's per-node metadata (source stack traces, module paths; about 1.4 KB a node) "
        "for debugging. Off: the file holds the model only.",
    )


class TvmBackendConfig(StrictModel):
    """Import into TVM Relax, compile, and validate in the Relax VM; writes a loadable library."""

    target: Literal["tvm"]
    device: Literal["llvm"] = Field("llvm", description="Compilation target (CPU via LLVM).")
    max_error: float = Field(
        1e-4, gt=0, description="Largest rel_l2 between the TVM module and eager outputs before the backend fails."
    )
    filename: str = Field("model.so", pattern=r"^[\w.-]+\.so$")


BACKEND_CONFIGS = {"onnx": OnnxBackendConfig, "tvm": TvmBackendConfig}

AnyBackendConfig = Annotated[Union[tuple(BACKEND_CONFIGS.values())], Field(discriminator="target")]  # noqa: UP007
