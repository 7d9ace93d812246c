"""shift_add on the example LM: perplexity and multiplications removed, MLP-only, attention-only and both.

    .venv/bin/python -m benchmarks.shift_add [--tokens 16384]

No fine-tuning (ShiftAddViT fine-tunes after reparameterizing; this measures the
training-free cost). Multiplications are counted per token for the linears (one multiply
per output remains: the channel scale) and per (query, key) pair for attention scores
(one product of magnitudes remains per head).
"""

from __future__ import annotations

import argparse

import torch

from examples.tiny_llama import calibration_batches, load_model
from examples.tiny_llama.data import load_split
from graphpress.ir import capture
from graphpress.metrics import perplexity
from graphpress.passes import PassContext, build_pass
from graphpress.schema import load_spec

CONFIGS = {
    "original": None,
    "MLP linears, 2^[-6, 0] (4 bits)": {"targets": "layers.*.mlp.*"},
    "MLP linears, 2^[-14, 0] (5 bits)": {"targets": "layers.*.mlp.*", "min_exponent": -14},
    "all linears in layers.*, 2^[-6, 0]": {"targets": "layers.*"},
    "attention only (binarized Q/K)": {"linears": False, "attention": True},
    "MLP linears + binarized Q/K": {"targets": "layers.*.mlp.*", "attention": True},
    "all linears in layers.* + binarized Q/K": {"targets": "layers.*", "attention": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384, help="held-out bytes scored (windows of 256)")
    args = ap.parse_args()
    torch.set_num_threads(2)

    model = load_model()
    calibration = calibration_batches(8, 128, 0)
    heldout = load_split("heldout")[: args.tokens]
    graph = capture(model, calibration[0])
    ctx = PassContext(calibration)
    print(f"## shift_add on the example LM ({len(heldout):,} held-out bytes, windows of 256; no fine-tuning)")
    print(
        "| variant | perplexity | linear mults removed / token | of all linear mults | "
        "QK mults removed / pair | weight bytes (shifted) | mean output error |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    all_mults = sum(lin.in_features * lin.out_features for lin in graph.linears())
    for name, fields in CONFIGS.items():
        if fields is None:
            print(f"| {name} | {perplexity(model, heldout, 256):.4f} | 0 | 0% | 0 | - | - |")
            continue
        config = load_spec({"passes": [{"pass": "shift_add", **fields}]}).passes[0]
        result = build_pass(config).run(graph, ctx)
        layers = result.report.layers
        linear = [layer.details for layer in layers if layer.action == "shift"]
        removed = sum(d["multiplications_removed_per_token"] for d in linear)
        qk = sum(layer.details["qk_multiplications_removed_per_pair"] for layer in layers if layer.action != "shift")
        before = sum(d["weight_bytes"][0] for d in linear)
        after = sum(d["weight_bytes"][1] for d in linear)
        errors = [d["output_error"] for d in linear] + [
            layer.details["attention_error"] for layer in layers if layer.action != "shift"
        ]
        ppl = perplexity(result.graph.module(), heldout, 256)
        shifted = f"{before:,} -> {after:,}" if linear else "-"
        print(
            f"| {name} | {ppl:.4f} | {removed:,} | {removed / all_mults:.0%} | {qk} | {shifted} "
            f"| {sum(errors) / len(errors):.3f} |"
        )


if __name__ == "__main__":
    main()
