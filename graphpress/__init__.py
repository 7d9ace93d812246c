"""graphpress: declarative, compiler-style compression of PyTorch models."""

from .api import CompressionResult, compress
from .errors import (
    ArtifactMismatchError,
    BackendError,
    CaptureError,
    GraphpressError,
    OutputError,
    PassPostconditionError,
    PassPreconditionError,
    ShapeError,
    SpecError,
    VerificationError,
)

__version__ = "0.1.0"

__all__ = [
    "ArtifactMismatchError",
    "BackendError",
    "CaptureError",
    "CompressionResult",
    "GraphpressError",
    "OutputError",
    "PassPostconditionError",
    "PassPreconditionError",
    "ShapeError",
    "SpecError",
    "VerificationError",
    "compress",
]
