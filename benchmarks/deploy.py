"""Deployment on onnxruntime, side by side with onnxruntime-genai's model builder (issue 21, first slice).

    python -m benchmarks.deploy [--hidden 1024 --layers 8 --heads 16 --kv-heads 4 --vocab 32000]

A random-weight Llama shape (seeded; default the 155M-parameter one of issue 21) is written as a
transformers checkpoint directory with a word-level tokenizer, then deployed two ways from it:

* graphpress: ``compress`` in decode mode, plain ONNX target: one step graph taking the prompt in
  one call (``graphpress.runtime.prefill``) and every generated token; with no passes (weights
  inline, and as external data: the default above 64 MiB), and with 4-bit RTN weights in groups
  of 32 stored as ``MatMulNBits`` (``ort_contrib_ops``) or as opset-21 blocked ``DequantizeLinear``,
  which onnxruntime fuses into ``MatMulNBits`` as it loads;
* onnxruntime-genai's builder, fp32 and int4 (``benchmarks/anchors/genai_builder.py``, run in
  ``.venv-anchors``: ``bash scripts/anchors.sh``; without it those rows are skipped, said so).

Columns: file MB, resident MB a session adds when it loads (fresh process), seconds for a prompt of
``--prompt`` tokens (graphpress also token by token, as its step graph took prompts before), and
milliseconds per generated token after each context length. Two intra-op threads everywhere.
graphpress's onnxruntime-genai target (attention as GroupQueryAttention, 4-bit weights as
MatMulNBits) is timed by onnxruntime-genai itself, as the builder's folders are.
Not yet measured here (issue 21, open): the cache-rewriting passes through onnxruntime-genai,
perplexity, and memory after a long context.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.weight_quant import session_memory
from graphpress import compress
from graphpress.runtime import OnnxDecoder, prefill, teacher_forced_logits

ANCHOR_ENV = Path(".venv-anchors/bin/python")
ANCHOR = Path(__file__).parent / "anchors" / "genai_builder.py"


def llama_dir(out: Path, hidden: int, layers: int, heads: int, kv_heads: int, vocab: int) -> Path:
    """A seeded random LlamaForCausalLM checkpoint with a word-level tokenizer (the builder wants one)."""
    import transformers
    from tokenizers import Tokenizer, models

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    table = {f"<{i}>": i for i in range(vocab)}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(table, "<0>")), unk_token="<0>", bos_token="<1>", eos_token="<2>"
    )
    tokenizer.save_pretrained(out)
    return out


OURS = "graphpress plain ONNX (fp32, weights in the .onnx)"
OURS_EXTERNAL = "graphpress plain ONNX (fp32, external data)"
OURS_INT4 = "graphpress 4-bit weights (RTN g32, MatMulNBits)"
OURS_INT4_QDQ = "graphpress 4-bit weights (RTN g32, opset-21 DequantizeLinear)"
OURS_GENAI = "graphpress onnxruntime-genai target (fp32, GroupQueryAttention), in onnxruntime-genai"
OURS_GENAI_INT4 = "graphpress onnxruntime-genai target (4-bit RTN g32), in onnxruntime-genai"
INT4 = [{"pass": "weight_quant", "bits": 4, "group_size": 32}]  # every linear, lm_head too, as the builder's int4


def graphpress_rows(hf_dir: Path, out: Path, args, passes=(), token_loop: bool = False, **onnx) -> dict:
    spec = {
        "capture": {"mode": "decode"},
        "calibration": {"samples": 1, "seq_len": 16},
        "passes": list(passes),
        "verify": {"max": 1.0},
        "backends": [{"target": "onnx", **onnx}],
    }
    result = compress(str(hf_dir), spec, out_dir=out)
    path = result.artifacts["onnx"]
    files = sum(p.stat().st_size for p in out.iterdir() if p.name.startswith("model.onnx"))
    decoder = OnnxDecoder(path, threads=args.threads)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, args.vocab, (1, args.prompt), generator=gen)
    one_call = []
    for _ in range(3):
        start = time.perf_counter()
        prefill(decoder, prompt)
        one_call.append(time.perf_counter() - start)
    looped = None
    if token_loop:
        start = time.perf_counter()
        teacher_forced_logits(decoder, prompt)  # the prompt token by token: what the step graph took before
        looped = time.perf_counter() - start
    decode = {}
    for context in args.contexts:
        _, cache = prefill(decoder, torch.randint(3, args.vocab, (1, context), generator=gen))
        mask, position = torch.ones(1, context + 1, dtype=torch.long), torch.full((1, 1), context)
        token = torch.zeros(1, 1, dtype=torch.long)
        steps = []
        for _ in range(args.steps):
            start = time.perf_counter()
            decoder.step(token, mask, position, cache)
            steps.append(time.perf_counter() - start)
        decode[str(context)] = statistics.median(steps) * 1e3
    return {
        "file_bytes": files,
        "session_bytes": session_memory(str(path)),
        "prompt_seconds": statistics.median(one_call),
        "prompt_token_by_token_seconds": looped,
        "decode_ms": decode,
    }


def in_genai(source: str, folder: Path, args, precision: str = "fp32") -> dict | None:
    """A folder timed by onnxruntime-genai (in the anchors' environment): the builder's output from the
    checkpoint ``source``, or with ``source`` "-" a folder graphpress wrote; None (said) where it cannot run."""
    if not ANCHOR_ENV.exists():
        print(f"(onnxruntime-genai rows skipped: {ANCHOR_ENV} missing; run bash scripts/anchors.sh)")
        return None
    cmd = [str(ANCHOR_ENV), str(ANCHOR), source, str(folder), "--precision", precision]
    cmd += ["--prompt", str(args.prompt), "--steps", str(args.steps), "--threads", str(args.threads)]
    cmd += ["--contexts", *map(str, args.contexts)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        print(f"(onnxruntime-genai on {folder.name} failed: {done.stderr.strip().splitlines()[-1]})")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def genai_target_row(hf_dir: Path, out: Path, args, passes=()) -> dict | None:
    """graphpress's onnxruntime-genai target (GroupQueryAttention, MatMulNBits), run by onnxruntime-genai."""
    spec = {
        "capture": {"mode": "decode"},
        "calibration": {"samples": 1, "seq_len": 16},
        "passes": list(passes),
        "verify": {"max": 1.0},
        "backends": [{"target": "onnx", "opset": 21, "runtime": "onnxruntime-genai"}],
    }
    compress(str(hf_dir), spec, out_dir=out)
    return in_genai("-", out, args)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 4096])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf_dir = llama_dir(tmp / "hf", args.hidden, args.layers, args.heads, args.kv_heads, args.vocab)
        rows = {OURS: graphpress_rows(hf_dir, tmp / "graphpress", args, token_loop=True, external_data="never")}
        rows[OURS_EXTERNAL] = graphpress_rows(hf_dir, tmp / "graphpress-external", args)  # auto: external here
        rows[OURS_INT4] = graphpress_rows(hf_dir, tmp / "graphpress-int4", args, INT4, opset=21, ort_contrib_ops=True)
        rows[OURS_INT4_QDQ] = graphpress_rows(hf_dir, tmp / "graphpress-int4-qdq", args, INT4, opset=21)
        rows[OURS_GENAI] = genai_target_row(hf_dir, tmp / "graphpress-genai", args)
        rows[OURS_GENAI_INT4] = genai_target_row(hf_dir, tmp / "graphpress-genai-int4", args, INT4)
        for precision in ("fp32", "int4"):
            rows[f"onnxruntime-genai builder {precision}"] = in_genai(
                str(hf_dir), tmp / f"builder-{precision}", args, precision
            )
        rows = {name: row for name, row in rows.items() if row is not None}
    shape = f"hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, vocab {args.vocab}"
    print(f"\nLlama shape: {shape}; prompt {args.prompt} tokens; {args.threads} threads\n")
    contexts = " | ".join(f"decode ms @{c}" for c in args.contexts)
    print(f"| artifact | file MB | session MB | prompt s | {contexts} |")
    print("|---|---:|---:|---:|" + "---:|" * len(args.contexts))
    for name, row in rows.items():
        decode = " | ".join(f"{row['decode_ms'][str(c)]:.2f}" for c in args.contexts)
        print(
            f"| {name} | {row['file_bytes'] / 2**20:.1f} | {row['session_bytes'] / 2**20:.1f} | "
            f"{row['prompt_seconds']:.3f} | {decode} |"
        )
    ours = rows[OURS]
    print(
        f"\ngraphpress prompt in one call: {ours['prompt_seconds']:.3f} s; token by token "
        f"{ours['prompt_token_by_token_seconds']:.3f} s ({ours['prompt_token_by_token_seconds'] / ours['prompt_seconds']:.1f}x)"
    )
    int4 = rows[OURS_INT4]
    external = rows[OURS_EXTERNAL]
    print(f"graphpress external data: session memory {external['session_bytes'] / ours['session_bytes']:.2f}x")
    print(f"graphpress 4-bit session memory: {int4['session_bytes'] / ours['session_bytes']:.2f}x the fp32 original")
    for mine, theirs in (
        (OURS_EXTERNAL, "onnxruntime-genai builder fp32"),
        (OURS_INT4, "onnxruntime-genai builder int4"),
        (OURS_GENAI, "onnxruntime-genai builder fp32"),
        (OURS_GENAI_INT4, "onnxruntime-genai builder int4"),
        (OURS_GENAI, OURS_EXTERNAL),
    ):
        a, b = rows.get(mine), rows.get(theirs)
        if a and b:
            ratios = ", ".join(
                f"decode @{c} {a['decode_ms'][str(c)] / b['decode_ms'][str(c)]:.2f}x" for c in args.contexts
            )
            print(
                f"{mine} / {theirs}: session memory {a['session_bytes'] / b['session_bytes']:.2f}x, "
                f"prompt {a['prompt_seconds'] / b['prompt_seconds']:.2f}x, {ratios}"
            )


if __name__ == "__main__":
    sys.exit(main())
