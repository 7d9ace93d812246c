"""qkvo_lock (MergeLock) on the example LM: does locking stop model merging?

    .venv/bin/python -m benchmarks.qkvo_lock [--steps 150] [--tokens 32768]

Two copies of the example LM are fine-tuned briefly on two tasks made from the shipped
calibration text: A on code as it is, B on the same kind of code upper-cased. They are
merged by weight averaging and by task arithmetic (base + (A - base) + (B - base)), once
as they are and once with A locked by qkvo_lock (three condition-number bounds) before
merging. Held-out perplexity and next-byte accuracy on both tasks are measured for every
model in this one run; "degradation" is the relative loss of mean accuracy of the merge
with the locked copy against the plain merge (MergeLock reports > 95%). Last, the attack the
lock does not stop: the locked copy aligned to the public base by least squares per KV head
(:func:`align`), then merged: how much of the lock survives, and the merges' accuracy.

Then the one strengthening that stays exact, measured against both attackers: a Haar-random
rotation of the whole residual stream on top of the lock (:func:`rotated`, SliceGPT/QuaRot:
norm weights folded into their readers, embeddings and readers times Q, writers by Q^T). A
per-head aligner no longer finds the lock; one that first solves an orthogonal Procrustes
problem on the embedding table (:func:`unrotate`) does.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from examples.tiny_llama import load_model
from examples.tiny_llama.data import load_split
from graphpress.ir import capture
from graphpress.metrics import logits_of, perplexity
from graphpress.passes import PassContext, build_pass
from graphpress.schema import QkvoLockConfig

CONDITIONS = (4.0, 16.0, 100.0)
ROTATION_BOUND = 16.0


def fine_tune(model, text: torch.Tensor, steps: int, seed: int):
    tuned = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(tuned.parameters(), lr=3e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(text) - 129, (8,), generator=gen)
        batch = torch.stack([text[s : s + 129] for s in starts.tolist()])
        logits = tuned(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return tuned.eval()


def locked(model, seed: int, max_condition: float):
    """The model with qkvo_lock's weights loaded back into the same module class; and the worst condition number."""
    graph = capture(model, (torch.zeros(1, 16, dtype=torch.long),))
    config = QkvoLockConfig(**{"pass": "qkvo_lock", "seed": seed, "max_condition": max_condition})
    result = build_pass(config).run(graph, PassContext([], seed=seed))
    out = copy.deepcopy(model)
    state = out.state_dict()
    out.load_state_dict(
        {name: result.graph.weight(name) if name in result.graph.tensors() else t for name, t in state.items()}
    )
    return out, result.report.details["worst_condition"]


@torch.no_grad()
def align(locked_model, base, heads: int, kv_heads: int):
    """The attack the lock does not stop: undo it by least squares against the public base model.

    Per KV head g, X = argmin sum_h |X W'_q,h - W_q,h| (h over g's query heads) estimates M_g^-T
    and Y = argmin |Y W'_v,g - W_v,g| estimates N_g^-1; the locked weights are mapped back with
    them (K by X^-T, o_proj's columns by Y^-1). Exact on a locked base; on a locked fine-tune
    the residual is what the fine-tune changed.
    """
    out = copy.deepcopy(locked_model)
    state, ref = out.state_dict(), base.state_dict()
    for prefix in sorted({k.rsplit(".q_proj.", 1)[0] for k in state if k.endswith("q_proj.weight")}):
        w = {n: state[f"{prefix}.{n}_proj.weight"].double() for n in "qkvo"}
        w0 = {n: ref[f"{prefix}.{n}_proj.weight"].double() for n in "qkvo"}
        hd, group = w["k"].shape[0] // kv_heads, heads // kv_heads
        for g in range(kv_heads):
            qs = [slice(h * hd, (h + 1) * hd) for h in range(g * group, (g + 1) * group)]
            kv = slice(g * hd, (g + 1) * hd)
            x = _solve(torch.cat([w["q"][s] for s in qs], 1), torch.cat([w0["q"][s] for s in qs], 1))
            y = _solve(w["v"][kv], w0["v"][kv])
            for s in qs:
                w["q"][s] = x @ w["q"][s]
                w["o"][:, s] = w["o"][:, s] @ torch.linalg.inv(y)
            w["k"][kv] = torch.linalg.inv(x).T @ w["k"][kv]
            w["v"][kv] = y @ w["v"][kv]
        for n in "qkvo":
            state[f"{prefix}.{n}_proj.weight"] = w[n].to(state[f"{prefix}.{n}_proj.weight"].dtype)
    out.load_state_dict(state)
    return out.eval()


