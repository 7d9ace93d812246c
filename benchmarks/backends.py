"""onnxruntime vs TVM (llvm, default schedules) on the example LM, side by side in one run.

    .venv/bin/python -m benchmarks.backends [--repeats 20] [--context 512]

Forward pass (batch 1 x 256 tokens) and one decode step (batch 1, ``--context`` cached
tokens), for the original and compressed variants; calls interleaved so machine noise
hits all alike. TVM is untuned here: MetaSchedule tuning is not wired in yet.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.timing import interleaved_median
from examples.tiny_llama import calibration_batches, load_model
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
    "shift_add (MLP)": [{"pass": "shift_add", "targets": MLP}],
}


def rewrite(graph, ctx, passes):
    for config in load_spec({"passes": passes}).passes:
        graph = build_pass(config).run(graph, ctx).graph
    return graph


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--context", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_model()
    calibration = calibration_batches(2, 64, 0)
    ctx = PassContext(calibration)
    tokens = torch.randint(0, 256, (1, 256), generator=torch.Generator().manual_seed(0))
    step_ids, position = torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), args.context)
    mask = torch.ones(1, args.context + 1, dtype=torch.long)
    with tempfile.TemporaryDirectory() as tmp:
        forward, decode, errors = {}, {}, {}
        for i, (name, passes) in enumerate(VARIANTS.items()):
            for mode in ("forward", "decode"):
                graph = rewrite(capture(model, calibration[0], mode=mode), ctx, passes)
                out = Path(tmp) / f"{i}{mode}"
                onnx = build_backend(OnnxBackendConfig(target="onnx"), "onnx").build(graph, calibration[:1], out)
                tvm = build_backend(TvmBackendConfig(target="tvm"), "tvm").build(graph, calibration[:1], out)
                errors[(name, mode)] = (onnx.errors["rel_l2"], tvm.errors["rel_l2"])
                if mode == "forward":
                    forward[(name, "onnxruntime")] = OnnxLM(onnx.artifact, threads=2)
                    tvm_module = TvmModule(tvm.artifact)
                    forward[(name, "TVM")] = lambda x, m=tvm_module: m(x)
                else:
                    for runtime, decoder in (
                        ("onnxruntime", OnnxDecoder(onnx.artifact, threads=2)),
                        ("TVM", TvmDecoder(tvm.artifact)),
                    ):
                        cache = [
                            torch.randn(
                                *[1 if d is None else d for d in e.shape[: e.seq_axis]],
                                args.context,
                                *e.shape[e.seq_axis + 1 :],
                            )
                            for e in decoder.layout
                        ]
                        decode[(name, runtime)] = lambda x, d=decoder, c=cache: d.step(x, mask, position, c)
        fwd = interleaved_median(forward, tokens, args.repeats)
        dec = interleaved_median(decode, step_ids, args.repeats)
    print(f"## onnxruntime vs TVM (llvm, untuned), 2 threads, interleaved medians of {args.repeats}")
    print(
        f"| variant | forward 1x256: onnxruntime ms | TVM ms | TVM / ORT | decode step @ {args.context}: "
        "onnxruntime ms | TVM ms | TVM / ORT | rel_l2 vs eager (ORT / TVM, forward; decode) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name in VARIANTS:
        f_ort, f_tvm = fwd[(name, "onnxruntime")], fwd[(name, "TVM")]
        d_ort, d_tvm = dec[(name, "onnxruntime")], dec[(name, "TVM")]
        (fo, ft), (do, dt) = errors[(name, "forward")], errors[(name, "decode")]
        print(
            f"| {name} | {f_ort * 1e3:.2f} | {f_tvm * 1e3:.2f} | {f_tvm / f_ort:.2f}x | {d_ort * 1e3:.2f} "
            f"| {d_tvm * 1e3:.2f} | {d_tvm / d_ort:.2f}x | {fo:.1e} / {ft:.1e}; {do:.1e} / {dt:.1e} |"
        )


if __name__ == "__main__":
    main()
