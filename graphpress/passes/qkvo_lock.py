"""qkvo_lock: MergeLock (Wang et al. 2025): lock attention weights against model merging.

Attention only ever uses the products ``q_h . k_g`` and ``W_o[:, h] v_g`` (g the KV head
that query head h reads), so for any invertible M_g and N_g

    q_h -> M_g^T q_h,   k_g -> M_g^-1 k_g          (scores unchanged: q^T M M^-1 k)
    v_g -> N_g v_g,     W_o[:, h] -> W_o[:, h] N_g^-1   (outputs unchanged)

applied to the rows of q/k/v_proj (and their biases) and the columns of o_proj leave the
model's function exactly as it was, while its weights move far from every other fine-tune
of the same base: averaging them, or adding task vectors, no longer composes.

RoPE rotates q and k between the projection and the product, so M_g must commute with
every RoPE rotation: per frequency pair (i, i + d/2) of the half-split layout, a 2x2 block
[[a, -b], [b, a]] (a scaled rotation). M_g^-T is then of the same form. A KV head's M_g
and N_g are shared by its query heads (GQA). Singular values are drawn log-uniform in
[c^-1/2, c^1/2], so every matrix has condition number at most ``max_condition``.

Invariant (tested): the locked graph equals the original to fp32 rounding (forward and
decode graphs, eager and onnxruntime); the matrices commute with RoPE and respect the bound.
"""

from __future__ import annotations

import math
import secrets

import torch

from ..errors import PassPreconditionError
from ..ir import Graph
from ..ir.blocks import AttentionBlock, head_norm, rope_of
from ..schema import QkvoLockConfig
from .base import LayerReport, Pass, PassReport, split_qkv_heads
from .context import PassContext
from .low_rank import relative_error
from .registry import register


@register
class QkvoLock(Pass):
    name = "qkvo_lock"
    Config = QkvoLockConfig

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        self.blocks(graph, ctx)

    def apply(self, graph: Graph, ctx: PassContext) -> PassReport:
        cfg: QkvoLockConfig = self.config
        report = self.new_report()
        gen = torch.Generator().manual_seed(self.key(ctx, report))
        worst = 1.0
        for block in self.blocks(graph, ctx):
            d, group = block.head_dim, block.group_size
            q_heads, k_heads, _ = split_qkv_heads(block, block.path)
            lock_qk = cfg.qk and not (head_norm(q_heads) or head_norm(k_heads))
            if cfg.qk and not lock_qk:
                report.warnings.append(
                    f"{block.path}: q/k not locked: a per-head norm (QK-norm) between the projections and the "
                    "scores does not commute with a lock matrix; values and outputs are locked"
                )
            rope = rope_of(q_heads) if block.rope and lock_qk else None
            rotary = (rope.rotary_dims or d) if rope is not None else 0
            interleaved = rope is not None and rope.interleaved
            qk = [lock_matrix(d, cfg.max_condition, gen, rotary, interleaved) for _ in range(block.num_kv_heads)]
            vo = [lock_matrix(d, cfg.max_condition, gen) for _ in range(block.num_kv_heads)]
            heads = {
                "q_proj": ([m.T for m in qk], group) if lock_qk else None,
                "k_proj": ([torch.linalg.inv(m) for m in qk], 1) if lock_qk else None,
                "v_proj": (vo, 1) if cfg.vo else None,
            }
            before = {name: graph.weight(getattr(block, name).weight).detach().clone() for name in heads}
            for name, per_head in heads.items():
                if per_head is not None:
                    lin = getattr(block, name)
                    transform_rows(graph, lin.weight, per_head[0], per_head[1], d)
                    if lin.bias is not None:
                        transform_rows(graph, lin.bias, per_head[0], per_head[1], d)
            if cfg.vo:
                transform_columns(graph, block.o_proj.weight, [torch.linalg.inv(n) for n in vo], group, d)
            used = (qk if lock_qk else []) + (vo if cfg.vo else [])
            conditions = [float(torch.linalg.cond(m)) for m in used]
            worst = max(worst, *conditions)
            moved = {
                name: relative_error(graph.weight(getattr(block, name).weight), before[name])
                for name, per_head in heads.items()
                if per_head is not None
            }
            report.layers.append(
                LayerReport(
                    block.path,
                    "locked",
                    0,
                    0,
                    {
                        "qk_matrices": block.num_kv_heads if lock_qk else 0,
                        "vo_matrices": block.num_kv_heads if cfg.vo else 0,
                        "rope_commuting": block.rope and lock_qk,
                        "rotary_dims": rotary,
                        "max_condition": max(conditions),
                        "weight_change": moved,
                    },
                )
            )
        report.details["worst_condition"] = worst
        return report

    def key(self, ctx: PassContext, report: PassReport) -> int:
        """The lock's key: the spec's ``seed``, else a fresh secret (never the public calibration seed)."""
        if self.config.seed is None:
            report.warnings.append(
                f"{ctx.spec_path}.seed: none given, so the lock drew a fresh random key; this run's locked weights "
                "cannot be reproduced (give a private seed to reproduce them)"
            )
            return secrets.randbits(63)
        if self.config.seed < 2**32:
            report.warnings.append(
                f"{ctx.spec_path}.seed: a key below 2^32 can be found by trying every key against the locked weights; "
                "use a random 63-bit key (python -c 'import secrets; print(secrets.randbits(63))')"
            )
        return self.config.seed

    def blocks(self, graph: Graph, ctx: PassContext) -> list[AttentionBlock]:
        blocks = self.selected_attention(graph, ctx)
        for block in blocks:
            check_layout(block, ctx, self.config.qk)
        return blocks


