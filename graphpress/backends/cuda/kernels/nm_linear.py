"""N:M sparse linear: y = x W^T + b from the kept values and their positions, densified per tile.

Dense column c of row r lies in group g = c // m; the group's n kept values are
``values[r, g*n + t]`` at columns ``g*m + position(r, g*n + t)``. A (BLOCK_N, BLOCK_K) tile
of W is the sum over t < n of value_t where its position equals ``c % m``: n loads of
values and positions per weight instead of m dense ones, then a tensor-core ``tl.dot``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .bitstream import load_codes
from .common import accumulate, launch_linear, store_output, tile_configs, x_tile


@triton.autotune(configs=tile_configs(), key=["M", "N", "K"])
@triton.jit
def _nm_linear_kernel(
    x_ptr, values_ptr, positions_ptr, bias_ptr, out_ptr, M, N, K,
    kept, width,
    n: tl.constexpr, m: tl.constexpr, position_bits: tl.constexpr,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    value_rows = values_ptr + rn[:, None] * kept
    position_rows = positions_ptr + rn[:, None] * width
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = x_tile(x_ptr, rm, rk, M, K)
        in_w = (rn[:, None] < N) & (rk[None, :] < K)
        first = (rk // m) * n  # the group's first kept value
        w = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for t in tl.static_range(n):
            j = first[None, :] + t
            at = load_codes(position_rows, j, width, position_bits, in_w)
            value = tl.load(value_rows + j, mask=in_w, other=0.0).to(tl.float32)
            w += tl.where(at == rk[None, :] % m, value, 0.0)
        w = w.to(x.dtype)
        acc = accumulate(acc, x, w, IEEE)
    store_output(acc, bias_ptr, out_ptr, rm, rn, M, N, HAS_BIAS)


def nm_linear(x, values, positions, n: int, m: int, in_features: int, bias=None) -> torch.Tensor:
    """The Triton implementation of ``graphpress::nm_linear``."""
    return launch_linear(
        _nm_linear_kernel,
        x,
        values.shape[0],
        bias,
        values_ptr=values.contiguous(),
        positions_ptr=positions.contiguous(),
        kept=values.shape[1],
        width=positions.shape[1],
        n=n,
        m=m,
        position_bits=int(math.log2(m)),
    )
