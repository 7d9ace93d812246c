"""Integer-weight linear: y = x W^T + b with W[r, c] = (code - zero[r, c // B]) * scale[r, c // B], decoded per tile.

Codes, scales and zero points are ``graphpress::int_weight``'s (``MatMulNBits``' layout):
each row's blocks are one bit stream, so a code is read like the other formats' codes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bitstream import load_codes
from .common import accumulate, launch_linear, store_output, tile_configs, x_tile


@triton.autotune(configs=tile_configs(), key=["M", "N", "K"])
@triton.jit
def _int_linear_kernel(
    x_ptr, codes_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, M, N, K,
    width, blocks, zero_width, block_size,
    bits: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
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
        block = (rk // block_size)[None, :]
        q = load_codes(rows, rk[None, :], width, bits, in_w)
        if HAS_ZEROS:
            z = load_codes(zeros_ptr + rn[:, None] * zero_width, block, zero_width, bits, in_w)
        else:
            z = 1 << (bits - 1)
        scale = tl.load(scales_ptr + rn[:, None] * blocks + block, mask=in_w, other=0.0)
        w = ((q - z).to(tl.float32) * scale.to(tl.float32)).to(x.dtype)
        acc = accumulate(acc, x, w, IEEE)
    store_output(acc, bias_ptr, out_ptr, rm, rn, M, N, HAS_BIAS)


def int_linear(x, codes, scales, zeros, bits: int, block_size: int, in_features: int, bias=None) -> torch.Tensor:
    """The Triton implementation of ``graphpress::int_linear``."""
    n, blocks, _ = codes.shape
    flat = codes.reshape(n, -1).contiguous()
    return launch_linear(
        _int_linear_kernel,
        x,
        n,
        bias,
        codes_ptr=flat,
        scales_ptr=scales.contiguous(),
        zeros_ptr=zeros.contiguous() if zeros is not None else flat,  # never read without HAS_ZEROS
        width=flat.shape[1],
        blocks=blocks,
        zero_width=zeros.shape[1] if zeros is not None else 0,
        block_size=block_size,
        bits=bits,
        HAS_ZEROS=zeros is not None,
    )
