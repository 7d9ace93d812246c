"""Held-out perplexity of TinyLlama: the eager original, and any exported ONNX file of it
(forward graphs, or decode steps scored token by token).

    python -m examples.tiny_llama.evaluate out/tiny_llama/model.onnx

Both are scored on the same shipped held-out text with the same windows, so the
figures compare directly.
"""

from __future__ import annotations

import argparse
import sys

import torch

from graphpress.metrics import perplexity

from .data import load_split
from .model import load_model


class OnnxLM:
    """An onnxruntime session (one input, first output) called with and returning torch tensors."""

    def __init__(self, path: str, threads: int | None = None, optimize: bool = True):
        import onnxruntime as ort

        from graphpress.runtime import session_options

        options = session_options(threads)
        if not optimize:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.path = path
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: input_ids.numpy()})[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx", nargs="*", help="ONNX files of the example LM to score beside the eager original")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--bytes", type=int, default=None, help="score only the first BYTES held-out bytes")
    args = ap.parse_args(argv)
    heldout = load_split("heldout")[: args.bytes]
    print(f"held-out perplexity ({len(heldout):,} bytes, windows of {args.seq_len}):")
    print(f"  original (eager)  {perplexity(load_model(), heldout, seq_len=args.seq_len):.4f}")
    for path in args.onnx:
        print(f"  {path}  {perplexity(onnx_lm(path), heldout, seq_len=args.seq_len):.4f}")
    return 0


def onnx_lm(path: str):
    """A forward ONNX file as it is; a decode step (graphpress's cache layout in its metadata) fed
    each window token by token, as a runtime would decode it."""
    import onnx

    from graphpress.runtime import LAYOUT_KEY, OnnxDecoder, teacher_forced_logits

    metadata = {p.key for p in onnx.load(path, load_external_data=False).metadata_props}
    if LAYOUT_KEY not in metadata:
        return OnnxLM(path)
    decoder = OnnxDecoder(path)
    return lambda ids: teacher_forced_logits(decoder, ids)


if __name__ == "__main__":
    sys.exit(main())
