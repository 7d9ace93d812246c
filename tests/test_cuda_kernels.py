"""Triton kernels of the fused ops (compressed linears, decode attention) against the ops' references.

Without a GPU they run in Triton's interpreter on the CPU (conftest sets TRITON_INTERPRET=1):
small shapes, odd sizes that leave partial tiles, GEMV (one row) and GEMM shapes.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from graphpress.backends.cuda.kernels.decode_attention import (  # noqa: E402
    decode_attention,
    quantized_decode_attention,
)
from graphpress.backends.cuda.kernels.int_linear import int_linear  # noqa: E402
from graphpress.backends.cuda.kernels.lut_linear import lut_linear  # noqa: E402
from graphpress.backends.cuda.kernels.nm_linear import nm_linear  # noqa: E402
from graphpress.backends.cuda.kernels.shift_linear import shift_linear  # noqa: E402
from graphpress.ir.ops import int_weight  # noqa: E402
from graphpress.ir.ops.bitstream import pack_bits  # noqa: E402
from graphpress.ir.ops.fused import (  # noqa: E402
    decode_attention_reference,
    int_linear_reference,
    lut_linear_reference,
    nm_linear_reference,
    quantized_decode_attention_reference,
    shift_linear_reference,
)
from graphpress.ir.ops.kv_quant import kv_quantize_reference  # noqa: E402
from graphpress.ir.ops.shift import encode, exponent_bits  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 48, 64), (1, 33, 40), (5, 20, 24), (17, 40, 96)]  # (rows of x, out, in): GEMV, ragged, GEMM


def on_device(*tensors):
    return [t.to(DEVICE) if t is not None else None for t in tensors]


def close(ours, ref):
    torch.testing.assert_close(ours.cpu(), ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("bits", [1, 3, 4, 5, 8])
@pytest.mark.parametrize("rows, out_features, in_features", SHAPES)
def test_lut_linear(bits, rows, out_features, in_features):
    gen = torch.Generator().manual_seed(bits * 100 + out_features)
    group_rows = 16 if out_features % 2 == 0 else out_features  # one codebook per 16 rows, or one for all
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=gen)
    indices = pack_bits(codes, bits)
    codebook = torch.randn(-(-out_features // group_rows), 2**bits, generator=gen)
    x, bias = torch.randn(rows, in_features, generator=gen), torch.randn(out_features, generator=gen)
    args = (bits, in_features, group_rows)
    for b in (bias, None):
        ref = lut_linear_reference(x, indices, codebook, *args, b)
        close(lut_linear(*on_device(x, indices, codebook), *args, *on_device(b)), ref)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 8), (5, 16)])
@pytest.mark.parametrize("rows, out_features, in_features", [(1, 48, 64), (5, 33, 48), (17, 20, 96)])
def test_nm_linear(n, m, rows, out_features, in_features):
    gen = torch.Generator().manual_seed(n * m + out_features)
    groups = out_features * in_features // m
    kept_at = torch.stack([torch.randperm(m, generator=gen)[:n].sort().values for _ in range(groups)])
    kept = in_features // m * n
    positions = pack_bits(kept_at.reshape(out_features, kept), int(math.log2(m)))
    values = torch.randn(out_features, kept, generator=gen)
    x, bias = torch.randn(rows, in_features, generator=gen), torch.randn(out_features, generator=gen)
    ref = nm_linear_reference(x, values, positions, n, m, in_features, bias)
    close(nm_linear(*on_device(x, values, positions), n, m, in_features, *on_device(bias)), ref)


@pytest.mark.parametrize("exponents", [(-6, 0), (-14, -2), (-1, 0)])
@pytest.mark.parametrize("rows, out_features, in_features", SHAPES)
def test_shift_linear(exponents, rows, out_features, in_features):
    low, high = exponents
    gen = torch.Generator().manual_seed(out_features - low)
    weight = torch.randn(out_features, in_features, generator=gen)
    weight[weight.abs() < 0.05] = 0  # exact zeros: code e = 0
    scale = weight.abs().amax(1)
    codes = pack_bits(encode(weight, scale, low, high), exponent_bits(low, high) + 1)
    x = torch.randn(rows, in_features, generator=gen)
    ref = shift_linear_reference(x, codes, scale, low, high, in_features, None)
    close(shift_linear(*on_device(x, codes, scale), low, high, in_features), ref)


@pytest.mark.parametrize("bits, block, symmetric", [(2, 16, False), (3, 32, False), (4, 16, True), (8, 64, False)])
@pytest.mark.parametrize("rows, out_features, in_features", SHAPES)
def test_int_linear(bits, block, symmetric, rows, out_features, in_features):
    """Blocks straddling tiles, a padded last block (in_features 40, 24), 3-bit codes across bytes."""
    gen = torch.Generator().manual_seed(bits * 7 + out_features)
    blocks = -(-in_features // block)
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=gen)
    zeros = None if symmetric else torch.randint(0, 2**bits, (out_features, blocks), generator=gen)
    scales = (torch.rand(out_features, blocks, generator=gen) + 0.1) / 2**bits  # weights of order 1
    stored = int_weight.pack(codes, scales, zeros, bits, block)
    tensors = (stored["q_codes"], stored["q_scales"], stored.get("q_zeros"))
    x, bias = torch.randn(rows, in_features, generator=gen), torch.randn(out_features, generator=gen)
    ref = int_linear_reference(x, *tensors, bits, block, in_features, bias)
    close(int_linear(*on_device(x, *tensors), bits, block, in_features, *on_device(bias)), ref)


def test_leading_dimensions_and_fp16_inputs():
    """x (B, S, in) as a linear sees it; half precision inputs accumulate in fp32."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (32, 64), generator=gen)
    indices, codebook = pack_bits(codes, 4), torch.randn(2, 16, generator=gen)
    x = torch.randn(2, 3, 64, generator=gen)
    ref = lut_linear_reference(x, indices, codebook, 4, 64, 16, None)
    ours = lut_linear(*on_device(x, indices, codebook), 4, 64, 16)
    assert ours.shape == (2, 3, 32)
    close(ours, ref)
    half = lut_linear(*on_device(x.half(), indices, codebook.half()), 4, 64, 16)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.cpu().float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "batch, heads, kv_heads, tokens, dk, dv",
    [(2, 8, 2, 37, 32, 32), (1, 4, 1, 19, 40, 24), (1, 2, 2, 1, 16, 16), (3, 6, 3, 70, 8, 8)],
    ids=["gqa", "mla-absorbed", "one-token", "ragged"],
)
def test_decode_attention(batch, heads, kv_heads, tokens, dk, dv):
    gen = torch.Generator().manual_seed(tokens)
    q = torch.randn(batch, heads, 1, dk, generator=gen)
    k, v = (
        torch.randn(batch, kv_heads, tokens, dk, generator=gen),
        torch.randn(batch, kv_heads, tokens, dv, generator=gen),
    )
    close(decode_attention(*on_device(q, k, v), 0.3), decode_attention_reference(q, k, v, 0.3, None))
    keep = key_mask(batch, tokens, gen)
    close(decode_attention(*on_device(q, k, v), 0.3, *on_device(keep)), decode_attention_reference(q, k, v, 0.3, keep))


