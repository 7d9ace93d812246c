"""Decode attention in one pass over the cache (flash-decoding's online softmax), one program per query head.

``decode_attention``: q (B, H, 1, Dk) over k (B, Hkv, T, Dk), v (B, Hkv, T, Dv); query
head h reads KV head h // (H / Hkv), so GQA reads each KV head once per query head and
MLA's absorbed form (Hkv = 1, Dv != Dk) is the same kernel. ``quantized_decode_attention``
first streams a KIVI cache: keys' codes per channel with a scale and zero per group of
``k_group`` tokens, values' codes per token with one per group of ``v_group`` channels,
``8 // bits`` codes a byte; each tile is dequantized in registers and never written
back. The full-precision recent tokens follow in the same online softmax. ``keep`` (B, T)
is the step's attention mask over the cached tokens (padding, a window): batch b attends
token t where keep[b, t].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRETING


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


@triton.jit
def _online_softmax_step(q, k, v, valid, m_i, l_i, acc, scale):
    """Fold one tile (k (BT, Dk), v (BT, Dv), valid (BT,)) into the running max, sum and output."""
    s = tl.where(valid, tl.sum(q[None, :] * k, axis=1) * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=0))
    p = tl.exp(s - m_new)
    alpha = tl.exp(m_i - m_new)
    return m_new, l_i * alpha + tl.sum(p, axis=0), acc * alpha + tl.sum(p[:, None] * v, axis=0)


@triton.jit
def _codes(packed_ptr, t, d, width, bits: tl.constexpr, mask):
    """Code (t, d) of a (T, D * bits / 8) byte array: byte d // per, bits (d % per) * bits."""
    per: tl.constexpr = 8 // bits
    byte = tl.load(packed_ptr + t * width + d // per, mask=mask, other=0).to(tl.int32)
    return ((byte >> ((d % per) * bits)) & ((1 << bits) - 1)).to(tl.float32)


def _configs() -> list[triton.Config]:
    """Token tiles and warps; the interpreter (CI) takes one small tile."""
    if INTERPRETING:
        return [triton.Config({"BLOCK_T": 16})]
    return [triton.Config({"BLOCK_T": t}, num_warps=w) for t in (32, 64, 128) for w in (2, 4, 8)]


@triton.autotune(configs=_configs(), key=["DK", "DV", "QUANTIZED"])
@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, keep_ptr,
    kp_ptr, ks_ptr, kz_ptr, vp_ptr, vs_ptr, vz_ptr,
    heads, kv_heads, TK, TV, TQK, TQV, DK, DV, scale,
    k_width, v_width, k_stats, v_stats,
    HAS_KEEP: tl.constexpr, QUANTIZED: tl.constexpr, K_BITS: tl.constexpr, K_GROUP: tl.constexpr,
    V_BITS: tl.constexpr, V_GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """Token t is key ``t`` of the packed keys while t < TQK, else recent key t - TQK; values
    split at TQV (KIVI flushes keys a group at a time, values a token at a time)."""
    bh = tl.program_id(0)
    b, h = bh // heads, bh % heads
    kv = b * kv_heads + h // (heads // kv_heads)  # the (batch, KV head) this query head reads
    dk, dv = tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + bh * DK + dk, mask=dk < DK, other=0.0).to(tl.float32)
    m_i = tl.max(tl.full((BLOCK_T,), float("-inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros((BLOCK_T,), tl.float32), axis=0)
    acc = tl.zeros((BLOCK_DV,), tl.float32)
    total = TQK + TK
    for t0 in range(0, total, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        valid = t < total
        if HAS_KEEP:  # a constexpr branch: only one side is compiled
            valid = valid & (tl.load(keep_ptr + b * total + t, mask=valid, other=0) != 0)
        recent_k, recent_v = valid & (t >= TQK), valid & (t >= TQV)
        k_at = k_ptr + (kv * TK + (t - TQK)[:, None]) * DK + dk[None, :]
        v_at = v_ptr + (kv * TV + (t - TQV)[:, None]) * DV + dv[None, :]
        k = tl.load(k_at, mask=recent_k[:, None] & (dk[None, :] < DK), other=0.0).to(tl.float32)
        v = tl.load(v_at, mask=recent_v[:, None] & (dv[None, :] < DV), other=0.0).to(tl.float32)
        if QUANTIZED:
            in_k = (valid & (t < TQK))[:, None] & (dk[None, :] < DK)
            kc = _codes(kp_ptr + kv * TQK * k_width, t[:, None], dk[None, :], k_width, K_BITS, in_k)
            k_stat = kv * k_stats * DK + (t // K_GROUP)[:, None] * DK + dk[None, :]
            k += kc * tl.load(ks_ptr + k_stat, mask=in_k, other=0.0) + tl.load(kz_ptr + k_stat, mask=in_k, other=0.0)
            in_v = (valid & (t < TQV))[:, None] & (dv[None, :] < DV)
            vc = _codes(vp_ptr + kv * TQV * v_width, t[:, None], dv[None, :], v_width, V_BITS, in_v)
            v_stat = kv * TQV * v_stats + t[:, None] * v_stats + (dv // V_GROUP)[None, :]
            v += vc * tl.load(vs_ptr + v_stat, mask=in_v, other=0.0) + tl.load(vz_ptr + v_stat, mask=in_v, other=0.0)
        m_i, l_i, acc = _online_softmax_step(q, k, v, valid, m_i, l_i, acc, scale)
    tl.store(out_ptr + bh * DV + dv, acc / l_i, mask=dv < DV)


def _launch(q, k, v, scale, keep, quantized=None, **meta) -> torch.Tensor:
    if q.shape[2] != 1:
        raise ValueError(f"decode attention takes one query token, got q of shape {tuple(q.shape)}")
    batch, heads, _, dk = q.shape
    kv_heads, dv = k.shape[1], v.shape[-1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} KV heads evenly")
    q, k, v = (t.contiguous() for t in (q, k, v))
    out = torch.empty((batch, heads, 1, dv), dtype=torch.float32, device=q.device)
    quantized = quantized or dict.fromkeys(("kp", "ks", "kz", "vp", "vs", "vz"), q)
    has_keep = keep is not None
    total = meta.get("TQK", 0) + k.shape[2]
    keep = keep.reshape(-1, total).expand(batch, total).to(torch.int8).contiguous() if has_keep else q
    _decode_attention_kernel[(batch * heads,)](
        q, k, v, out, keep,
        *(quantized[name] for name in ("kp", "ks", "kz", "vp", "vs", "vz")),
        heads, kv_heads, k.shape[2], v.shape[2], meta.pop("TQK", 0), meta.pop("TQV", 0), dk, dv, scale,
        HAS_KEEP=has_keep, **meta,
        BLOCK_DK=_block(dk), BLOCK_DV=_block(dv),
    )  # fmt: skip
    return out.to(q.dtype)


def decode_attention(q, k, v, scale: float, keep=None) -> torch.Tensor:
    """The Triton implementation of ``graphpress::decode_attention``."""
    return _launch(q, k, v, scale, keep, k_width=0, v_width=0, k_stats=0, v_stats=0, QUANTIZED=False,
                   K_BITS=8, K_GROUP=1, V_BITS=8, V_GROUP=1)  # fmt: skip


def quantized_decode_attention(
    q, k_packed, k_scale, k_zero, v_packed, v_scale, v_zero, k_recent, v_recent,
    k_bits: int, k_group: int, v_bits: int, v_group: int, scale: float, keep=None,
) -> torch.Tensor:  # fmt: skip
    """The Triton implementation of ``graphpress::quantized_decode_attention``."""
    quantized = {
        "kp": k_packed, "ks": k_scale.float(), "kz": k_zero.float(),
        "vp": v_packed, "vs": v_scale.float(), "vz": v_zero.float(),
    }  # fmt: skip
    quantized = {name: t.contiguous() for name, t in quantized.items()}
    return _launch(
        q, k_recent, v_recent, scale, keep, quantized,
        TQK=k_packed.shape[2], TQV=v_packed.shape[2], k_width=k_packed.shape[3], v_width=v_packed.shape[3],
        k_stats=k_scale.shape[2], v_stats=v_scale.shape[3],
        QUANTIZED=True, K_BITS=k_bits, K_GROUP=k_group, V_BITS=v_bits, V_GROUP=v_group,
    )  # fmt: skip
