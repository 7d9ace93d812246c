"""weight_clustering and nm_sparsity on the example LM's MLPs: bytes stored, perplexity, onnxruntime latency.

    .venv/bin/python -m benchmarks.weight_formats [--tokens 16384] [--repeats 20]

1. For each format: the stored bytes of the MLP weights (what the graph keeps for them:
   the ONNX file stores exactly these tensors) and of the whole ONNX file, before and
   after; held-out perplexity of the compressed model; onnxruntime's agreement with eager.
2. onnxruntime CPU latency of a forward pass (batch 1, 256 tokens), interleaved call by
   call. onnxruntime's constant folding rebuilds the dense weights (unpack + Gather /
   ScatterElements) once when it loads the session, so in memory the model is dense
   again; with graph optimisations off the rebuild runs on every call, and the table
   shows what that costs.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.timing import interleaved_median
from examples.tiny_llama import calibration_batches, load_model
from examples.tiny_llama.data import load_split
from examples.tiny_llama.evaluate import OnnxLM
from graphpress.backends import build_backend
from graphpress.ir import capture, matches
from graphpress.metrics import perplexity
from graphpress.passes import PassContext, build_pass
from graphpress.schema import OnnxBackendConfig, load_spec

MLP = "layers.*.mlp.*"
WANDA = {"pass": "nm_sparsity", "targets": MLP, "score": "activation", "update": True}
CLUSTER4 = {
    "pass": "weight_clustering",
    "targets": MLP,
    "bits": 4,
    "granularity": "group",
    "group_size": 16,
    "weighting": "activation",
}
CONFIGS = {
    "original": [],
    "4-bit clustering, one codebook per tensor": [{"pass": "weight_clustering", "targets": MLP, "bits": 4}],
    "4-bit clustering, per 16 channels, activation-weighted": [CLUSTER4],
    "3-bit clustering, per 16 channels, activation-weighted": [{**CLUSTER4, "bits": 3}],
    "2:4 magnitude": [{"pass": "nm_sparsity", "targets": MLP}],
    "2:4 Wanda": [{**WANDA, "update": False}],
    "2:4 Wanda + permutation": [{**WANDA, "update": False, "permute": True}],
    "2:4 Wanda + refit": [WANDA],
    "2:4 Wanda + refit + permutation": [{**WANDA, "permute": True}],
    "2:4 Wanda + refit + permutation, then 4-bit clustering": [{**WANDA, "permute": True}, CLUSTER4],
    "2:4 Wanda + refit, dense-with-zeros storage": [{**WANDA, "storage": "dense"}],
    "low_rank 0.6, then 2:4, then 4-bit clustering": [
        {
            "pass": "low_rank",
            "targets": MLP,
            "method": "whitened_svd",
            "rank": {"budget": {"param_ratio": 0.6}},
            "rank_multiple": 16,
        },
        WANDA,
        CLUSTER4,
    ],
}
TIMED = [
    "original",
    "4-bit clustering, per 16 channels, activation-weighted",
    "2:4 Wanda + refit",
    "2:4 Wanda + refit, dense-with-zeros storage",
    "2:4 Wanda + refit + permutation, then 4-bit clustering",
]


class Builder:
    """Runs pipelines, reusing the graph of every prefix already built (one calibration context)."""

    def __init__(self, graph, ctx: PassContext):
        self.ctx, self.built = ctx, {(): graph}

    def __call__(self, passes: list[dict]):
        key = tuple(repr(p) for p in passes)
        if key not in self.built:
            previous = self(passes[:-1])
            self.built[key] = build_pass(load_spec({"passes": [passes[-1]]}).passes[0]).run(previous, self.ctx).graph
        return self.built[key]


def mlp_bytes(graph) -> int:
    return sum(t.numel() * t.element_size() for name, t in graph.tensors().items() if matches(name, MLP))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384, help="held-out bytes scored (windows of 256)")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(2)

    model = load_model()
    calibration = calibration_batches(8, 128, 0)
    heldout = load_split("heldout")[: args.tokens]
    build = Builder(capture(model, calibration[0]), PassContext(calibration))
    graphs = {name: build(passes) for name, passes in CONFIGS.items()}

    print(f"## MLP weights of the example LM ({len(heldout):,} held-out bytes, windows of 256)")
    print("| format | MLP bytes | vs fp32 | ONNX file bytes | vs original | perplexity | onnxruntime vs eager |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base_mlp = mlp_bytes(graphs["original"])
    with tempfile.TemporaryDirectory() as tmp:
        sessions, sizes = {}, {}
        for i, (name, graph) in enumerate(graphs.items()):
            cfg = OnnxBackendConfig(target="onnx", filename=f"m{i}.onnx")
            record = build_backend(cfg, "onnx").build(graph, calibration[:1], Path(tmp))
            sessions[name] = OnnxLM(record.artifact, threads=2)
            size = sizes[name] = Path(record.artifact).stat().st_size
            base_size = sizes["original"]
            ppl = perplexity(graph.module(), heldout, 256)
            print(
                f"| {name} | {mlp_bytes(graph):,} | {mlp_bytes(graph) / base_mlp:.3f}x | {size:,} "
                f"| {size / base_size:.3f}x | {ppl:.4f} | {record.errors['rel_l2']:.1e} |"
            )

        print(
            f"\n## onnxruntime CPU forward, batch 1 x 256 tokens, 2 threads (interleaved medians, {args.repeats} calls)"
        )
        tokens = heldout[:256].unsqueeze(0)
        timed = {name: sessions[name] for name in TIMED}
        for name in (TIMED[0], TIMED[-1]):
            timed[f"{name}, optimisations off"] = OnnxLM(sessions[name].path, threads=2, optimize=False)
        lat = interleaved_median(timed, tokens, args.repeats)
        print("| format | ms | vs original |")
        print("|---|---:|---:|")
        for name in timed:
            print(f"| {name} | {lat[name] * 1e3:.2f} | {lat[name] / lat['original']:.2f}x |")


if __name__ == "__main__":
    main()