def check_layout(block: AttentionBlock, ctx: PassContext, qk: bool) -> None:
    """Heads must be contiguous row blocks of the projections, and RoPE (if any) half-split."""
    where = f"{ctx.spec_path}: attention block '{block.path or '<root>'}'"
    q, k, _ = split_qkv_heads(block, where)
    if block.o_proj.in_features != block.num_heads * block.head_dim:
        raise PassPreconditionError(
            f"{where}: o_proj reads {block.o_proj.in_features} features, not heads x head_dim = "
            f"{block.num_heads * block.head_dim}"
        )
    rope = rope_of(q) if block.rope else None
    if qk and block.rope and (rope is None or rope_of(k) is None or (rope.rotary_dims or block.head_dim) % 2):
        raise PassPreconditionError(
            f"{where}: RoPE is not of the form x*cos + rotate(x)*sin (half-split or interleaved pairs) on both q and "
            "k, so no query-key lock is known to commute with it; set qk: false to lock values and outputs only"
        )


def lock_matrix(
    d: int, max_condition: float, gen: torch.Generator, rotary: int = 0, interleaved: bool = False
) -> torch.Tensor:
    """A random invertible d x d matrix (float64) with condition number <= max_condition.

    ``rotary`` > 0: of the family commuting with half-split RoPE on the first ``rotary`` dims,
    a scaled rotation per frequency pair (i, i + rotary/2) there; the dims RoPE passes
    through (partial rotary) get any invertible block. ``interleaved``: the same for RoPE
    that pairs (2i, 2i + 1), by the fixed permutation taking pair (i, i + rotary/2) there.
    """
    spread = math.log(max_condition) / 2
    if rotary:
        half = rotary // 2
        scale = torch.exp((torch.rand(half, generator=gen, dtype=torch.float64) * 2 - 1) * spread)
        angle = torch.rand(half, generator=gen, dtype=torch.float64) * 2 * math.pi
        a, b = scale * angle.cos(), scale * angle.sin()
        m = torch.zeros(d, d, dtype=torch.float64)
        i = torch.arange(half)
        m[i, i], m[i, i + half], m[i + half, i], m[i + half, i + half] = a, -b, b, a
        if interleaved:
            order = torch.arange(rotary).view(2, half).T.reshape(-1)  # 0, half, 1, half + 1, ...
            m[:rotary, :rotary] = m[:rotary, :rotary][order][:, order]
        if rotary < d:
            m[rotary:, rotary:] = lock_matrix(d - rotary, max_condition, gen)
        return m
    left, right = (_orthogonal(d, gen) for _ in range(2))
    singular = torch.exp((torch.rand(d, generator=gen, dtype=torch.float64) * 2 - 1) * spread)
    return left @ torch.diag(singular) @ right.T


def _orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    """Haar-distributed orthogonal matrix (QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def transform_rows(graph: Graph, name: str, matrices: list[torch.Tensor], repeat: int, d: int) -> None:
    """Head h's rows (h*d .. h*d + d) of a weight or bias become ``matrices[h // repeat] @ rows``."""
    value = graph.weight(name).detach()
    heads = value.double().reshape(-1, d, *value.shape[1:])
    out = torch.stack([matrices[h // repeat] @ heads[h] for h in range(heads.shape[0])])
    graph.set_weight(name, out.reshape(value.shape).to(value.dtype))


def transform_columns(graph: Graph, name: str, matrices: list[torch.Tensor], repeat: int, d: int) -> None:
    """Head h's columns of a weight become ``columns @ matrices[h // repeat]``."""
    value = graph.weight(name).detach()
    heads = value.double().reshape(value.shape[0], -1, d)
    out = torch.stack([heads[:, h] @ matrices[h // repeat] for h in range(heads.shape[1])], dim=1)
    graph.set_weight(name, out.reshape(value.shape).to(value.dtype))
