"""What every fused-linear kernel shares: its tile configurations and the launch around it."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
"""Kernels run on the CPU in Triton's interpreter (CI): one tile, nothing to tune; a large one, since each tile the
interpreter runs costs Python calls (numpy does the arithmetic within a tile)."""


def tile_configs() -> list[triton.Config]:
    """Tiles for batch-1 GEMV (BLOCK_M 16: tl.dot's minimum) up to prefill GEMM; autotuned per (M, N, K)."""
    if INTERPRETING:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128})]
    shapes = [(16, 64, 128, 4), (16, 128, 64, 4), (16, 32, 256, 4), (32, 64, 64, 4), (64, 64, 64, 4), (128, 128, 32, 8)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=stages)
        for m, n, k, w in shapes
        for stages in (2, 3)
    ]


@triton.jit
def x_tile(x_ptr, rm, rk, M, K):
    """Rows rm, columns rk of x (M, K), zero outside."""
    return tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)


@triton.jit
def accumulate(acc, x, w, IEEE: tl.constexpr):
    """acc + x @ w^T; fp32 inputs in IEEE precision (not TF32) so kernels match their references."""
    if IEEE:
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    else:
        acc += tl.dot(x, tl.trans(w))
    return acc


@triton.jit
def store_output(acc, bias_ptr, out_ptr, rm, rn, M, N, HAS_BIAS: tl.constexpr):
    """out[rm, rn] = acc (+ bias[rn])."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def launch_linear(kernel, x: torch.Tensor, out_features: int, bias: torch.Tensor | None, **weight) -> torch.Tensor:
    """Run ``kernel`` over x flattened to (M, K), the weight's tensors and sizes passed by name;
    returns (..., out_features) in x's dtype."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    rows, k = flat.shape
    out = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)

    def grid(cfg):
        return (triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(out_features, cfg["BLOCK_N"]))

    kernel[grid](
        x_ptr=flat,
        bias_ptr=bias if bias is not None else flat,  # never read when HAS_BIAS is false
        out_ptr=out,
        M=rows,
        N=out_features,
        K=k,
        HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32,
        **weight,
    )
    return out.reshape(*x.shape[:-1], out_features)
