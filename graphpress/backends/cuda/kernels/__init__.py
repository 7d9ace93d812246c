"""Triton kernels for the fused ops (:mod:`graphpress.ir.ops.fused`): compressed linears and decode attention, one file each.

:func:`register` makes them the CUDA implementations of the ops; CPU tensors keep the
reference. In CI they run on the CPU in Triton's interpreter (``TRITON_INTERPRET=1``):
called directly, or for a whole model inside :func:`on_cpu`.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

import torch

_registered = False


def available() -> bool:
    return importlib.util.find_spec("triton") is not None


def register() -> bool:
    """Register the kernels for CUDA tensors (once); False when Triton is not installed."""
    global _registered
    if _registered or not available():
        return _registered
    from ....ir.ops import fused

    for name, launch in implementations().items():
        getattr(fused, name).register_kernel("cuda")(launch)
    _registered = True
    return True


def implementations() -> dict:
    """fused op name -> its Triton launcher."""
    from .decode_attention import decode_attention, quantized_decode_attention
    from .int_linear import int_linear
    from .lut_linear import lut_linear
    from .nm_linear import nm_linear
    from .shift_linear import shift_linear

    return {
        "lut_linear": lut_linear,
        "nm_linear": nm_linear,
        "shift_linear": shift_linear,
        "int_linear": int_linear,
        "decode_attention": decode_attention,
        "quantized_decode_attention": quantized_decode_attention,
    }


@contextlib.contextmanager
def on_cpu() -> Iterator[dict[str, int]]:
    """Within the block, CPU tensors also run the kernels (in Triton's interpreter when
    ``TRITON_INTERPRET=1``): a whole model through the kernels without a GPU. Yields
    how many times each kernel ran."""
    calls = {name: 0 for name in implementations()}

    def counted(name, launch):
        def run(*args):
            calls[name] += 1
            return launch(*args)

        return run

    with torch.library._scoped_library("graphpress", "IMPL") as lib:
        for name, launch in implementations().items():
            lib.impl(name, counted(name, launch), "CPU")
        yield calls
