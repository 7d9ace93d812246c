"""The spec: pydantic models for everything a user writes, and their JSON Schema."""

from .backends import BACKEND_CONFIGS, CudaBackendConfig, MlirBackendConfig, OnnxBackendConfig, TvmBackendConfig
from .loading import json_schema, load_spec
from .passes import (
    PASS_CONFIGS,
    Budget,
    Energy,
    GlobalBudget,
    GqaToMlaConfig,
    KvCacheQuantConfig,
    KvQuantSide,
    LowRankConfig,
    NmSparsityConfig,
    ParamRatio,
    PassConfig,
    QkvoLockConfig,
    RopeHandling,
    ShiftAddConfig,
    WeightClusteringConfig,
    WeightQuantConfig,
)
from .spec import CalibrationConfig, CaptureConfig, Spec, VerifyConfig

__all__ = [
    "BACKEND_CONFIGS",
    "Budget",
    "Energy",
    "GlobalBudget",
    "GqaToMlaConfig",
    "KvCacheQuantConfig",
    "KvQuantSide",
    "PASS_CONFIGS",
    "CalibrationConfig",
    "CaptureConfig",
    "LowRankConfig",
    "NmSparsityConfig",
    "QkvoLockConfig",
    "OnnxBackendConfig",
    "ParamRatio",
    "PassConfig",
    "RopeHandling",
    "ShiftAddConfig",
    "CudaBackendConfig",
    "MlirBackendConfig",
    "TvmBackendConfig",
    "Spec",
    "VerifyConfig",
    "WeightClusteringConfig",
    "WeightQuantConfig",
    "json_schema",
    "load_spec",
]
