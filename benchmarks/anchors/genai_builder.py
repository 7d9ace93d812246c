"""Anchor: onnxruntime-genai's model builder on a local Hugging Face checkpoint, run by onnxruntime-genai.

Runs in the anchors' own environment (``bash scripts/anchors.sh`` makes ``.venv-anchors``),
never in graphpress's: it imports no graphpress code. Prints one JSON object.

    .venv-anchors/bin/python benchmarks/anchors/genai_builder.py HF_DIR OUT_DIR --precision int4 \
        [--prompt 512] [--contexts 512 2048] [--steps 16] [--threads 2]
    .venv-anchors/bin/python benchmarks/anchors/genai_builder.py - FOLDER [--prompt ...]

Builds ``OUT_DIR`` with ``python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT_DIR -p P -e cpu``
(the checkpoint must carry a tokenizer), or with ``-`` for HF_DIR takes FOLDER as it is (graphpress's
onnxruntime-genai target, timed by the same runtime), sets the session's threads in its
genai_config.json, and measures what a user of the runtime sees: resident memory the model adds when it loads (and holds
with a sequence at the longest context), the time of
appending a prompt of ``--prompt`` tokens (one call), and milliseconds per generated token after a
context of each ``--contexts`` length (median of ``--steps`` greedy steps). Token ids are random.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def build(hf_dir: str, out: Path, precision: str, kv_scales: str | None) -> None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf_dir, "-o", str(out)]
    cmd += ["-p", precision, "-e", "cpu"]
    if kv_scales:  # int4 KV cache, per channel, with these calibrated scales
        cmd += ["--extra_options", "kv_cache_quant_scheme=int4_per_channel", f"kv_cache_scale_file={kv_scales}"]
    subprocess.run(cmd, check=True, capture_output=True)


def set_threads(out: Path, threads: int) -> None:
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    config_path.write_text(json.dumps(config, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("hf_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "int4"])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-scales", help="a kv_cache_scale_file: build with an int4 per-channel KV cache")
    args = ap.parse_args()
    out = Path(args.out_dir)
    if args.hf_dir != "-":
        build(args.hf_dir, out, args.precision, args.kv_scales)
    set_threads(out, args.threads)

    import onnxruntime_genai as og

    before = rss()
    model = og.Model(str(out))
    loaded = rss() - before
    vocab = json.loads((out / "genai_config.json").read_text())["model"]["vocab_size"]
    rng = np.random.default_rng(0)

    def generator(length: int):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=length + args.steps + 1, do_sample=False)
        return og.Generator(model, params)

    prompt_times = []
    for _ in range(3):
        gen = generator(args.prompt)
        tokens = rng.integers(1, vocab, args.prompt, dtype=np.int32)
        start = time.perf_counter()
        gen.append_tokens(tokens)
        prompt_times.append(time.perf_counter() - start)
        del gen
    decode = {}
    for context in args.contexts:
        gen = generator(context)
        gen.append_tokens(rng.integers(1, vocab, context, dtype=np.int32))
        steps = []
        for _ in range(args.steps):
            start = time.perf_counter()
            gen.generate_next_token()
            steps.append(time.perf_counter() - start)
        decode[str(context)] = statistics.median(steps) * 1e3
        if context == max(args.contexts):
            held = rss() - before  # the model and one sequence's cache at the longest context
        del gen
    files = sum(
        p.stat().st_size for p in out.iterdir() if p.suffix in (".onnx", ".data") or p.name.endswith(".onnx.data")
    )
    print(
        json.dumps(
            {
                "file_bytes": files,
                "session_bytes": loaded,
                "context_bytes": held,
                "prompt_seconds": statistics.median(prompt_times),
                "decode_ms": decode,
            }
        )
    )


if __name__ == "__main__":
    main()
