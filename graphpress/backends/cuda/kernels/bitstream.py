"""Reading one b-bit code of a packed row (:mod:`graphpress.ir.ops.bitstream`) inside a kernel.

Code ``c`` of a row sits in run ``c // 8`` (``bits`` bytes per run of 8 codes) at bit
``(c % 8) * bits`` of the run. It spans at most two bytes (bits <= 8), so two byte loads,
a shift and a mask decode it: no dense copy of the row is ever made.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_codes(row_ptrs, cols, width, bits: tl.constexpr, mask):
    """Codes at columns ``cols`` of rows starting at ``row_ptrs`` (uint8, ``width`` bytes each), as int32."""
    if bits == 8:
        return tl.load(row_ptrs + cols, mask=mask, other=0).to(tl.int32)
    bit = (cols % 8) * bits
    byte = (cols // 8) * bits + bit // 8
    low = tl.load(row_ptrs + byte, mask=mask, other=0).to(tl.int32)
    high = tl.load(row_ptrs + byte + 1, mask=mask & (byte + 1 < width), other=0).to(tl.int32)
    return ((low | (high << 8)) >> (bit % 8)) & ((1 << bits) - 1)
