"""Palettized linear: y = x W^T + b with W[r, c] = codebook[r // group_rows, code(r, c)], decoded per tile."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bitstream import load_codes
from .common import accumulate, launch_linear, store_output, tile_configs, x_tile


@triton.autotune(configs=tile_configs(), key=["M", "N", "K"])
@triton.jit
def _lut_linear_kernel(
    x_ptr, idx_ptr, codebook_ptr, bias_ptr, out_ptr, M, N, K,
    width, entries, group_rows,
    bits: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = idx_ptr + rn[:, None] * width
    books = codebook_ptr + (rn // group_rows)[:, None] * entries
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = x_tile(x_ptr, rm, rk, M, K)
        in_w = (rn[:, None] < N) & (rk[None, :] < K)
        w = tl.load(books + load_codes(rows, rk[None, :], width, bits, in_w), mask=in_w, other=0.0).to(x.dtype)
        acc = accumulate(acc, x, w, IEEE)
    store_output(acc, bias_ptr, out_ptr, rm, rn, M, N, HAS_BIAS)


def lut_linear(x, indices, codebook, bits: int, in_features: int, group_rows: int, bias=None) -> torch.Tensor:
    """The Triton implementation of ``graphpress::lut_linear``."""
    return launch_linear(
        _lut_linear_kernel,
        x,
        indices.shape[0],
        bias,
        idx_ptr=indices.contiguous(),
        codebook_ptr=codebook.contiguous(),
        width=indices.shape[1],
        entries=codebook.shape[1],
        group_rows=group_rows,
        bits=bits,
    )
