"""Shift linear: y = x W^T + b, W[r, c] = scale[r] * sign * 2^(min_exponent + e - 1) (e = 0: zero).

Each code is decoded in registers: its sign bit and exponent select +-2^p, built by
``exp2`` of a small integer (exact), and the row's scale is applied once to the
accumulated output rather than to every weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from graphpress.ir.ops.shift import exponent_bits

from .bitstream import load_codes
from .common import accumulate, launch_linear, store_output, tile_configs, x_tile


@triton.autotune(configs=tile_configs(), key=["M", "N", "K"])
@triton.jit
def _shift_linear_kernel(
    x_ptr, codes_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K,
    width, min_exponent,
    bits: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = codes_ptr + rn[:, None] * width
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = x_tile(x_ptr, rm, rk, M, K)
        in_w = (rn[:, None] < N) & (rk[None, :] < K)
        code = load_codes(rows, rk[None, :], width, bits + 1, in_w)
        e = code & ((1 << bits) - 1)
        power = tl.exp2((e + min_exponent - 1).to(tl.float32))
        w = tl.where(e == 0, 0.0, tl.where((code >> bits) == 1, -power, power)).to(x.dtype)
        acc = accumulate(acc, x, w, IEEE)
    acc *= tl.load(scale_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    store_output(acc, bias_ptr, out_ptr, rm, rn, M, N, HAS_BIAS)


def shift_linear(x, codes, scale, min_exponent: int, max_exponent: int, in_features: int, bias=None) -> torch.Tensor:
    """The Triton implementation of ``graphpress::shift_linear``."""
    return launch_linear(
        _shift_linear_kernel,
        x,
        codes.shape[0],
        bias,
        codes_ptr=codes.contiguous(),
        scale_ptr=scale.contiguous(),
        width=codes.shape[1],
        min_exponent=min_exponent,
        bits=exponent_bits(min_exponent, max_exponent),
    )
