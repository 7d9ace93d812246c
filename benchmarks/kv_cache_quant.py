"""kv_cache_quant on the trained example LM: cache bytes vs perplexity, and decode-step latency.

    .venv/bin/python -m benchmarks.kv_cache_quant [--tokens 16384] [--context 4096] [--repeats 20]

1. Held-out perplexity scored through the decode graph token by token (what a runtime
   sees), with the cache bytes per token (codes + scales + zero points) and the
   full-precision window, for 8/4/2 bits with and without the residual window, a
   Hadamard-rotated and a per-token-key variant, and after gqa_to_mla (after_up_projection:
   its latent is pre-RoPE, so quantizing it is pre-RoPE quantization).
2. onnxruntime CPU latency of one decode step (batch 1) at one context length, the fp32
   cache vs quantized caches, interleaved in one run; also the onnxruntime-genai target's files
   (attention and the static-scale caches as GroupQueryAttention) on the same weights.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.timing import interleaved_median
from examples.tiny_llama import calibration_batches, load_model
from examples.tiny_llama.data import load_split
from graphpress.backends import build_backend
from graphpress.ir import capture
from graphpress.metrics import perplexity
from graphpress.passes import PassContext, PassManager, build_pass
from graphpress.runtime import OnnxDecoder, TorchDecoder, teacher_forced_logits
from graphpress.schema import GqaToMlaConfig, KvCacheQuantConfig, OnnxBackendConfig


def kivi(bits: int, residual: int, key_axis: str = "channel", rotate: str = "none", group: int = 32) -> dict:
    return {
        "pass": "kv_cache_quant",
        "key": {"bits": bits, "axis": key_axis, "group_size": group, "rotate": rotate},
        "value": {"bits": bits, "axis": "token", "group_size": group},
        "latent": {"bits": bits, "axis": "channel", "group_size": group},
        "residual": residual,
    }


def static(bits: int) -> dict:
    """onnxruntime's quantized GroupQueryAttention cache: fixed per-channel scales, every token quantized."""
    side = {"bits": bits, "axis": "channel"}
    return {"pass": "kv_cache_quant", "scales": "static", "key": side, "value": side, "residual": 0}


def mla(rank: int) -> dict:
    return {"pass": "gqa_to_mla", "kv_rank": rank, "rope": {"mode": "after_up_projection"}}


CONFIGS = {
    "fp32 cache": [],
    "8-bit, R=0": [kivi(8, 0)],
    "4-bit, R=0": [kivi(4, 0)],
    "4-bit, R=32": [kivi(4, 32)],
    "2-bit, R=0": [kivi(2, 0)],
    "2-bit, R=32 (KIVI-2)": [kivi(2, 32)],
    "2-bit, R=128": [kivi(2, 128)],
    "2-bit, R=32, per-token keys": [kivi(2, 32, key_axis="token")],
    "2-bit, R=32, Hadamard keys": [kivi(2, 32, rotate="hadamard")],
    "pre-RoPE: MLA full rank + 4-bit, R=32": [mla(128), kivi(4, 32)],
    "pre-RoPE: MLA full rank + 2-bit, R=32": [mla(128), kivi(2, 32)],
    "MLA rank 64 + 4-bit, R=32": [mla(64), kivi(4, 32)],
    "MLA rank 64 + 2-bit, R=32": [mla(64), kivi(2, 32)],
    "8-bit, static scales": [static(8)],
    "4-bit, static scales": [static(4)],
}
TIMED = ["fp32 cache", "8-bit, R=0", "4-bit, R=32", "2-bit, R=32 (KIVI-2)", "MLA rank 64 + 2-bit, R=32"]
GQA_TIMED = ["fp32 cache", "8-bit, static scales", "4-bit, static scales"]
"""Also timed as the onnxruntime-genai target writes them: attention (and the static-scale cache) in
GroupQueryAttention."""
CONFIG_TYPES = {"kv_cache_quant": KvCacheQuantConfig, "gqa_to_mla": GqaToMlaConfig}


def build(graph, ctx: PassContext, passes):
    if not passes:
        return graph
    pipeline = PassManager([build_pass(CONFIG_TYPES[p["pass"]](**p)) for p in passes])
    return pipeline.run(graph, ctx).graph