NORMS = {"input_layernorm": ("q_proj", "k_proj", "v_proj"), "post_attention_layernorm": ("gate_proj", "up_proj")}


def _readers_writers(state) -> tuple[list[str], list[str]]:
    """Weights reading the residual stream (q/k/v, gate/up, lm_head) and writing it (o_proj, down_proj)."""
    readers = [k for k in state if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))]
    readers += [k for k in state if k.endswith(("gate_proj.weight", "up_proj.weight"))] + ["lm_head.weight"]
    writers = [k for k in state if k.endswith(("o_proj.weight", "down_proj.weight"))]
    return readers, writers


def _norm_readers(state):
    """(norm weight, the weights reading its output) for every RMSNorm of the example LM."""
    pairs = [("norm.weight", ["lm_head.weight"])]
    for key in state:
        for norm, projections in NORMS.items():
            if key.endswith(f"{norm}.weight"):
                prefix = key.rsplit(f".{norm}.", 1)[0]
                part = "self_attn" if norm == "input_layernorm" else "mlp"
                pairs.append((key, [f"{prefix}.{part}.{p}.weight" for p in projections]))
    return pairs


@torch.no_grad()
def rotated(model, q: torch.Tensor):
    """The same function with its residual stream turned by the orthogonal ``q``: every norm weight folded
    into the columns of its readers (RMSNorm commutes with rotations once it has none), the embedding table and
    the readers' columns times q, the writers' rows by q^T (x' = x q everywhere between layers)."""
    out = copy.deepcopy(model)
    state = {k: v.double() for k, v in out.state_dict().items()}
    for norm, readers in _norm_readers(state):
        for r in readers:
            state[r] = state[r] * state[norm]
        state[norm] = torch.ones_like(state[norm])
    readers, writers = _readers_writers(state)
    state["embed_tokens.weight"] = state["embed_tokens.weight"] @ q
    for r in readers:
        state[r] = state[r] @ q
    for w in writers:
        state[w] = q.T @ state[w]
    out.load_state_dict({k: v.float() for k, v in state.items()})
    return out.eval()


def haar(n: int, seed: int) -> torch.Tensor:
    """A Haar-random n x n orthogonal matrix (QR of a Gaussian, signs fixed)."""
    x = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(x)
    return q * torch.sign(torch.diagonal(r))


@torch.no_grad()
def unrotate(model, base):
    """The attacker's first step against a rotated model: Q from an orthogonal Procrustes solve on the embedding
    table (argmin |E_base Q - E| over orthogonal Q), rotated back, the base's norm weights divided out again."""
    e, e0 = model.state_dict()["embed_tokens.weight"].double(), base.state_dict()["embed_tokens.weight"].double()
    u, _, vt = torch.linalg.svd(e0.T @ e)
    back = rotated(model, (u @ vt).T)
    state, ref = back.state_dict(), base.state_dict()
    for norm, readers in _norm_readers(state):
        for r in readers:
            state[r] = state[r] / ref[norm]
        state[norm] = ref[norm].clone()
    back.load_state_dict(state)
    return back


