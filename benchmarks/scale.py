"""Scale: compressing checkpoints bigger than memory, streamed vs loaded, peak resident memory and wall time.

    PYTHONPATH=. .venv/bin/python -m benchmarks.scale --shape 1b            # 1.1B Llama shape, fp32 (~4.4 GB)
    PYTHONPATH=. .venv/bin/python -m benchmarks.scale --shape 8b --modes stream   # Llama-3-8B shape, bf16 (~16 GB)

Writes its own random-weight checkpoint (sharded safetensors, no download; reused from
``--folder`` if already there) and a file of random token ids, then runs ``compress`` on
the checkpoint folder once per mode, each in a fresh process so its peak resident memory
(``VmHWM``) is its own: ``memory`` (``execution.stream`` false: the model loaded and
captured in memory), ``stream``, and ``ray`` (streamed, low_rank's per-layer jobs on a local
Ray runtime with 2 CPUs; the workers' memory is not in the figure). The specs:

* ``1b`` (the shape of ``benchmarks/low_rank.py --big``): whitened low_rank, param_ratio
  0.5 on every linear in ``layers.*``, 4 calibration samples x 128 tokens.
* ``8b`` (issue 23): low_rank param_ratio 0.5 on the MLPs and 4-bit weight_clustering on
  attention, 4 calibration samples x 256 tokens.

``--onnx`` adds the ONNX backend (external data): a streamed run writes it from the store one
tensor at a time and validates it in onnxruntime, whose session holds the compressed model
(that is in the peak). Without it the compressed tensors stay in ``OUT/.graphpress-store``.
Weights are random, so the verification error is large and only warned.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tests.families import SHAPE_200M

SHAPES = {
    "200m": SHAPE_200M,
    "1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
    ),
    "8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
    ),
}
DTYPES = {"200m": "float32", "1b": "float32", "8b": "bfloat16"}


def spec(shape: str, tokens: Path, mode: str, onnx: bool = False) -> dict:
    if shape == "8b":
        passes = [
            {"pass": "low_rank", "targets": ["mlp.*"], "rank": {"param_ratio": 0.5}},
            {"pass": "weight_clustering", "targets": ["self_attn.*"], "bits": 4},
        ]
        samples, seq_len = 4, 256
    else:
        passes = [{"pass": "low_rank", "targets": "layers.*", "method": "whitened_svd", "rank": {"param_ratio": 0.5}}]
        samples, seq_len = 4, 128
    # onnxruntime's CPU kernels mostly lack bf16: the ONNX file of a bf16 checkpoint is written in float32
    capture = {"capture": {"dtype": "float32"}} if onnx and DTYPES[shape] != "float32" else {}
    return {
        **capture,
        "calibration": {"tokens": str(tokens), "samples": samples, "seq_len": seq_len},
        "verify": {"samples": 1, "on_fail": "warn"},
        "passes": passes,
        "backends": [{"target": "onnx", "external_data": "always"}] if onnx else [],
        "execution": {"stream": mode != "memory", **({"engine": "ray", "num_cpus": 2} if mode == "ray" else {})},
    }


def prepare(shape: str, folder: Path, layers: int | None) -> tuple[int, Path]:
    """The checkpoint (written unless there) and a token file; returns the weights' bytes."""
    import torch
    import transformers

    from tests.families import random_checkpoint

    tokens = folder / "tokens.npy"
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        start = time.perf_counter()
        config = transformers.LlamaConfig(**{**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})})
        random_checkpoint(folder, config, dtype=getattr(torch, DTYPES[shape]), shard_bytes=2**31)
        print(f"wrote {folder} in {time.perf_counter() - start:.0f} s", flush=True)
    if not tokens.exists():
        ids = np.random.default_rng(0).integers(0, SHAPES[shape]["vocab_size"], 1 << 16, dtype=np.int64)
        np.save(tokens, ids)
    return json.loads(index.read_text())["metadata"]["total_size"], tokens


def peak_resident() -> int:
    """This process's own peak resident bytes (VmHWM; ``ru_maxrss`` would carry the parent's across fork/exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def run_one(folder: str, spec_json: str, out: str) -> None:
    """Child process: one compress run; prints its wall time and its own peak resident memory."""
    import warnings

    from graphpress import compress

    warnings.simplefilter("ignore")
    from graphpress.backends.onnx import OnnxBackend

    before_onnxruntime, validate = [], OnnxBackend.validate

    def validate_after_noting_the_peak(self, *args):  # the peak up to here: capture, passes, writing the file
        before_onnxruntime.append(peak_resident())
        return validate(self, *args)

    OnnxBackend.validate = validate_after_noting_the_peak
    start = time.perf_counter()
    out = out or tempfile.mkdtemp(prefix="scale-")
    result = compress(folder, json.loads(spec_json), out_dir=out, progress=False)
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak": peak_resident(),
                "peak_before_onnxruntime": before_onnxruntime[0] if before_onnxruntime else None,
                "params_before": result.report.original["params"],
                "params_after": result.report.compressed["params"],
                "timings": result.report.timings,
                "streamed": result.report.capture.get("streamed"),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--folder", type=Path, help="checkpoint folder (written there if absent; default: a temp dir)")
    ap.add_argument(
        "--layers", type=int, help="fewer decoder layers of the same shape (memory is per layer; time scales with it)"
    )
    ap.add_argument("--modes", default="memory,stream,ray", help="comma-separated: memory, stream, ray")
    ap.add_argument("--onnx", action="store_true", help="also write and validate the ONNX artifact")
    ap.add_argument(
        "--out",
        type=Path,
        help="output folder (default: a temp dir per mode); an interrupted streamed run given the same folder resumes "
        "from the layers it finished (its wall time is then the rest's)",
    )
    ap.add_argument("--run", nargs=3, metavar=("FOLDER", "SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        run_one(*args.run)
        return
    folder = args.folder or Path(tempfile.mkdtemp(prefix=f"scale-{args.shape}-"))
    folder.mkdir(parents=True, exist_ok=True)
    size, tokens = prepare(args.shape, folder, args.layers)
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    print(f"\n## {args.shape} ({layers} layers): {size / 2**30:.2f} GiB of {DTYPES[args.shape]} weights in {folder}")
    print(
        "| mode | wall s | peak RSS GiB | peak / weights | peak before onnxruntime GiB | parameters | capture s "
        "| passes s | backends s |"
    )
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for mode in args.modes.split(","):
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.scale",
                "--run",
                str(folder),
                json.dumps(spec(args.shape, tokens, mode, args.onnx)),
                str(args.out / mode) if args.out else "",
            ],
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            print(
                f"| {mode} | failed: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode} |"
            )
            continue
        m = json.loads(run.stdout.strip().splitlines()[-1])
        print(
            f"| {mode} | {m['seconds']:.0f} | {m['peak'] / 2**30:.2f} | {m['peak'] / size:.2f} | "
            f"{m['peak_before_onnxruntime'] / 2**30 if m['peak_before_onnxruntime'] else float('nan'):.2f} | "
            f"{m['params_before'] / 1e9:.3f} B -> {m['params_after'] / 1e9:.3f} B | {m['timings'].get('capture', 0):.0f} | "
            f"{m['timings'].get('passes', 0):.0f} | {m['timings'].get('backends', 0):.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
