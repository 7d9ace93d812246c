"""gqa_to_mla: grouped-query attention -> multi-head latent attention (TransMLA, Meng et al. 2025).

GQA already is MLA: with W_down = [W_k; W_v] the "latent" is [K; V], and the up-projection
copies each KV head to its query heads. Rotating that latent basis changes nothing, so we
choose the rotation that makes truncation cheapest: the PCA of the calibration activations
[alpha K; V] (alpha balances the norms of K and V so neither dominates the joint PCA). With
U_r the top-r principal directions,

    c = U_r^T [alpha W_k; W_v] x   (cached: r numbers per token)
    K ~= (U_r[:D] / alpha) c,   V ~= U_r[D:] c          (D = kv_heads * head_dim)

RoPE rotates K per position, so it cannot be folded into a cached latent. Two ways out:

* ``after_up_projection``: cache c before RoPE; every step rebuilds K for all cached
  positions and rotates it (the RoPE tables for the cache slots are recomputed by copying
  the graph's own cos/sin subgraph with the slot positions). Exact RoPE at any rank.
* ``decoupled`` (TransMLA's RoRoPE): RoPE turns the (i, i + d/2) pair of every head by the
  same angle for frequency i, so an orthogonal mix of *heads* per frequency commutes with
  it. The PCA across KV heads per frequency concentrates the key energy in a few rotated
  components; the ``rope.dims`` strongest keep RoPE as one key shared by all heads (cached
  after rotation, as DeepSeek-V2 does), the rest lose RoPE and join V in the latent PCA.
  Each query head gets the same per-frequency mix, so scores are unchanged except for the
  RoPE dropped on the weak components. A frequency is a pair of dims in each head, (i, i + r/2)
  half-split or (2i, 2i + 1) interleaved, so the pairing only decides which rows are mixed;
  with partial rotary the dims past the first r carry no RoPE and join the latent as they are.
  Without RoPE on the latent part, W_uk folds into
  the query projection and W_uv into the output projection (the *absorbed* form):

      score_h = (W_uk^T q_h)^T c + q_rope_h^T k_rope,     o = W_o [W_uv softmax(score) c]_h

Invariants (tested): at full rank, after_up_projection matches the original to 1e-5 (fp32)
in forward and decode graphs, and so does decoupled with rope.dims = kv_heads * rotary dims;
absorbed and non-absorbed forms agree; a decode graph's cache becomes the latent (and the
RoPE key) per converted layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from ..errors import PassPreconditionError
from ..ir import Graph, SubgraphBuilder
from ..ir.blocks import VIEWS, AttentionBlock, Rope, head_norm, rope_of
from ..ir.decode import CacheEntry
from ..ir.graph import ancestors
from ..progress import track
from ..schema import GqaToMlaConfig
from .base import LayerReport, Pass, PassReport, split_qkv_heads
from .context import PassContext
from .registry import register

aten = torch.ops.aten


@dataclass(frozen=True)
class Site:
    """One attention block as this pass needs it: where K and V come from and where they go."""

    block: AttentionBlock
    x: fx.Node
    q_rope: Rope | None  # None: no RoPE (learned or no positions, e.g. GPT-2)
    k_rope: Rope | None
    k_heads: fx.Node  # K split into heads, (B, KV, S, head_dim), before RoPE
    k_full: fx.Node  # K as repeat_kv/SDPA read it: the grown cache (decode) or the rotated K
    v_full: fx.Node
    k_cache: CacheEntry | None
    v_cache: CacheEntry | None


@dataclass
class Plan:
    """The new weights of one block (float64, converted on use)."""

    rank: int
    rope_dims: int
    w_down: torch.Tensor  # (r, d)
    k_up: torch.Tensor  # (D_nope, r): K (or its non-RoPE part) from the latent
    v_up: torch.Tensor  # (D, r)
    energy_kept: float
    k_rope: torch.Tensor | None = None  # (dr, d) decoupled: shared RoPE key
    q_rope: torch.Tensor | None = None  # (H * dr, d)
    q_nope: torch.Tensor | None = None  # (H * D_nope, d)
    rope_freqs: torch.Tensor | None = None  # (dr,) column of the cos/sin tables for each RoPE dim
    position_energy_kept: float = 1.0


@register
class GqaToMla(Pass):
    name = "gqa_to_mla"
    Config = GqaToMlaConfig

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        for site in self.sites(graph, ctx):
            self.check_ranks(site, ctx)

    def apply(self, graph: Graph, ctx: PassContext) -> PassReport:
        cfg: GqaToMlaConfig = self.config
        report = self.new_report()
        sites = self.sites(graph, ctx)
        inputs = ctx.linear_inputs(graph, [s.block.k_proj for s in sites])
        tables = ctx.column_means(
            graph, sorted({n.name for s in sites if s.q_rope for n in (s.q_rope.cos, s.q_rope.sin)})
        )
        cache_before = graph.cache.bytes_per_token if graph.cache is not None else None
        absorb = cfg.rope.mode == "decoupled" and cfg.absorb is not False
        for site in track(sites, f"{ctx.spec_path} gqa_to_mla: blocks"):
            block = site.block
            rank, rope_dims = self.check_ranks(site, ctx)
            gram, weights = affine_maps(graph, block, inputs[block.k_proj.node.name])
            if cfg.rope.mode == "after_up_projection":
                plan = plan_after_up(weights["k_proj"], weights["v_proj"], gram, rank, cfg.balance_kv)
                rewrite_after_up(graph, site, plan)
            else:
                cos, sin = tables[site.q_rope.cos.name], tables[site.q_rope.sin.name]
                damage = 1 - (cos.square() + sin.square())
                plan = plan_decoupled(
                    block,
                    site.k_rope,
                    weights,
                    gram,
                    rank,
                    rope_dims,
                    cfg.balance_kv,
                    damage,
                    cfg.rope.freqfold,
                    cfg.rope.per_frequency,
                )
                o_weight = graph.weight(block.o_proj.weight).double()
                if block.o_proj.bias is not None:
                    o_weight = torch.cat([o_weight, graph.weight(block.o_proj.bias).double()[:, None]], 1)
                rewrite_decoupled(graph, site, plan, o_weight if absorb else None)
            before = sum(lin.params for lin in (block.q_proj, block.k_proj, block.v_proj, block.o_proj))
            report.layers.append(
                LayerReport(
                    block.path,
                    "converted",
                    before,
                    before,  # filled in below, once unused weights are dropped
                    {
                        "kv_rank": rank,
                        "rope_dims": plan.rope_dims,
                        "cache_numbers_per_token": (2 * block.num_kv_heads * block.head_dim, rank + plan.rope_dims),
                        "kv_energy_kept": round(plan.energy_kept, 6),
                        "position_energy_kept": round(plan.position_energy_kept, 6),
                        "frequencies_turned": _frequencies_turned(plan),
                        "absorbed": absorb,
                    },
                )
            )
        graph.remove_unused_tensors()
        new_params = _attention_params(graph, [s.block.path for s in sites])
        for layer in report.layers:
            layer.params_after = new_params.get(layer.path, 0)
        report.details = {
            "rope": cfg.rope.mode,
            "absorbed": absorb,
            "kv_cache_bytes_per_token": [cache_before, graph.cache.bytes_per_token if graph.cache else None],
        }
        return report

    # ------------------------------------------------------------------ analysis
    def sites(self, graph: Graph, ctx: PassContext) -> list[Site]:
        sites = [find_site(graph, b, ctx) for b in self.selected_attention(graph, ctx)]
        for site in sites:
            obstacle = decoupled_obstacle(site) if self.config.rope.mode == "decoupled" else None
            if obstacle:
                raise PassPreconditionError(
                    f"{ctx.spec_path}.rope.mode: attention block '{site.block.path}' {obstacle}"
                )
        return sites

    def check_ranks(self, site: Site, ctx: PassContext) -> tuple[int, int]:
        cfg: GqaToMlaConfig = self.config
        block = site.block
        d = block.num_kv_heads * block.head_dim
        rope_dims = 0
        if cfg.rope.mode == "decoupled":
            rotary = block.num_kv_heads * rotary_dims(site.k_rope, block.head_dim)
            rope_dims = cfg.rope.dims if cfg.rope.dims is not None else min(block.head_dim, rotary)
            if rope_dims > rotary:
                raise PassPreconditionError(
                    f"{ctx.spec_path}.rope.dims: {rope_dims} exceeds the {rotary} rotary key dimensions of "
                    f"{block.path} ({block.num_kv_heads} KV heads x {rotary // block.num_kv_heads})"
                )
        full = 2 * d - rope_dims
        rank = cfg.kv_rank if cfg.kv_rank is not None else full
        if cfg.kv_ratio is not None:
            rank = int(cfg.kv_ratio * 2 * d) - rope_dims
            rank -= rank % 2 if rank > 1 else 0
            if rank < 1:
                raise PassPreconditionError(
                    f"{ctx.spec_path}.kv_ratio: {cfg.kv_ratio} of {block.path}'s 2 x {d} K/V numbers per token "
                    f"leaves no latent beside rope.dims {rope_dims}; raise kv_ratio or lower rope.dims"
                )
        if rank > full:
            raise PassPreconditionError(
                f"{ctx.spec_path}.kv_rank: {rank} exceeds what exactness needs for {block.path}: "
                f"2 x {block.num_kv_heads} KV heads x {block.head_dim}"
                + (f" - rope.dims {rope_dims}" if rope_dims else "")
                + f" = {full}"
            )
        return rank, rope_dims


def _frequencies_turned(plan: Plan) -> int | None:
    """How many distinct RoPE frequencies the new RoPE key turns at (decoupled mode)."""
    if plan.rope_freqs is None:
        return None
    return len(set(plan.rope_freqs[: plan.rope_dims // 2].tolist()))


def decoupled_obstacle(site: Site) -> str | None:
    """What in a block stops the decoupled (RoRoPE, absorbed) form, or None."""
    block, rope = site.block, site.k_rope
    if block.eager:
        capped = " with soft-capped scores" if block.softcap else ""
        return (
            f"is written out as matmul/softmax/matmul{capped}; 'decoupled' builds a new SDPA, which would drop "
            "that; 'after_up_projection' keeps it"
        )
    if rope is None:
        return "has no RoPE; 'decoupled' splits RoPE off the latent, use 'after_up_projection'"
    if any(map(head_norm, split_qkv_heads(block, "")[:2])):
        return (
            "normalises each q/k head (QK-norm), which RoRoPE's mixing of KV heads and the absorbed form do not "
            "commute with; 'after_up_projection' applies the norm to the rebuilt keys (exact at full rank)"
        )
    return None


def rotary_dims(rope: Rope | None, head_dim: int) -> int:
    """How many of a head's dims RoPE turns (a prefix of them: all but with partial rotary)."""
    return 0 if rope is None else rope.rotary_dims or head_dim


