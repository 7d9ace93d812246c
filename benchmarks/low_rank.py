"""low_rank on the example LM: perplexity vs parameter ratio per method, onnxruntime latency, 1B-shaped timing.

    .venv/bin/python -m benchmarks.low_rank                 # perplexity table + latency (a few minutes)
    .venv/bin/python -m benchmarks.low_rank --big           # also the ~1B-parameter Llama-shaped run (~15 GB RAM)

Everything compared is measured in this one run: each compressed model beside the
original, latencies interleaved call by call so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.timing import interleaved_median
from examples.tiny_llama import calibration_batches, load_model
from examples.tiny_llama.data import load_split
from examples.tiny_llama.evaluate import OnnxLM
from examples.tiny_llama.model import TinyLlama, TinyLlamaConfig
from graphpress.backends import OnnxBackend
from graphpress.ir import capture
from graphpress.metrics import perplexity
from graphpress.passes import PassContext, build_pass
from graphpress.schema import OnnxBackendConfig, load_spec

METHODS = ("svd", "whitened_svd", "fisher_svd")
RATIOS = (0.9, 0.7, 0.5, 0.3)


def low_rank(**config):
    return build_pass(load_spec({"passes": [{"pass": "low_rank", **config}]}).passes[0])


def export(graph, path: Path, inputs) -> OnnxLM:
    OnnxBackend(OnnxBackendConfig(target="onnx", filename=path.name)).build(graph, inputs, path.parent)
    return OnnxLM(str(path))


def perplexity_table(heldout_bytes: int, samples: int) -> None:
    model = load_model()
    heldout = load_split("heldout")[:heldout_bytes]
    calib = calibration_batches(samples, 128, seed=0)
    graph = capture(model, calib[0])
    ctx = PassContext(calib)
    print(
        f"\n## held-out perplexity ({len(heldout):,} bytes, windows of 256), all linears in layers.*, "
        f"{samples} calibration samples x 128"
    )
    print(f"original: {perplexity(model, heldout, 256):.4f}")
    print("| ratio | " + " | ".join(METHODS) + " | whitened, per-layer ratio |")
    print("|---|" + "---:|" * (len(METHODS) + 1))
    for ratio in RATIOS:
        row = []
        for method in METHODS:
            result = low_rank(method=method, targets="layers.*", rank={"budget": {"param_ratio": ratio}}).run(
                graph, ctx
            )
            row.append(perplexity(result.graph.module(), heldout, 256))
        per_layer = low_rank(method="whitened_svd", targets="layers.*", rank={"param_ratio": ratio}).run(graph, ctx)
        row.append(perplexity(per_layer.graph.module(), heldout, 256))
        print(f"| {ratio} | " + " | ".join(f"{p:.4f}" for p in row) + " |")


class MLP(torch.nn.Module):
    """The example LM's SwiGLU MLP alone, for timing its linears."""

    def __init__(self, source):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = source.gate_proj, source.up_proj, source.down_proj

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def latency_table(repeats: int) -> None:
    model = load_model()
    calib = calibration_batches(8, 128, seed=0)
    graph = capture(model, calib[0])
    ctx = PassContext(calib)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        x = torch.randint(0, 256, (1, 256))
        print("\n## onnxruntime CPU latency, whole model, input (1, 256), whitened_svd budget on layers.*")
        models = {"original": export(graph, tmp / "original.onnx", calib[:1])}
        for ratio in (0.7, 0.5, 0.3):
            result = low_rank(method="whitened_svd", targets="layers.*", rank={"budget": {"param_ratio": ratio}}).run(
                graph, ctx
            )
            models[f"ratio {ratio}"] = export(result.graph, tmp / f"r{ratio}.onnx", calib[:1])
        lat = interleaved_median(models, x, repeats)
        for name, seconds in lat.items():
            print(f"{name:>10}: {seconds * 1e3:7.2f} ms  speed-up {lat['original'] / seconds:.2f}x")

        print("\n## onnxruntime CPU latency of the MLP linears alone, param_ratio 0.5 (rank 93), 2048 tokens")
        mlp = MLP(model.layers[0].mlp).eval()
        h = torch.randn(8, 256, 256)
        mlp_graph = capture(mlp, (h,))
        factored = low_rank(rank={"param_ratio": 0.5}).run(mlp_graph, PassContext([(h,)])).graph
        pair = {
            "dense": export(mlp_graph, tmp / "mlp.onnx", [(h,)]),
            "factored": export(factored, tmp / "mlp_lr.onnx", [(h,)]),
        }
        lat = interleaved_median(pair, h, repeats)
        print(
            f"dense {lat['dense'] * 1e3:.2f} ms, factored {lat['factored'] * 1e3:.2f} ms, "
            f"speed-up {lat['dense'] / lat['factored']:.2f}x"
        )


def big_run(layers: int, methods: list[str]) -> None:
    cfg = TinyLlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_layers=layers,
        num_heads=32,
        num_kv_heads=4,
        max_seq_len=2048,
    )
    torch.manual_seed(0)
    start = time.perf_counter()
    model = TinyLlama(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    print(
        f"\n## Llama-shaped model with random weights: {params / 1e9:.2f} B parameters ({layers} layers, d 2048, "
        f"MLP 5632, 32 q / 4 KV heads); built in {time.perf_counter() - start:.1f} s"
    )
    calib = [(torch.randint(0, 32000, (1, 128), generator=torch.Generator().manual_seed(i)),) for i in range(4)]
    start = time.perf_counter()
    graph = capture(model, calib[0])
    print(f"capture: {time.perf_counter() - start:.1f} s")
    for method in methods:
        start = time.perf_counter()
        result = low_rank(method=method, targets="layers.*", rank={"param_ratio": 0.5}).run(graph, PassContext(calib))
        seconds = time.perf_counter() - start
        kinds = {layer.details.get("svd") for layer in result.report.layers}
        print(
            f"low_rank {method}, param_ratio 0.5 on {len(result.report.layers)} linears: {seconds:.1f} s "
            f"(svd: {', '.join(sorted(k for k in kinds if k))}); parameters {result.report.params_before / 1e9:.3f} B "
            f"-> {result.report.params_after / 1e9:.3f} B; peak RSS so far "
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"
        )
        del result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heldout-bytes", type=int, default=262_144)
    ap.add_argument("--samples", type=int, default=16, help="calibration samples of 128 bytes")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--big", action="store_true", help="also time the pass on a ~1B-parameter Llama-shaped model")
    ap.add_argument("--big-layers", type=int, default=22)
    ap.add_argument("--big-methods", default="svd,whitened_svd")
    ap.add_argument("--only-big", action="store_true", help="skip the perplexity and latency tables")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if not args.only_big:
        perplexity_table(args.heldout_bytes, args.samples)
        latency_table(args.repeats)
    if args.big or args.only_big:
        big_run(args.big_layers, args.big_methods.split(","))


if __name__ == "__main__":
    main()