def _solve(moved: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """argmin_X |X moved - reference| (Frobenius): reference moved^T (moved moved^T)^-1."""
    return torch.linalg.solve(moved @ moved.T, moved @ reference.T).T


def weight_residual(model, target, base, keys_with: str = "self_attn") -> float:
    """|model - target| / |target - base| over the weights whose names hold ``keys_with`` (the attention weights
    by default): 0 when the lock is fully undone."""
    sm, st, s0 = model.state_dict(), target.state_dict(), base.state_dict()
    keys = [k for k in st if keys_with in k]
    gap = sum((sm[k].double() - st[k].double()).square().sum() for k in keys)
    change = sum((st[k].double() - s0[k].double()).square().sum() for k in keys)
    return (gap / change).sqrt().item()


def merge(base, a, b, how: str):
    out = copy.deepcopy(base)
    sa, sb, s0 = a.state_dict(), b.state_dict(), base.state_dict()
    if how == "average":
        merged = {k: (sa[k] + sb[k]) / 2 for k in s0}
    else:  # task arithmetic
        merged = {k: s0[k] + (sa[k] - s0[k]) + (sb[k] - s0[k]) for k in s0}
    out.load_state_dict(merged)
    return out.eval()


@torch.no_grad()
def accuracy(model, tokens: torch.Tensor, seq_len: int = 256) -> float:
    windows = tokens[: len(tokens) // seq_len * seq_len].view(-1, seq_len)
    hits = count = 0
    for batch in windows.split(8):
        predicted = logits_of(model(batch))[:, :-1].argmax(-1)
        hits += (predicted == batch[:, 1:]).sum().item()
        count += predicted.numel()
    return hits / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps per copy (batch 8 x 128 bytes)")
    ap.add_argument("--tokens", type=int, default=32768, help="held-out bytes scored")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)

    base = load_model()
    text = load_split("calibration")
    half = len(text) // 2
    heldout = load_split("heldout")[: args.tokens]
    domains = {"code": heldout, "UPPER-CASE code": upper(heldout)}
    start = time.perf_counter()
    a = fine_tune(base, text[:half], args.steps, seed=1)
    b = fine_tune(base, upper(text[half:]), args.steps, seed=2)
    tuned = time.perf_counter() - start

    models = {
        "base": base,
        "A (fine-tuned on code)": a,
        "B (fine-tuned on upper-case code)": b,
        "average(A, B)": merge(base, a, b, "average"),
        "task arithmetic(A, B)": merge(base, a, b, "task"),
    }
    heads, kv_heads = base.config.num_heads, base.config.num_kv_heads
    residuals = {}
    for bound in CONDITIONS:
        a_locked, worst = locked(a, seed=6150391274561339807, max_condition=bound)
        models[f"A locked, c <= {bound:g} (worst {worst:.2f})"] = a_locked
        models[f"average(A locked c <= {bound:g}, B)"] = merge(base, a_locked, b, "average")
        models[f"task arithmetic(A locked c <= {bound:g}, B)"] = merge(base, a_locked, b, "task")
        aligned = align(a_locked, base, heads, kv_heads)
        base_aligned = align(locked(base, seed=6150391274561339807, max_condition=bound)[0], base, heads, kv_heads)
        residuals[bound] = (weight_residual(a_locked, a, base), weight_residual(aligned, a, base),
                            _relative(base_aligned, base))  # fmt: skip
        models[f"average(aligned A locked c <= {bound:g}, B)"] = merge(base, aligned, b, "average")
        models[f"task arithmetic(aligned A locked c <= {bound:g}, B)"] = merge(base, aligned, b, "task")
    turned = rotated(
        locked(a, seed=6150391274561339807, max_condition=ROTATION_BOUND)[0], haar(base.config.hidden_size, 11)
    )
    probe = heldout[:512].view(2, 256)
    exactness = (logits_of(turned(probe)) - logits_of(a(probe))).norm() / logits_of(a(probe)).norm()
    attacks = {
        "locked and rotated, no attack": turned,
        "per-head alignment only": align(turned, base, heads, kv_heads),
        "Procrustes on the embeddings, then per-head alignment": align(unrotate(turned, base), base, heads, kv_heads),
    }
    for name, attacked in attacks.items():
        models[f"average({name}, B)"] = merge(base, attacked, b, "average")
        models[f"task arithmetic({name}, B)"] = merge(base, attacked, b, "task")
    print(
        f"## merging the example LM ({args.steps} fine-tuning steps per copy, {tuned:.0f} s; "
        f"{len(heldout):,} held-out bytes per domain)"
    )
    print("| model | " + " | ".join(f"perplexity, {d} | accuracy, {d}" for d in domains) + " |")
    print("|---|" + "---:|" * 2 * len(domains))
    scores = {}
    for name, model in models.items():
        scores[name] = {d: (perplexity(model, t, 256), accuracy(model, t)) for d, t in domains.items()}
        print(f"| {name} | " + " | ".join(f"{p:.4f} | {acc:.4f}" for p, acc in scores[name].values()) + " |")

    print("\n| merge | condition bound | mean accuracy, plain | mean accuracy, A locked | degradation |")
    print("|---|---:|---:|---:|---:|")
    for how in ("average", "task arithmetic"):
        plain = sum(acc for _, acc in scores[f"{how}(A, B)"].values()) / len(domains)
        for bound in CONDITIONS:
            lock = sum(acc for _, acc in scores[f"{how}(A locked c <= {bound:g}, B)"].values()) / len(domains)
            print(f"| {how} | {bound:g} | {plain:.4f} | {lock:.4f} | {(plain - lock) / plain:.1%} |")

    print("\n## the alignment attack: undo the lock by least squares against the public base, then merge")
    print("| condition bound | attention weights vs A, locked | after alignment | locked base after alignment "
          "| average: plain / locked / aligned | task arithmetic: plain / locked / aligned |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|")
    for bound in CONDITIONS:
        cells = []
        for how in ("average", "task arithmetic"):
            names = [f"{how}(A, B)", f"{how}(A locked c <= {bound:g}, B)", f"{how}(aligned A locked c <= {bound:g}, B)"]
            cells.append(" / ".join(f"{sum(a for _, a in scores[n].values()) / len(domains):.4f}" for n in names))
        locked_gap, aligned_gap, base_gap = residuals[bound]
        print(
            f"| {bound:g} | {locked_gap:.3g} x the fine-tune's change | {aligned_gap:.3g} x | {base_gap:.2e} (relative) "
            f"| {cells[0]} | {cells[1]} |"
        )


    print(
        f"\n## strengthening: a residual-stream rotation on top of the lock (c <= {ROTATION_BOUND:g}; "
        f"logits of the locked, rotated A vs A: {exactness:.1e} relative)"
    )
    print("| attacker | weights vs A (all linears and embeddings), x the fine-tune's change | average | task arithmetic |")
    print("|---|---:|---:|---:|")
    for name, attacked in attacks.items():
        cells = [sum(acc for _, acc in scores[f"{how}({name}, B)"].values()) / len(domains) for how in
                 ("average", "task arithmetic")]  # fmt: skip
        print(f"| {name} | {weight_residual(attacked, a, base, 'weight'):.3g} | {cells[0]:.4f} | {cells[1]:.4f} |")
    plain = [sum(acc for _, acc in scores[f"{how}(A, B)"].values()) / len(domains) for how in ("average", "task arithmetic")]
    print(f"| (plain merge of A and B) | 0 | {plain[0]:.4f} | {plain[1]:.4f} |")


def _relative(model, target) -> float:
    sm, st = model.state_dict(), target.state_dict()
    keys = [k for k in st if "self_attn" in k]
    gap = sum((sm[k].double() - st[k].double()).square().sum() for k in keys)
    return (gap / sum(st[k].double().square().sum() for k in keys)).sqrt().item()


def upper(tokens: torch.Tensor) -> torch.Tensor:
    """The same bytes with ASCII letters upper-cased: a second 'task' from the shipped text."""
    return torch.where((tokens >= 97) & (tokens <= 122), tokens - 32, tokens)


if __name__ == "__main__":
    main()