def rope_pairs(rope: Rope, head_dim: int) -> list[tuple[int, int]]:
    """The (real, imaginary) dims of each frequency in a head, which are also its cos/sin table columns."""
    r = rotary_dims(rope, head_dim)
    if rope.interleaved:
        return [(2 * i, 2 * i + 1) for i in range(r // 2)]
    return [(i, i + r // 2) for i in range(r // 2)]


def _attention_params(graph: Graph, paths: list[str]) -> dict[str, int]:
    counts = dict.fromkeys(paths, 0)
    for name in graph.program.graph_signature.parameters:
        for path in paths:
            if name.startswith(path + "."):
                counts[path] += graph.stored(name).numel()
    return counts


def find_site(graph: Graph, block: AttentionBlock, ctx: PassContext) -> Site:
    where = f"{ctx.spec_path}: attention block '{block.path or '<root>'}'"
    x = block.k_proj.node.args[0]
    if block.v_proj.node.args[0] is not x or block.q_proj.node.args[0] is not x:
        raise PassPreconditionError(f"{where}: q_proj, k_proj and v_proj do not read the same input")
    if block.head_dim % 2:
        raise PassPreconditionError(f"{where}: head_dim {block.head_dim} is odd; RoPE needs pairs")
    q_heads, k_heads, v_heads = split_qkv_heads(block, where)
    q_rope, k_rope = rope_of(q_heads), rope_of(k_heads)
    if block.rope and (q_rope is None or k_rope is None):
        raise PassPreconditionError(
            f"{where}: no RoPE of the form x*cos + rotate(x)*sin (half-split or interleaved pairs) on both q and k; "
            "other position encodings are not handled; exclude this block from targets"
        )
    k_full, k_cache = _cache_concat(graph, k_rope.out if k_rope is not None else k_heads)
    v_full, v_cache = _cache_concat(graph, v_heads)
    if graph.cache is not None and (k_cache is None or v_cache is None):
        raise PassPreconditionError(f"{where}: K/V are not appended to cache inputs of this decode graph")
    return Site(block, x, q_rope, k_rope, k_heads, k_full, v_full, k_cache, v_cache)


def _cache_concat(graph: Graph, node: fx.Node) -> tuple[fx.Node, CacheEntry | None]:
    """(cat(past, node) on the sequence axis, its cache entry) in decode graphs; (node, None) otherwise."""
    for user in node.users:
        if user.op == "call_function" and user.target is aten.cat.default and len(user.args[0]) == 2:
            past, new = user.args[0]
            entry = graph.cache_source(past)
            if new is node and entry is not None:
                return user, entry
    return node, None


# ---------------------------------------------------------------------- the math
def affine_maps(graph: Graph, block: AttentionBlock, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The input's second moments and the q/k/v maps (float64); with biases, on the affine input [x; 1].

    A projection with a bias is the linear map [W | b] of [x; 1], so the joint PCA, RoRoPE's
    mixing and the absorption all work unchanged on [W | b] with the moments of [x; 1]: every
    derived map comes out affine too (its last column is its bias, see ``_Builder.dense``).
    At full rank the latent spans K and V with their biases: still exact.
    """
    projections = {name: getattr(block, name) for name in ("q_proj", "k_proj", "v_proj")}
    weights = {name: graph.weight(lin.weight).double() for name, lin in projections.items()}
    if not any(lin.bias for lin in projections.values()):
        return inputs.gram.double(), weights
    for name, lin in projections.items():
        bias = graph.weight(lin.bias).double() if lin.bias else torch.zeros(lin.out_features, dtype=torch.float64)
        weights[name] = torch.cat([weights[name], bias[:, None]], 1)
    return inputs.affine_gram(), weights


def joint_pca(parts: list[torch.Tensor], gram: torch.Tensor, rank: int, balance: bool):
    """PCA of the activations [alpha P_0 x; P_1 x] (alpha balancing norms); (W_down, [ups], energy kept)."""
    norms = [torch.einsum("ij,jk,ik->", w, gram, w).clamp_min(1e-30) for w in parts]
    alpha = (norms[1] / norms[0]).sqrt() if balance and parts[0].numel() else torch.tensor(1.0, dtype=gram.dtype)
    stacked = torch.cat([alpha * parts[0], parts[1]])
    cov = stacked @ gram @ stacked.T
    vals, vecs = torch.linalg.eigh((cov + cov.T) / 2)
    vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
    u = vecs[:, :rank]
    energy = (vals[:rank].sum() / vals.sum()).item() if vals.sum() > 0 else 1.0
    split = parts[0].shape[0]
    return u.T @ stacked, (u[:split] / alpha, u[split:]), energy


def plan_after_up(w_k: torch.Tensor, w_v: torch.Tensor, gram: torch.Tensor, rank: int, balance: bool) -> Plan:
    w_down, (k_up, v_up), energy = joint_pca([w_k, w_v], gram, rank, balance)
    return Plan(rank, 0, w_down, k_up, v_up, energy)


def plan_decoupled(
    block: AttentionBlock,
    rope: Rope,
    w: dict[str, torch.Tensor],
    gram: torch.Tensor,
    rank: int,
    rope_dims: int,
    balance: bool,
    damage: torch.Tensor,
    fold: int = 1,
    per_frequency: bool = False,
) -> Plan:
    """RoRoPE: per frequency, PCA across KV heads; the rope_dims/2 components that matter most keep RoPE.

    A component (frequency i, rotated head j) matters by the score variance it carries,
    E|q_ij|^2 E|k_ij|^2 summed over query heads, times ``damage[i]``: how far RoPE at that
    frequency moves over the calibration positions (1 - |mean e^{i theta_i p}|^2; ~0 for
    frequencies too slow to turn within the context, where dropping RoPE costs nothing).
    Dims RoPE does not turn (partial rotary) follow the dropped components into the latent.

    FreqFold (TransMLA v3, ``fold`` > 1): the PCA runs across the KV heads *and* ``fold``
    neighbouring frequencies at once, treating them as one, so fewer components hold more
    of the key energy; a component then turns at the frequency it weighs most. Exact when
    the folded frequencies are equal; otherwise RoPE is off on the others by their spread.

    ``per_frequency`` keeps at most one component per frequency, the strongest (TransMLA's
    choice: its RoPE key is a "head 0" of the rotated keys). With rope_dims = head_dim that key
    turns like one original head, frequency for frequency: the layout DeepSeek's MLA runs.
    """
    n_kv, hd, heads, group = block.num_kv_heads, block.head_dim, block.num_heads, block.group_size
    d, pairs = n_kv * hd, rope_pairs(rope, hd)
    cov_k = w["k_proj"] @ gram @ w["k_proj"].T
    cov_q = w["q_proj"] @ gram @ w["q_proj"].T
    groups = [list(range(len(pairs)))[f : f + fold] for f in range(0, len(pairs), fold)]
    candidates, mixes = [], []
    for i, members in enumerate(groups):
        re = [g * hd + pairs[b][0] for g in range(n_kv) for b in members]
        im = [g * hd + pairs[b][1] for g in range(n_kv) for b in members]
        cov = cov_k[re][:, re] + cov_k[im][:, im]
        vals, vecs = torch.linalg.eigh((cov + cov.T) / 2)
        vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
        mixes.append((re, im, vecs))
        for j in range(vecs.shape[1]):
            # FreqFold: a component mixing frequencies turns at the one it weighs most
            weight = vecs[:, j].square().reshape(n_kv, len(members)).sum(0)
            f = members[int(weight.argmax())]
            a, p = pairs[f]
            # query energy on component (i, j): query head h sees it through its KV head's coefficients
            q_energy = sum(
                vecs[(h // group) * len(members) + k, j].square()
                * (
                    cov_q[h * hd + pairs[b][0], h * hd + pairs[b][0]]
                    + cov_q[h * hd + pairs[b][1], h * hd + pairs[b][1]]
                )
                for h in range(heads)
                for k, b in enumerate(members)
            )
            score = (damage[a].clamp_min(0) * vals[j] * q_energy).item()
            candidates.append((-score, -vals[j].item(), i, j, f))
    candidates.sort()
    chosen, turning = [], set()
    for c in candidates:  # the strongest rope_dims/2, at most one per frequency when asked
        if len(chosen) < rope_dims // 2 and not (per_frequency and c[-1] in turning):
            chosen.append(c)
            turning.add(c[-1])
    kept = sorted((i, j, f) for *_, i, j, f in chosen)
    picked = {(i, j) for _, _, i, j, _ in chosen}
    dropped = sorted((i, j) for _, _, i, j, _ in candidates if (i, j) not in picked)
    total = -sum(c[0] for c in candidates)
    position_energy = -sum(c[0] for c in chosen) / total if total > 0 else 1.0

    def row(i: int, j: int, imaginary: bool) -> torch.Tensor:
        re, im, vecs = mixes[i]
        r = torch.zeros(d, dtype=gram.dtype)
        r[im if imaginary else re] = vecs[:, j]
        return r

    rows = [row(i, j, False) for i, j, _ in kept] + [row(i, j, True) for i, j, _ in kept]
    rows += [row(i, j, part) for i, j in dropped for part in (False, True)]
    unturned = [g * hd + t for g in range(n_kv) for t in range(2 * len(pairs), hd)]
    rows += list(torch.eye(d, dtype=gram.dtype)[unturned])
    mix = torch.stack(rows)  # orthogonal (D x D): rotated key = mix @ k
    k_rot = mix @ w["k_proj"]
    group = block.group_size
    q_rot = torch.stack(
        [mix[:, (h // group) * hd : (h // group + 1) * hd] @ w["q_proj"][h * hd : (h + 1) * hd] for h in range(heads)]
    )  # (H, D, d): each query head against the rotated key of its KV head
    w_down, (k_up, v_up), energy = joint_pca([k_rot[rope_dims:], w["v_proj"]], gram, rank, balance)
    freqs = torch.tensor([pairs[f][0] for *_, f in kept] + [pairs[f][1] for *_, f in kept], dtype=torch.long)
    return Plan(
        rank,
        rope_dims,
        w_down,
        k_up,
        v_up,
        energy,
        k_rope=k_rot[:rope_dims],
        q_rope=q_rot[:, :rope_dims].reshape(heads * rope_dims, q_rot.shape[-1]),
        q_nope=q_rot[:, rope_dims:].reshape(heads * (d - rope_dims), q_rot.shape[-1]),
        rope_freqs=freqs,
        position_energy_kept=position_energy,
    )


# ---------------------------------------------------------------------- rewriting
class _Builder(SubgraphBuilder):
    """SubgraphBuilder plus the few tensor-shape helpers attention needs (core ATen ops only)."""

    def __init__(self, graph: Graph, path: str, origin: fx.Node, dtype: torch.dtype):
        super().__init__(graph, path, origin)
        self.dtype = dtype

    def dense(self, x, module: str, weight: torch.Tensor) -> fx.Node:
        """A linear of ``x``; a weight with one column more than ``x`` has features is affine: [W | b]."""
        if weight.shape[-1] == x.meta["val"].shape[-1] + 1:
            w, bias = weight[:, :-1], weight[:, -1]
            return self.linear(x, module, w.to(self.dtype).contiguous(), bias.to(self.dtype).contiguous())
        return self.linear(x, module, weight.to(self.dtype).contiguous())

    def split_heads(self, x, heads: int) -> fx.Node:
        """(B, S, heads * e) -> (B, heads, S, e)."""
        e = x.meta["val"].shape[-1] // heads
        view = self.call(aten.view.default, x, [self.size(x, 0), self.size(x, 1), heads, e])
        return self.call(aten.transpose.int, view, 1, 2)

    def merge_heads(self, x) -> fx.Node:
        """(B, H, S, e) -> (B, S, H * e)."""
        b, h, _, e = x.meta["val"].shape
        t = self.call(aten.transpose.int, x, 1, 2)
        return self.call(aten.reshape.default, t, [self.size(x, 0), self.size(x, 2), int(h) * int(e)])

    def broadcast_heads(self, x, heads: int) -> fx.Node:
        """(B, S, e) -> (B, heads, S, e), one tensor shared by every head."""
        return self.call(aten.expand.default, self.call(aten.unsqueeze.default, x, 1), [-1, heads, -1, -1])

    def repeat_heads(self, x, group: int) -> fx.Node:
        """(B, KV, S, e) -> (B, KV * group, S, e): each KV head serves ``group`` query heads."""
        b, kv, _, e = x.meta["val"].shape
        wide = self.call(aten.expand.default, self.call(aten.unsqueeze.default, x, 2), [-1, -1, group, -1, -1])
        return self.call(aten.reshape.default, wide, [self.size(x, 0), int(kv) * group, self.size(x, 2), int(e)])

    def rope(self, x, cos, sin) -> fx.Node:
        half = x.meta["val"].shape[-1] // 2
        rotated = self.call(
            aten.cat.default,
            [
                self.call(aten.neg.default, self.call(aten.slice.Tensor, x, -1, half, 2 * half)),
                self.call(aten.slice.Tensor, x, -1, 0, half),
            ],
            -1,
        )
        return self.call(aten.add.Tensor, self.call(aten.mul.Tensor, x, cos), self.call(aten.mul.Tensor, rotated, sin))


def _first_user(nodes: list[fx.Node]) -> fx.Node:
    order = _order(nodes[0].graph)
    users = [u for n in nodes for u in n.users if u.op != "output"]
    return min(users, key=order.__getitem__)


def _grow(graph: Graph, site: Site, entries: list[tuple[CacheEntry, fx.Node]], build) -> None:
    """Make ``entries`` (new cache entry, this step's value) the block's cache; ``build(full values)`` rewires."""
    if graph.cache is None:
        build([new for _, new in entries])
        return

    def grown(placeholders: list[fx.Node]) -> list[fx.Node]:
        builder = SubgraphBuilder(graph, site.block.path, site.k_full)
        with graph.fx.inserting_after(max((new for _, new in entries), key=_order(graph).__getitem__)):
            full = [builder.call(aten.cat.default, [ph, new], 1) for ph, (_, new) in zip(placeholders, entries)]
        build(full)
        return full

    graph.replace_cache_entries([site.k_cache.name, site.v_cache.name], [e for e, _ in entries], grown)


def _order(graph: Graph | fx.Graph) -> dict[fx.Node, int]:
    nodes = graph.fx.nodes if isinstance(graph, Graph) else graph.nodes
    return {n: i for i, n in enumerate(nodes)}


def _latent_entry(site: Site, kind: str, width: int) -> CacheEntry:
    base = site.k_cache.name.rsplit(".", 1)[0]
    return CacheEntry(f"{base}.{kind}", kind, (None, None, width), 1, site.k_cache.dtype)


def rewrite_after_up(graph: Graph, site: Site, plan: Plan) -> None:
    block = site.block
    dtype = graph.stored(block.k_proj.weight).dtype
    b = _Builder(graph, block.path, block.k_proj.node, dtype)
    with graph.fx.inserting_before(_first_user([site.k_full, site.v_full])):
        latent = b.dense(site.x, "kv_down", plan.w_down)
    entries = [(_latent_entry(site, "latent", plan.rank), latent)] if graph.cache is not None else [(None, latent)]

    def build(full: list[fx.Node]) -> None:
        (c,) = full
        with graph.fx.inserting_before(_first_user([site.k_full, site.v_full])):
            k = _rebuilt_keys(graph, b, site, b.dense(c, "k_up", plan.k_up), c)
            v = b.split_heads(b.dense(c, "v_up", plan.v_up), block.num_kv_heads)
        _replace_uses(site.k_full, k)
        _replace_uses(site.v_full, v)

    _grow(graph, site, entries, build)
    graph.eliminate_dead_code()


def _rebuilt_keys(graph: Graph, b: _Builder, site: Site, keys: fx.Node, latent: fx.Node) -> fx.Node:
    """(B, KV, L, head_dim) keys from the up-projected latent, through the graph's own ops.

    Whatever the block did between viewing k_proj's output as heads and handing K to the
    attention (a QK-norm before or after the transpose; RoPE, half-split, partial or
    interleaved) is copied onto the rebuilt keys, with RoPE's tables recomputed for the
    cached slots: these ops act per slot, so they are as exact on the latent's keys as on
    the original ones.
    """
    block = site.block
    view = next(u for u in block.k_proj.node.users if u.target in VIEWS and u.meta["val"].dim() == 4)
    env = {view: b.call(view.target, keys, [b.size(keys, 0), b.size(keys, 1), block.num_kv_heads, block.head_dim])}
    rope = site.k_rope
    if rope is not None and graph.cache is not None:
        cos, sin = _key_tables(graph, b, site, latent)
        env.update({rope.cos: cos, rope.sin: sin})
    out = site.k_heads if rope is None else rope.out
    return _recompute(graph, b, [out], env, site, "the keys", source=view)[0]


def _replace_uses(old: fx.Node, new: fx.Node) -> None:
    old.replace_all_uses_with(new, delete_user_cb=lambda user: user.op != "output")


def _key_tables(graph: Graph, b: _Builder, site: Site, latent: fx.Node) -> tuple[fx.Node, fx.Node]:
    """cos/sin for every cached position 0..L-1: the query's tables recomputed from slot positions."""
    rope = site.k_rope
    if graph.cache is None:
        return rope.cos, rope.sin
    positions = graph.step_input("position_ids")
    length = b.size(latent, 1)
    slots = b.call(aten.arange.start_step, 0, length, 1, dtype=positions.meta["val"].dtype)
    slots = b.call(aten.expand.default, b.call(aten.unsqueeze.default, slots, 0), [b.size(positions, 0), -1])
    return tuple(_recompute(graph, b, [rope.cos, rope.sin], {positions: slots}, site, "the RoPE tables"))


def _recompute(
    graph: Graph, b: _Builder, outputs: list[fx.Node], env: dict, site, what: str, source: fx.Node | None = None
) -> list[fx.Node]:
    """Copy the nodes between ``source`` and ``outputs``, every key of ``env`` read as its value.

    ``source`` (default: the only key of ``env``) decides what is copied: the nodes on a path
    from it to ``outputs``. The other keys are substitutions only (RoPE tables shared by every
    layer must not drag earlier layers into the copy).
    """
    source = source if source is not None else next(iter(env))
    needed = ancestors(outputs)
    missing = [source for source in env if source not in needed]
    if missing:
        raise PassPreconditionError(
            f"{site.block.path}: {what} do not come from {missing[0].name}, so they cannot be recomputed for "
            "cached positions" + ("; use rope.mode 'decoupled'" if what == "the RoPE tables" else "")
        )
    env = dict(env)
    depends = {source}
    for n in graph.fx.nodes:
        if n in needed and n not in depends and any(a in depends for a in n.all_input_nodes):
            depends.add(n)
            args, kwargs = fx.map_arg((n.args, n.kwargs), lambda a: env.get(a, a))
            env[n] = b.call(n.target, *args, **kwargs)
    return [env[o] for o in outputs]


def rewrite_decoupled(graph: Graph, site: Site, plan: Plan, o_weight: torch.Tensor | None) -> None:
    """MLA with a decoupled RoPE key; absorbed when ``o_weight`` (the output projection) is given."""
    block = site.block
    heads, hd, dr = block.num_heads, block.head_dim, plan.rope_dims
    dtype = graph.stored(block.k_proj.weight).dtype
    sdpa = block.sdpa
    b = _Builder(graph, block.path, block.k_proj.node, dtype)
    with graph.fx.inserting_before(sdpa):
        freqs = graph.add_buffer(f"{block.path}.rope_freqs", plan.rope_freqs)
    with graph.fx.inserting_before(sdpa):
        cos = b.call(aten.index_select.default, site.q_rope.cos, -1, freqs)
        sin = b.call(aten.index_select.default, site.q_rope.sin, -1, freqs)
        latent = b.dense(site.x, "kv_down", plan.w_down)
        k_rope = b.dense(site.x, "k_rope", plan.k_rope)
        k_rope = b.call(aten.squeeze.dim, b.rope(b.call(aten.unsqueeze.default, k_rope, 1), cos, sin), 1)
        q_rope = b.rope(b.split_heads(b.dense(site.x, "q_rope", plan.q_rope), heads), cos, sin)
    entries = (
        [(_latent_entry(site, "latent", plan.rank), latent), (_latent_entry(site, "k_rope", dr), k_rope)]
        if graph.cache is not None
        else [(None, latent), (None, k_rope)]
    )
    scale = sdpa.kwargs.get("scale") or 1.0 / math.sqrt(hd)
    out_node = block.o_proj.node

    def build(full: list[fx.Node]) -> None:
        c, kr = full
        with graph.fx.inserting_before(sdpa):
            if o_weight is not None:
                q_nope = plan.q_nope.reshape(heads, plan.k_up.shape[0], plan.q_nope.shape[-1])
                q_lat = torch.stack([plan.k_up.T @ q for q in q_nope])
                q = b.split_heads(b.dense(site.x, "q_latent", q_lat.reshape(heads * plan.rank, -1)), heads)
                q = b.call(aten.cat.default, [q, q_rope], -1)
                # One latent key/value for all heads: SDPA broadcasts it (no per-head copies).
                k = b.call(aten.unsqueeze.default, b.call(aten.cat.default, [c, kr], -1), 1)
                v = b.call(aten.unsqueeze.default, c, 1)
            else:
                q = b.split_heads(b.dense(site.x, "q_nope", plan.q_nope), heads)
                q = b.call(aten.cat.default, [q, q_rope], -1)
                k = b.broadcast_heads(b.call(aten.cat.default, [b.dense(c, "k_up", plan.k_up), kr], -1), heads)
                v = b.repeat_heads(b.split_heads(b.dense(c, "v_up", plan.v_up), block.num_kv_heads), block.group_size)
            attn = b.call(sdpa.target, q, k, v, *sdpa.args[3:], **{**sdpa.kwargs, "scale": scale})
            merged = b.merge_heads(attn)
            if o_weight is not None:
                group, n_kv = block.group_size, block.num_kv_heads
                v_up = plan.v_up.view(n_kv, hd, plan.rank)
                folded = [o_weight[:, h * hd : (h + 1) * hd] @ v_up[h // group] for h in range(heads)]
                if o_weight.shape[1] == heads * hd + 1:  # o_proj's bias stays the bias
                    folded.append(o_weight[:, -1:])
                out = b.dense(merged, "o_latent", torch.cat(folded, 1))
                out_node.replace_all_uses_with(out)
            else:
                out_node.replace_input_with(out_node.args[0], merged)

    _grow(graph, site, entries, build)
    graph.eliminate_dead_code()
