"""The example LM end to end: pipeline wall time, held-out perplexity, onnxruntime latency.

    .venv/bin/python -m benchmarks.compress_example [--spec examples/tiny_llama/spec.json]

Compresses the bundled TinyLlama with the spec and, in the same run, exports the
uncompressed model the same way, then times both ONNX files in onnxruntime on the
same inputs, interleaved (so machine noise hits both alike), and prints ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.timing import interleaved_median
from examples.tiny_llama.data import load_split
from examples.tiny_llama.evaluate import OnnxLM
from graphpress import compress
from graphpress.metrics import perplexity
from graphpress.schema import load_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="examples/tiny_llama/spec.json")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = compress("examples/tiny_llama", args.spec, out_dir=Path(tmp) / "compressed")
        wall = time.perf_counter() - start
        baseline_spec = load_spec(args.spec).model_copy(update={"passes": []})
        baseline = compress("examples/tiny_llama", baseline_spec, out_dir=Path(tmp) / "original")

        t = result.report.timings
        print(
            f"compress wall time: {wall:.1f} s (capture {t['capture']:.1f}, passes {t['passes']:.1f}, backends {t['backends']:.1f})"
        )
        o, c = result.report.original, result.report.compressed
        print(f"parameters: {o['params']:,} -> {c['params']:,} ({c['params'] / o['params']:.3f}x)")

        heldout = load_split("heldout")
        paths = {"original": baseline.artifacts["onnx"], "compressed": result.artifacts["onnx"]}
        onnx = {name: OnnxLM(str(path)) for name, path in paths.items()}
        for name, model in onnx.items():
            print(f"held-out perplexity, {name} (onnxruntime): {perplexity(model, heldout, seq_len=256):.4f}")
        size = {name: path.stat().st_size for name, path in paths.items()}
        print(
            f"ONNX file bytes: original {size['original']:,}, compressed {size['compressed']:,} "
            f"({size['compressed'] / size['original']:.3f}x)"
        )
        for shape in ((1, 256), (8, 256)):
            x = torch.randint(0, 256, shape)
            lat = interleaved_median(onnx, x, args.repeats)
            print(
                f"onnxruntime latency {shape}: original {lat['original'] * 1e3:.2f} ms, compressed "
                f"{lat['compressed'] * 1e3:.2f} ms, speed-up {lat['original'] / lat['compressed']:.2f}x"
            )


if __name__ == "__main__":
    main()
