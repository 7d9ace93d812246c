"""onnxruntime vs TVM (llvm: TVM's own schedules, and matmuls offloaded to OpenBLAS) side by side in one run.

    .venv/bin/python -m benchmarks.backends [--shape example|1024x8] [--repeats 20] [--contexts 512 2048 4096]

Forward pass (batch 1 x 256 tokens) and one decode step (batch 1, each context's cached
tokens) of the example LM (or a random Llama of hidden 1024, 8 layers), original and
compressed; every runtime's calls are interleaved, in blocks (``benchmarks.timing``), so
machine noise hits all alike. onnxruntime runs what a user would deploy: int weights as its
MatMulNBits (``ort_contrib_ops``).
Ratios are runtime time / onnxruntime time. "TVM+BLAS tuned" is the backend's ``tune`` field:
MetaSchedule, ``--trials`` per build (forward: a copy at 1 x 256; decode: the 1-token step),
its tuning seconds printed; leave it out with ``--runtimes``. TVM's thread pool
(``TVM_NUM_THREADS``) and OpenBLAS (``OPENBLAS_NUM_THREADS``) take their counts from the environment.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch

from benchmarks.timing import interleaved_median
from examples.tiny_llama import TinyLlama, TinyLlamaConfig, calibration_batches, load_model
from examples.tiny_llama.evaluate import OnnxLM
from graphpress.backends import build_backend
from graphpress.ir import capture
from graphpress.passes import PassContext, build_pass
from graphpress.runtime import OnnxDecoder, TvmDecoder, TvmModule
from graphpress.schema import OnnxBackendConfig, TvmBackendConfig, load_spec

MLP = "layers.*.mlp.*"
VARIANTS = {
    "original": [],
    "4-bit clustering (MLP)": [{"pass": "weight_clustering", "targets": MLP, "bits": 4}],
    "weight_quant 4-bit": [{"pass": "weight_quant", "bits": 4, "group_size": 32}],
    "2:4 sparsity (MLP)": [{"pass": "nm_sparsity", "targets": MLP}],
    "gqa_to_mla absorbed": [
        {"pass": "gqa_to_mla", "kv_rank": 32, "rope": {"mode": "decoupled", "dims": 16}, "absorb": True}
    ],
}
TVM_BUILDS = {"TVM": "none", "TVM+BLAS": "openblas", "TVM+BLAS tuned": "openblas"}
RUNTIMES = ["onnxruntime", *TVM_BUILDS]


def model_for(shape: str) -> torch.nn.Module:
    if shape == "example":
        return load_model()
    torch.manual_seed(0)
    cfg = TinyLlamaConfig(hidden_size=1024, intermediate_size=2816, num_layers=8, num_heads=16, num_kv_heads=4)
    return TinyLlama(cfg).eval()


def rewrite(graph, ctx, passes):
    for config in load_spec({"passes": passes}).passes:
        graph = build_pass(config).run(graph, ctx).graph
    return graph


def build(graph, calibration, out: Path, runtimes, trials: int) -> dict:
    """runtime -> backend record."""
    onnx = OnnxBackendConfig(target="onnx", ort_contrib_ops=True)
    records = {"onnxruntime": build_backend(onnx, "onnx").build(graph, calibration, out)}
    for runtime, blas in TVM_BUILDS.items():
        if runtime not in runtimes:
            continue
        folder = out / runtime
        tune = {"trials": trials, "lengths": [256] if graph.cache is None else None} if "tuned" in runtime else None
        config = TvmBackendConfig(target="tvm", blas=blas, tune=tune)
        records[runtime] = build_backend(config, "tvm").build(graph, calibration, folder)
    return records


MEMORY_PROBE = """
import sys, torch
from examples.tiny_llama.evaluate import OnnxLM
from graphpress.runtime import TvmModule
import onnxruntime, tvm  # noqa: F401 - imported before the baseline
def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) / 1024
runtime, artifact = sys.argv[1:3]
open("/proc/self/clear_refs", "w").write("5")  # the peak so far (imports) reset to the current RSS
before = status("VmRSS:")
model = OnnxLM(artifact, threads=2) if runtime == "onnxruntime" else TvmModule(artifact)
model(torch.randint(0, 256, (1, 256)))
print(status("VmHWM:") - before)
"""


def peak_memory_mb(runtime: str, artifact: str) -> float:
    """Peak RSS growth (MB) of a fresh process that loads the forward artifact and runs one 1x256 call:
    the weights as the runtime holds them plus its working memory."""
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, runtime, artifact], capture_output=True, text=True, check=True
    )
    return float(out.stdout.split()[-1])


def empty_cache(decoder, context: int) -> list[torch.Tensor]:
    return [
        torch.randn(*[1 if d is None else d for d in e.shape[: e.seq_axis]], context, *e.shape[e.seq_axis + 1 :])
        for e in decoder.layout
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["example", "1024x8"], default="example")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument(
        "--block", type=int, default=5, help="timed calls per turn (1: call by call, as before; see benchmarks.timing)"
    )
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 4096])
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    ap.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=RUNTIMES, help="onnxruntime always runs")
    ap.add_argument("--trials", type=int, default=256, help="MetaSchedule trials per tuned build")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = model_for(args.shape)
    calibration = calibration_batches(2, 64, 0)
    ctx = PassContext(calibration)
    tokens = torch.randint(0, 256, (1, 256), generator=torch.Generator().manual_seed(0))
    step_ids = torch.zeros(1, 1, dtype=torch.long)
    variants = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only}
    forward, decode, errors, sizes, memory, tuning = {}, {}, {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, passes) in enumerate(variants.items()):
            for mode in ("forward", "decode"):
                try:
                    graph = rewrite(capture(model, calibration[0], mode=mode), ctx, passes)
                    records = build(graph, calibration[:1], Path(tmp) / f"{i}{mode}", args.runtimes, args.trials)
                except Exception:  # noqa: BLE001 - a variant a mode does not support is reported, not fatal
                    print(f"{name} / {mode}: not built:\n{traceback.format_exc(limit=2)}")
                    continue
                for runtime, record in records.items():
                    if (record.details or {}).get("tuning"):
                        tuned = record.details["tuning"]
                        tuning[(name, mode)] = f"{tuned['seconds']:.0f} s, {len(tuned['tuned'])} kernels"
                    errors[(name, mode, runtime)] = record.errors["rel_l2"]
                    sizes[(name, mode, runtime)] = sum(
                        size
                        for file, size in record.files.items()
                        if not file.startswith("libscipy") and ".tuning/" not in file
                    )
                    artifact = record.artifact
                    if mode == "forward":
                        memory[(name, runtime)] = peak_memory_mb(runtime, artifact)
                        if runtime == "onnxruntime":
                            forward[(name, runtime)] = OnnxLM(artifact, threads=2)
                        else:
                            forward[(name, runtime)] = TvmModule(artifact)
                        continue
                    decoder = OnnxDecoder(artifact, threads=2) if runtime == "onnxruntime" else TvmDecoder(artifact)
                    for context in args.contexts:
                        cache, position = empty_cache(decoder, context), torch.full((1, 1), context)
                        mask = torch.ones(1, context + 1, dtype=torch.long)
                        decode[(name, context, runtime)] = lambda x, d=decoder, c=cache, m=mask, p=position: d.step(
                            x, m, p, c
                        )
        fwd = interleaved_median(forward, tokens, args.repeats, block=args.block, settle=0.3)
        dec = interleaved_median(decode, step_ids, args.repeats, block=args.block, settle=0.3)
    blas_threads = os.environ.get("OPENBLAS_NUM_THREADS", "every core")
    print(
        f"## {args.shape}: onnxruntime vs TVM (llvm), medians of {args.repeats}, interleaved in blocks of {args.block}"
    )
    for (name, mode), took in tuning.items():
        print(f"tuning {name} / {mode}: {args.trials} trials, {took}")
    tvm_threads = os.environ.get("TVM_NUM_THREADS", "every core")
    print(
        f"onnxruntime 2 threads; TVM's default kernels 1 thread, its fused compressed linears {tvm_threads} "
        f"(TVM_NUM_THREADS), OpenBLAS {blas_threads} (OPENBLAS_NUM_THREADS)"
    )
    print("ms per call; (x) = time / onnxruntime's; artifact MB without the BLAS library (25 MB); forward peak MB:")
    print("RSS growth of a fresh process loading the forward artifact and running one 1x256 call")
    contexts = [f"decode @ {c}" for c in args.contexts]
    print(
        f"| variant | runtime | forward 1x256 | {' | '.join(contexts)} | rel_l2 fwd / decode | artifact MB "
        "| forward peak MB |"
    )
    print("|---|---|" + "---:|" * (len(contexts) + 1) + "---|---:|---:|")
    for name in variants:
        for runtime in ["onnxruntime", *[r for r in TVM_BUILDS if r in args.runtimes]]:
            cells = [_cell(fwd, (name, runtime), (name, "onnxruntime"))]
            cells += [_cell(dec, (name, c, runtime), (name, c, "onnxruntime")) for c in args.contexts]
            errs = " / ".join(
                f"{errors[(name, m, runtime)]:.1e}" if (name, m, runtime) in errors else "-"
                for m in ("forward", "decode")
            )
            size = sizes.get((name, "decode", runtime), sizes.get((name, "forward", runtime), 0)) / 1e6
            peak = memory.get((name, runtime))
            peak = "-" if peak is None else f"{peak:.0f}"
            print(f"| {name} | {runtime} | {' | '.join(cells)} | {errs} | {size:.1f} | {peak} |")


def _cell(times: dict, key, reference) -> str:
    if key not in times:
        return "-"
    if key == reference:
        return f"{times[key] * 1e3:.2f}"
    return f"{times[key] * 1e3:.2f} ({times[key] / times[reference]:.2f}x)"


if __name__ == "__main__":
    main()
