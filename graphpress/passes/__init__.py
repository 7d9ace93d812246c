"""Passes: the Pass base class, the registry, the PassManager, and one module per pass."""

from . import (  # noqa: F401  (register the passes)
    distill,
    gqa_to_mla,
    kv_cache_quant,
    low_rank,
    nm_sparsity,
    qkvo_lock,
    shift_add,
    weight_clustering,
    weight_quant,
)
from .base import LayerReport, Pass, PassReport, PassResult
from .context import PassContext
from .manager import PassManager, Verifier
from .registry import build_pass, get_pass, register, registered

__all__ = [
    "LayerReport",
    "Pass",
    "PassContext",
    "PassManager",
    "PassReport",
    "PassResult",
    "Verifier",
    "build_pass",
    "get_pass",
    "register",
    "registered",
]
