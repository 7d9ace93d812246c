"""gqa_to_mla on the trained example LM: KV-cache size vs perplexity, decode latency, absorbed parity.

    .venv/bin/python -m benchmarks.gqa_to_mla [--tokens 65536] [--contexts 512 2048 4096] [--repeats 30]

1. Held-out perplexity (no fine-tuning) at several latent sizes, both RoPE modes, with the
   KV-cache numbers per token per layer (original: 2 KV heads x 2 x 32 = 128).
2. onnxruntime CPU latency of one decode step (batch 1) at each context length, the
   original decode graph vs the converted one (decoupled, absorbed), measured interleaved
   in this run.
3. Absorbed vs non-absorbed: teacher-forced decode logits, eager and onnxruntime.
4. TransMLA's options in decoupled mode, perplexity side by side: FreqFold (``rope.freqfold``
   1 / 2 / 4) and balanced KV PCA (``balance_kv`` on / off), at -87.5% and -75% KV cache.
5. DeepSeek's layout: the example LM as a transformers Llama checkpoint, converted (decoupled,
   ``rope.per_frequency``, a 32-dim RoPE key) and written by the ``hf`` backend as a
   DeepseekV3ForCausalLM checkpoint; that checkpoint loaded and scored by transformers, next to
   the graph's own perplexity and the two's logit difference.

``--sections`` picks which of grid (1), decode (2 and 3), options (4) and deepseek (5) run.
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
from graphpress.passes import PassContext, build_pass
from graphpress.runtime import OnnxDecoder, TorchDecoder, teacher_forced_logits
from graphpress.schema import GqaToMlaConfig, OnnxBackendConfig

ORIGINAL_NUMBERS = 2 * 2 * 32  # K and V, 2 KV heads, head_dim 32

GRID = [("after_up_projection", None, rank) for rank in (96, 64, 48, 32, 16, 8)] + [
    ("decoupled", dims, total - dims) for dims in (32, 16, 8) for total in (96, 64, 48, 32, 16) if total > dims
]


def convert(graph, calibration, rope: str, dims: int | None, rank: int, absorb: bool | None = None, **options):
    fields = {"pass": "gqa_to_mla", "kv_rank": rank, "rope": {"mode": rope, "dims": dims}}
    if absorb is not None:
        fields["absorb"] = absorb
    fold = options.pop("freqfold", 1)
    if fold != 1:
        fields["rope"]["freqfold"] = fold
    fields.update(options)
    return build_pass(GqaToMlaConfig(**fields)).run(graph, PassContext(calibration)).graph


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=65536, help="held-out tokens scored (windows of 256)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 4096])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--samples", type=int, default=16, help="calibration windows of 256 tokens")
    ap.add_argument(
        "--sections", default="grid,decode,options,deepseek", help="comma-separated: grid, decode, options, deepseek"
    )
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    torch.set_num_threads(2)

    model = load_model()
    calibration = calibration_batches(args.samples, 256, 0)
    heldout = load_split("heldout")[: args.tokens]
    forward = capture(model, calibration[0])

    print(f"original: {perplexity(forward.module(), heldout):.4f}  (cache {ORIGINAL_NUMBERS} numbers/token/layer)")
    if "grid" in sections:
        print("## held-out perplexity vs KV cache (no fine-tuning)")
        print("| rope | rope dims | kv_rank | cache numbers/token/layer | cache cut | perplexity |")
        print("|---|---:|---:|---:|---:|---:|")
        for rope, dims, rank in GRID:
            graph = convert(forward, calibration, rope, dims, rank)
            numbers = rank + (dims or 0)
            ppl = perplexity(graph.module(), heldout)
            print(f"| {rope} | {dims or '-'} | {rank} | {numbers} | {1 - numbers / ORIGINAL_NUMBERS:.1%} | {ppl:.4f} |")
    if "options" in sections:
        options(forward, calibration, heldout)
    if "decode" in sections:
        decode_latency(model, calibration, heldout, args)
    if "deepseek" in sections:
        deepseek(model, calibration, heldout)


def options(forward, calibration, heldout) -> None:
    """FreqFold and balanced KV PCA, decoupled (absorbed), held-out perplexity side by side."""
    print("\n## TransMLA's options, decoupled + absorbed: held-out perplexity (no fine-tuning)")
    print("| rope dims + kv_rank | cache cut | balance_kv | freqfold 1 | freqfold 2 | freqfold 4 |")
    print("|---|---:|---|---:|---:|---:|")
    for dims, rank in ((8, 8), (16, 16), (8, 24)):
        cut = 1 - (dims + rank) / ORIGINAL_NUMBERS
        for balance in (True, False):
            ppl = [
                perplexity(
                    convert(forward, calibration, "decoupled", dims, rank, freqfold=f, balance_kv=balance).module(),
                    heldout,
                )
                for f in (1, 2, 4)
            ]
            print(
                f"| {dims} + {rank} | {cut:.1%} | {balance} | " + " | ".join(f"{p:.4f}" for p in ppl) + " |", flush=True
            )


def deepseek(model, calibration, heldout) -> None:
    """The hf backend's DeepSeek-format checkpoint, run by transformers: perplexity next to the graph's."""
    import transformers

    from benchmarks.weight_quant import hf_llama_dir
    from graphpress import compress

    transformers.utils.logging.disable_progress_bar()

    print("\n## DeepSeek-format checkpoint (DeepseekV3ForCausalLM, loaded by transformers from the folder alone)")
    print("| rope dims + kv_rank | cache cut | absorbed | graph perplexity | checkpoint perplexity | logits rel_l2 |")
    print("|---|---:|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        source = hf_llama_dir(model, Path(tmp) / "llama")
        for rank in (32, 96):  # -50% and +0% KV numbers per token (96 = the full latent beside a 32-dim key)
            for absorb in (False, True):
                out = Path(tmp) / f"mla-{rank}-{absorb}"
                spec = {
                    "passes": [
                        {
                            "pass": "gqa_to_mla",
                            "kv_rank": rank,
                            "absorb": absorb,
                            "rope": {"mode": "decoupled", "dims": 32, "per_frequency": True},
                        }
                    ],
                    "verify": {"max": 1.0, "on_fail": "warn"},
                    "backends": [{"target": "hf"}],
                }
                result = compress(str(source), spec, calibration_data=calibration, out_dir=out, progress=False)
                loaded = transformers.AutoModelForCausalLM.from_pretrained(out / "hf").eval()
                ours, theirs = perplexity(result.model, heldout), perplexity(loaded, heldout)
                cut = 1 - (rank + 32) / ORIGINAL_NUMBERS
                error = result.report.backends[0]["errors"]["rel_l2"]
                print(f"| 32 + {rank} | {cut:.1%} | {absorb} | {ours:.4f} | {theirs:.4f} | {error:.1e} |", flush=True)


def decode_latency(model, calibration, heldout, args) -> None:

    decode = capture(model, calibration[0], mode="decode")
    absorbed = convert(decode, calibration, "decoupled", 16, 32)
    plain = convert(decode, calibration, "decoupled", 16, 32, absorb=False)
    after_up = convert(decode, calibration, "after_up_projection", None, 48)
    graphs = {"original": decode, "mla absorbed (32+16)": absorbed, "mla after_up (48)": after_up}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for i, (name, graph) in enumerate(graphs.items()):
            backend = build_backend(OnnxBackendConfig(target="onnx", filename=f"m{i}.onnx", max_error=1e-3), "onnx")
            paths[name] = Path(backend.build(graph, calibration[:1], Path(tmp)).artifact)
        plain_backend = build_backend(OnnxBackendConfig(target="onnx", filename="plain.onnx", max_error=1e-3), "onnx")
        paths["mla non-absorbed"] = Path(plain_backend.build(plain, calibration[:1], Path(tmp)).artifact)
        decoders = {name: OnnxDecoder(path, threads=2) for name, path in paths.items()}

        print("\n## KV-cache bytes per token (all layers, fp32)")
        for name, graph in [*graphs.items(), ("mla non-absorbed", plain)]:
            per_token = graph.cache.bytes_per_token
            print(f"{name}: {per_token:,} B ({per_token / decode.cache.bytes_per_token:.3f}x)")

        print("\n## onnxruntime CPU, one decode step, batch 1 (median of interleaved runs)")
        print("| context | " + " | ".join(f"{n} ms" for n in graphs) + " | absorbed / original |")
        print("|---:|" + "---:|" * (len(graphs) + 1))
        for context in args.contexts:
            steps = {}
            for name in graphs:
                decoder = decoders[name]
                cache = [_filled(e, context) for e in decoder.layout]
                position, mask = torch.full((1, 1), context), torch.ones(1, context + 1, dtype=torch.long)
                steps[name] = lambda ids, d=decoder, c=cache, p=position, m=mask: d.step(ids, m, p, c)
            lat = interleaved_median(steps, torch.zeros(1, 1, dtype=torch.long), args.repeats)
            row = " | ".join(f"{lat[n] * 1e3:.2f}" for n in graphs)
            print(f"| {context} | {row} | {lat['mla absorbed (32+16)'] / lat['original']:.3f}x |")

        print("\n## absorbed vs non-absorbed (decoupled, rope dims 16, kv_rank 32), teacher-forced 128 tokens")
        ids = heldout[:128][None]
        eager = {n: teacher_forced_logits(TorchDecoder(g), ids) for n, g in (("absorbed", absorbed), ("plain", plain))}
        ort = {
            n: teacher_forced_logits(decoders[k], ids)
            for n, k in (("absorbed", "mla absorbed (32+16)"), ("plain", "mla non-absorbed"))
        }
        print(f"eager: rel_l2(absorbed, non-absorbed) = {rel(eager['absorbed'], eager['plain']):.2e}")
        print(f"onnxruntime: rel_l2(absorbed, non-absorbed) = {rel(ort['absorbed'], ort['plain']):.2e}")
        print(f"onnxruntime vs eager (absorbed): {rel(ort['absorbed'], eager['absorbed']):.2e}")


def _filled(entry, context: int) -> torch.Tensor:
    shape = [1 if d is None else d for d in entry.shape]
    shape[entry.seq_axis] = context
    return torch.randn(shape, generator=torch.Generator().manual_seed(context)).to(getattr(torch, entry.dtype))


if __name__ == "__main__":
    main()
