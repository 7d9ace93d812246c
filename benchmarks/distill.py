"""distill on the trained example LM: held-out perplexity after each lossy pass, before and after distillation.

    PYTHONPATH=. .venv/bin/python -m benchmarks.distill [--steps 100] [--lr 1e-3] [--samples 32] [--hidden 0]
        [--only NAME ...]

Each row: the example LM (forward graph) through one lossy pass (or the composed passes), then
``distill`` (KL on the logits, T = 1, AdamW with a cosine schedule, batches of 4 windows of 256
bytes from the calibration split; ``--hidden`` adds the blocks' hidden-state loss), scored on held-out text (``--tokens`` bytes, windows of 256).
"recovered" is the share of the pass's perplexity increase that distillation took back. Wall
time is the distill pass alone, on this machine, in this run.
"""

from __future__ import annotations

import argparse
import time

import torch

from examples.tiny_llama import calibration_batches, load_model
from examples.tiny_llama.data import load_split
from graphpress.ir import capture
from graphpress.metrics import perplexity
from graphpress.passes import PassContext, build_pass
from graphpress.schema import load_spec


def mla(cache: int, rope: str, fold: int = 1) -> dict:
    """gqa_to_mla at ``cache`` KV numbers per token per layer (the original caches 128)."""
    if rope == "after_up_projection":
        return {"pass": "gqa_to_mla", "kv_rank": cache, "rope": {"mode": rope}}
    dims = cache // 2
    return {"pass": "gqa_to_mla", "kv_rank": cache - dims, "rope": {"mode": rope, "dims": dims, "freqfold": fold}}


MLP = "layers.*.mlp.*"
ROWS = {
    "mla-16-after-up": [mla(16, "after_up_projection")],
    "mla-16-decoupled": [mla(16, "decoupled")],
    "mla-16-decoupled-freqfold2": [mla(16, "decoupled", 2)],
    "mla-32-after-up": [mla(32, "after_up_projection")],
    "mla-32-decoupled": [mla(32, "decoupled")],
    "mla-32-decoupled-freqfold2": [mla(32, "decoupled", 2)],
    "nm-2:4-wanda-refit": [{"pass": "nm_sparsity", "targets": MLP, "score": "activation", "update": True}],
    "clustering-4bit": [{"pass": "weight_clustering", "targets": "layers.*", "bits": 4}],
    "shift-mlp": [{"pass": "shift_add", "targets": MLP, "min_exponent": -6}],
    "shift-binarized-qk": [{"pass": "shift_add", "linears": False, "attention": True}],  # trains q/k too (below)
    "low_rank-0.3": [{"pass": "low_rank", "targets": "layers.*", "rank": {"param_ratio": 0.3}}],
    "composed": [
        mla(32, "decoupled"),
        {
            "pass": "low_rank",
            "targets": MLP,
            "method": "whitened_svd",
            "rank": {"budget": {"param_ratio": 0.8}},
            "rank_multiple": 16,
        },
        {"pass": "weight_clustering", "targets": MLP, "bits": 4, "granularity": "group", "group_size": 16},
    ],
}

TRAIN_ALL = {"shift-binarized-qk"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--samples", type=int, default=32, help="calibration windows of 256 bytes (the training data)")
    ap.add_argument("--tokens", type=int, default=65536, help="held-out bytes scored")
    ap.add_argument("--hidden", type=float, default=0.0, help="distill's hidden-state loss weight")
    ap.add_argument("--only", nargs="+", choices=sorted(ROWS), help="rows to run (default: all)")
    ap.add_argument("--train", nargs="+", choices=["compressed", "norms", "dense"], help="groups (default: distill's)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model()
    calibration = calibration_batches(args.samples, 256, 0)
    heldout = load_split("heldout")[: args.tokens]
    original = capture(model, calibration[0])
    base = perplexity(original.module(), heldout)
    print(
        f"original: {base:.4f}; distill: {args.steps} steps, lr {args.lr}, hidden {args.hidden}, batch 4 x 256, "
        f"{args.samples} windows, train {args.train or 'default'}"
    )
    print("| passes | before distill | after distill | recovered | kl before -> after (train) | distill s |")
    print("|---|---:|---:|---:|---|---:|")
    for name in args.only or ROWS:
        ctx = PassContext(calibration, reference=original)
        graph = original
        for spec in load_spec({"passes": ROWS[name]}).passes:
            graph = build_pass(spec).run(graph, ctx).graph
        before = perplexity(graph.module(), heldout)
        fields = {"pass": "distill", "steps": args.steps, "lr": args.lr, "hidden": args.hidden}
        if name in TRAIN_ALL:  # nothing a pass created to train: binarizing changes activations, not weights
            fields["train"] = ["compressed", "norms", "dense"]
        if args.train:
            fields["train"] = args.train
        distill = load_spec({"passes": [fields]}).passes[0]
        start = time.perf_counter()
        result = build_pass(distill).run(graph, ctx)
        seconds = time.perf_counter() - start
        after = perplexity(result.graph.module(), heldout)
        recovered = (before - after) / (before - base) if before > base else float("nan")
        d = result.report.details
        print(
            f"| {name} | {before:.4f} | {after:.4f} | {recovered:.0%} | {d['kl_before']:.4f} -> {d['kl_after']:.4f} "
            f"| {seconds:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