def filled_cache(layout, context: int) -> list[torch.Tensor]:
    """The cache after ``context`` tokens: as the flush rule leaves it, random contents."""
    gen = torch.Generator().manual_seed(context)
    bases = {e.name.rsplit(".", 1)[0] for e in layout}
    quantized = {}
    for base in bases:
        parts = [e for e in layout if e.name.rsplit(".", 1)[0] == base]
        block = max(e.tokens_per_slot for e in parts)
        window = next((e.max_len for e in parts if e.max_len is not None), None)
        residual = window - block + 1 if window is not None else 0
        quantized[base] = block * (max(context - residual, 0) // block) if window is not None else context
    out = []
    for entry in layout:
        held = quantized[entry.name.rsplit(".", 1)[0]]
        length = context - held if entry.max_len is not None else held // entry.tokens_per_slot
        shape = [1 if d is None else d for d in entry.shape]
        shape[entry.seq_axis] = length
        if entry.dtype in ("uint8", "int8"):
            low = -128 if entry.dtype == "int8" else 0
            out.append(torch.randint(low, low + 256, shape, generator=gen, dtype=getattr(torch, entry.dtype)))
        else:
            out.append(torch.rand(shape, generator=gen).to(getattr(torch, entry.dtype)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384, help="held-out tokens scored (windows of 256)")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--skip-perplexity", action="store_true")
    ap.add_argument("--only", nargs="*", help="score only the caches whose names contain one of these")
    args = ap.parse_args()
    torch.set_num_threads(2)

    model = load_model()
    calibration = calibration_batches(8, 256, 0)
    heldout = load_split("heldout")[: args.tokens]
    decode = capture(model, calibration[0], mode="decode")
    ctx = PassContext(calibration)  # one context: calibration statistics are collected once
    graphs = {name: build(decode, ctx, passes) for name, passes in CONFIGS.items()}
    if not args.skip_perplexity:
        chosen = {n: g for n, g in graphs.items() if not args.only or any(o in n for o in args.only)}
        score(model, decode, chosen, heldout, args.tokens)
    time_steps(graphs, calibration, args)


def score(model, decode, graphs, heldout, tokens: int) -> None:
    print(f"## held-out perplexity through the decode graph ({tokens} bytes, windows of 256)")
    print(f"forward graph of the original model: {perplexity(model, heldout):.4f}")
    print("| cache | bytes/token (all layers) | vs fp32 | fp window bytes | perplexity |")
    print("|---|---:|---:|---:|---:|")
    base = decode.cache.bytes_per_token
    for name, graph in graphs.items():
        decoder = TorchDecoder(graph)
        ppl = perplexity(lambda ids, d=decoder: teacher_forced_logits(d, ids), heldout, batch_size=16)
        layout = graph.cache
        print(
            f"| {name} | {layout.bytes_per_token:,.1f} | {layout.bytes_per_token / base:.3f}x "
            f"| {layout.window_bytes:,} | {ppl:.4f} |"
        )


def time_steps(graphs, calibration, args) -> None:
    print(f"\n## onnxruntime CPU, one decode step at context {args.context}, batch 1 (interleaved medians)")
    with tempfile.TemporaryDirectory() as tmp:
        steps = {}
        runs = [(name, "onnxruntime") for name in TIMED] + [(name, "onnxruntime-genai") for name in GQA_TIMED]
        for i, (name, runtime) in enumerate(runs):
            cfg = OnnxBackendConfig(target="onnx", filename=f"m{i}.onnx", max_error=1e-3, runtime=runtime)
            path = Path(build_backend(cfg, "onnx").build(graphs[name], calibration[:1], Path(tmp) / str(i)).artifact)
            decoder = OnnxDecoder(path, threads=2)
            cache = filled_cache(decoder.layout, args.context)
            position, mask = torch.full((1, 1), args.context), torch.ones(1, args.context + 1, dtype=torch.long)
            label = name if runtime == "onnxruntime" else f"{name}, GroupQueryAttention"
            steps[label] = lambda ids, d=decoder, c=cache, p=position, m=mask: d.step(ids, m, p, c)
        lat = interleaved_median(steps, torch.zeros(1, 1, dtype=torch.long), args.repeats)
        print("| cache | ms / step | vs fp32 |")
        print("|---|---:|---:|")
        for label in steps:
            print(f"| {label} | {lat[label] * 1e3:.2f} | {lat[label] / lat['fp32 cache']:.3f}x |")


if __name__ == "__main__":
    main()