def key_mask(batch: int, tokens: int, gen) -> torch.Tensor:
    """(batch, tokens) bool: row 0 a causal prefix, the others left padding and random holes; never empty."""
    keep = torch.rand(batch, tokens, generator=gen) < 0.7
    keep[0] = torch.arange(tokens) <= tokens // 2
    keep[:, -1] = True
    return keep


@pytest.mark.parametrize(
    "k_bits, v_bits, k_group, v_group, quantized, recent",
    [(2, 2, 16, 16, 32, 5), (4, 8, 8, 32, 24, 0), (8, 4, 32, 8, 64, 3), (2, 4, 16, 16, 0, 4)],
    ids=["2-bit", "no-window", "8-bit-keys", "all-recent"],
)
@pytest.mark.parametrize("value_lead", [0, 3])  # values flush a token at a time, keys a group at a time
def test_quantized_decode_attention(k_bits, v_bits, k_group, v_group, quantized, recent, value_lead):
    gen = torch.Generator().manual_seed(quantized + recent)
    batch, heads, kv_heads, dim = 2, 4, 2, 32
    lead = min(value_lead, recent)
    q = torch.randn(batch, heads, 1, dim, generator=gen)
    old_k = torch.randn(batch, kv_heads, quantized, dim, generator=gen)
    old_v = torch.randn(batch, kv_heads, quantized + lead, dim, generator=gen)
    keys = kv_quantize_reference(old_k, k_bits, k_group, True, False)
    values = kv_quantize_reference(old_v, v_bits, v_group, False, False)
    new_k = torch.randn(batch, kv_heads, recent, dim, generator=gen)
    new_v = torch.randn(batch, kv_heads, recent - lead, dim, generator=gen)
    args = (*keys, *values, new_k, new_v)
    sizes = (k_bits, k_group, v_bits, v_group, 0.2)
    ours = quantized_decode_attention(*on_device(q, *args), *sizes)
    close(ours, quantized_decode_attention_reference(q, *args, *sizes, None))
    keep = key_mask(batch, quantized + recent, gen)
    ours = quantized_decode_attention(*on_device(q, *args), *sizes, *on_device(keep))
    close(ours, quantized_decode_attention_reference(q, *args, *sizes, keep))


def test_decode_attention_refuses_more_than_one_query_token():
    q, k = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="one query token"):
        decode_attention(q, k, k, 1.0)
