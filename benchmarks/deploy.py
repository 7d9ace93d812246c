"""Deployment on onnxruntime and onnxruntime-genai, side by side with onnxruntime-genai's model builder (issue 21).

    python -m benchmarks.deploy [--hidden 1024 --layers 8 --heads 16 --kv-heads 4 --vocab 32000] [--all]
    python -m benchmarks.deploy --example [--tokens 65536]

A random-weight Llama shape (seeded; default the 155M-parameter one of issue 21) is written as a
transformers checkpoint directory with a word-level tokenizer, then deployed from it:

* graphpress, plain ONNX target, run by ``graphpress.runtime`` on onnxruntime (prompt in one call, then
  one token per step): fp32 (external data, the default above 64 MiB), and 4-bit RTN weights in groups
  of 32 stored as ``MatMulNBits`` (``ort_contrib_ops``); with ``--all`` also inline weights and the
  opset-21 blocked ``DequantizeLinear`` form;
* graphpress, onnxruntime-genai target (attention as GroupQueryAttention with RoPE inside, RMSNorm as
  SimplifiedLayerNormalization, 4-bit weights as MatMulNBits), timed by onnxruntime-genai itself:
  fp32, 4-bit weights, 4-bit weights with int8 activations (``matmul_accuracy_level`` 4, the
  builder's int4 CPU default), and that with kv_cache_quant's 4-bit static-scale cache (the op's
  quantized KV cache); gqa_to_mla absorbed (``--mla KV_RANK ROPE_DIMS``, default 48 + 16 = the head
  size: one KV head of 64 channels for key and value, a quarter of the original cache), and that with
  4-bit weights, int8 activations and the latent in 4 bits;
* onnxruntime-genai's builder, fp32, int4, and int4 + int4 KV cache (``benchmarks/anchors/genai_builder.py``,
  run in ``.venv-anchors``: ``bash scripts/anchors.sh``; without it those rows are skipped, said so).

Columns: file MB, resident MB the model adds when it loads (plain rows: a bare onnxruntime session in a
fresh process; onnxruntime-genai rows: ``og.Model`` in the anchors' process, runtime included, and
again holding one sequence at the longest context), seconds for a prompt of ``--prompt`` tokens in one
call, and milliseconds per generated token after each context length. Two intra-op threads everywhere.
The builder's int4 + int4-KV model gets graphpress's calibrated static KV scales as its
``kv_cache_scale_file``: both quantize the cache with the same numbers. Token ids are random, so the
shape's quality is not measured: ``--example`` runs the trained example LM instead (contexts up to its
1024 positions), its onnxruntime-genai rows (GPTQ weights too; gqa_to_mla at ``--example-mla``, default
32 + 32) beside the builder's, each scored by held-out perplexity: windows of 256 bytes, each one call of
the folder's ``model.onnx`` in onnxruntime from an empty cache. The example's vocabulary is padded for the
builder (see :func:`example_dir`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.weight_quant import session_memory
from examples.tiny_llama import calibration_batches, load_model
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
OURS_INT4 = "graphpress plain ONNX, 4-bit weights (RTN g32, MatMulNBits)"
OURS_INT4_QDQ = "graphpress plain ONNX, 4-bit weights (opset-21 DequantizeLinear)"
OURS_GENAI = "graphpress genai target, fp32"
OURS_GENAI_INT4 = "graphpress genai target, 4-bit weights"
OURS_GENAI_INT4_L4 = "graphpress genai target, 4-bit weights, int8 activations"
OURS_GENAI_KV4 = "graphpress genai target, 4-bit weights, int8 activations, 4-bit KV"
OURS_GENAI_GPTQ = "graphpress genai target, 4-bit GPTQ weights, int8 activations"
OURS_GENAI_MLA = "graphpress genai target, gqa_to_mla absorbed"
OURS_GENAI_MLA_KV4 = "graphpress genai target, 4-bit weights, int8 activations, gqa_to_mla absorbed, 4-bit latent"
BUILDER = "onnxruntime-genai builder {}"
INT4 = [{"pass": "weight_quant", "bits": 4, "group_size": 32}]  # every linear, lm_head too, as the builder's int4
SIDE4 = {"bits": 4, "axis": "channel"}
KV4 = {"pass": "kv_cache_quant", "scales": "static", "residual": 0, "key": SIDE4, "value": SIDE4}
LATENT4 = {**KV4, "latent": SIDE4}


def mla(kv_rank: int, rope_dims: int) -> dict:
    """gqa_to_mla, decoupled RoPE, absorbed: in onnxruntime-genai one KV head of kv_rank + rope_dims channels."""
    return {"pass": "gqa_to_mla", "kv_rank": kv_rank, "rope": {"mode": "decoupled", "dims": rope_dims}}


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


def in_genai(source: str, folder: Path, args, precision: str = "fp32", extra=()) -> dict | None:
    """A folder timed by onnxruntime-genai (in the anchors' environment): the builder's output from the
    checkpoint ``source``, or with ``source`` "-" a folder graphpress wrote; None (said) where it cannot run."""
    if not ANCHOR_ENV.exists():
        print(f"(onnxruntime-genai rows skipped: {ANCHOR_ENV} missing; run bash scripts/anchors.sh)")
        return None
    cmd = [str(ANCHOR_ENV), str(ANCHOR), source, str(folder), "--precision", precision]
    cmd += ["--prompt", str(args.prompt), "--steps", str(args.steps), "--threads", str(args.threads)]
    cmd += ["--contexts", *map(str, args.contexts), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        print(f"(onnxruntime-genai on {folder.name} failed: {done.stderr.strip().splitlines()[-1]})")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def genai_target_row(hf_dir: Path, out: Path, args, passes=(), calibration=None, **onnx) -> tuple[dict | None, object]:
    """graphpress's onnxruntime-genai target (GroupQueryAttention, MatMulNBits, SimplifiedLayerNormalization),
    timed by onnxruntime-genai; and the compressed graph. The file's error against the eager graph goes into the
    row: random weights give near-uniform logits, which int8 activations and a 4-bit cache move relatively far
    (``--example`` scores the trained example LM's perplexity)."""
    spec = {
        "capture": {"mode": "decode"},
        "calibration": {"samples": 4, "seq_len": 128},
        "passes": list(passes),
        "verify": {"max": 1.0 if calibration else 100.0},  # random weights: a fitted pass's error means nothing
        "backends": [{"target": "onnx", "opset": 21, "runtime": "onnxruntime-genai", "max_error": 0.5, **onnx}],
    }
    result = compress(str(hf_dir), spec, out_dir=out, calibration_data=calibration)
    row = in_genai("-", out, args)
    if row is not None:
        row["rel_l2"] = result.report.backends[0]["errors"]["rel_l2"]
    return row, result.graph


def kv_scale_file(graph, path: Path) -> Path:
    """The builder's kv_cache_scale_file holding graphpress's calibrated static scales (the same numbers)."""
    layers = len(graph.cache) // 2
    scales = {
        side: [graph.weight(f"kv_cache_quant.layers.{i}.{part}.scale").flatten().tolist() for i in range(layers)]
        for side, part in (("k_scales", "key"), ("v_scales", "value"))
    }
    path.write_text(json.dumps({"scales": scales}))
    return path


EXAMPLE_VOCAB = 320  # the example LM's 256 byte ids, padded (see example_dir)


def example_dir(out: Path) -> Path:
    """The trained example LM as a transformers Llama checkpoint whose vocabulary is padded from 256 to
    :data:`EXAMPLE_VOCAB` ids with zero rows, and a word-level tokenizer.

    onnxruntime-genai 0.18's builder takes any linear with ``out_features == vocab_size`` for the LM head: with
    256 ids and a hidden size of 256 that is every q_proj and o_proj, and it wires the wrong one (perplexity 60).
    The padded rows are ids the text never holds, and perplexity is scored on the first 256 logits only, so
    every folder (graphpress's too, built from this same checkpoint) is scored on the example LM itself."""
    import transformers
    from tokenizers import Tokenizer, models

    from benchmarks.weight_quant import hf_llama_dir

    hf_llama_dir(load_model(), out)
    model = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    extra = EXAMPLE_VOCAB - model.config.vocab_size
    with torch.no_grad():
        model.resize_token_embeddings(EXAMPLE_VOCAB, mean_resizing=False)
        model.get_input_embeddings().weight[-extra:] = 0
        model.get_output_embeddings().weight[-extra:] = 0
    model.config.update({"bos_token_id": 256, "eos_token_id": 257})
    model.generation_config.update(bos_token_id=256, eos_token_id=257)
    model.save_pretrained(out)
    table = {f"<{i}>": i for i in range(EXAMPLE_VOCAB)}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(table, "<0>")),
        unk_token="<0>",
        bos_token="<256>",
        eos_token="<257>",
    )
    tokenizer.save_pretrained(out)
    return out


def onnx_perplexity(path: Path, heldout: torch.Tensor, vocab: int = 256, window: int = 256, batch: int = 16) -> float:
    """exp(mean next-token NLL) of an onnxruntime-genai folder's ``model.onnx`` over non-overlapping windows, each
    one call from an empty cache (the runtime's prompt), scored on the first ``vocab`` logits."""
    import numpy as np
    import onnxruntime as ort

    from graphpress.runtime import session_options

    session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    head_size = json.loads((path.parent / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}
    dtypes.update({"tensor(uint8)": np.uint8, "tensor(int64)": np.int64, "tensor(int32)": np.int32})
    windows = heldout[: len(heldout) // window * window].view(-1, window)
    total, count = 0.0, 0
    for ids in windows.split(batch):
        b, n = ids.shape
        steps = {"input_ids": ids, "attention_mask": torch.ones(b, n), "position_ids": torch.arange(n).expand(b, n)}
        feeds = {}
        for i in session.get_inputs():
            dtype = dtypes[i.type]
            if i.name in steps:
                feeds[i.name] = steps[i.name].numpy().astype(dtype)
            else:  # an empty past (batch, kv heads, 0, head size: the builder names it, its codes pack 2 a byte)
                size = head_size // (2 if dtype is np.uint8 else 1)
                shape = [b, i.shape[1], 0, i.shape[3] if isinstance(i.shape[3], int) else size]
                feeds[i.name] = np.zeros(shape, dtype)
        logits = torch.from_numpy(session.run(["logits"], feeds)[0])[..., :vocab].float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total, count = total + nll.item(), count + ids[:, 1:].numel()
    return math.exp(total / count)


def example_rows(tmp: Path, args) -> dict:
    """The trained example LM through graphpress's onnxruntime-genai target and the builder, with perplexity."""
    from examples.tiny_llama.data import load_split

    hf_dir = example_dir(tmp / "example-hf")
    heldout = load_split("heldout")[: args.tokens]
    calibration = calibration_batches(8, 128, 0)  # the last 2 verify (held out), 6 calibrate
    level4 = {"matmul_accuracy_level": 4}
    gptq = [{**INT4[0], "method": "gptq"}]
    rank, dims = args.example_mla
    ours = {
        OURS_GENAI: ([], {}),
        OURS_GENAI_INT4_L4: (INT4, level4),
        OURS_GENAI_GPTQ: (gptq, level4),
        OURS_GENAI_KV4: ([*INT4, KV4], level4),
        OURS_GENAI_MLA: ([mla(rank, dims)], {}),
        OURS_GENAI_MLA_KV4: ([mla(rank, dims), *INT4, LATENT4], level4),
    }
    rows, graph = {}, None
    for i, (name, (passes, onnx)) in enumerate(ours.items()):
        folder = tmp / f"example-{i}"
        row, compressed = genai_target_row(hf_dir, folder, args, passes, calibration, **onnx)
        graph = compressed if passes and passes[-1] is KV4 else graph
        if row is not None:
            rows[name] = {**row, "perplexity": onnx_perplexity(folder / "model.onnx", heldout)}
    builders = {"fp32": ("fp32", []), "int4": ("int4", [])}
    builders["int4 + int4 KV"] = ("int4", ["--kv-scales", str(kv_scale_file(graph, tmp / "example-kv.json"))])
    for name, (precision, extra) in builders.items():
        folder = tmp / f"example-builder-{precision}-{len(extra)}"
        row = in_genai(str(hf_dir), folder, args, precision, extra)
        if row is not None:
            rows[BUILDER.format(name)] = {**row, "perplexity": onnx_perplexity(folder / "model.onnx", heldout)}
    return rows


def shape_rows(tmp: Path, args) -> dict:
    """The random-weight Llama shape through every graphpress form and the builder's."""
    hf_dir = llama_dir(tmp / "hf", args.hidden, args.layers, args.heads, args.kv_heads, args.vocab)
    rows, level4 = {}, {"matmul_accuracy_level": 4}
    if not args.mla_only:
        rows[OURS_EXTERNAL] = graphpress_rows(hf_dir, tmp / "graphpress-external", args, token_loop=True)
        rows[OURS_INT4] = graphpress_rows(hf_dir, tmp / "graphpress-int4", args, INT4, opset=21, ort_contrib_ops=True)
    if args.all:
        rows[OURS] = graphpress_rows(hf_dir, tmp / "graphpress", args, external_data="never")
        rows[OURS_INT4_QDQ] = graphpress_rows(hf_dir, tmp / "graphpress-int4-qdq", args, INT4, opset=21)
    rows[OURS_GENAI], _ = genai_target_row(hf_dir, tmp / "genai", args)
    if not args.mla_only:
        rows[OURS_GENAI_INT4], _ = genai_target_row(hf_dir, tmp / "genai-int4", args, INT4)
        rows[OURS_GENAI_INT4_L4], _ = genai_target_row(hf_dir, tmp / "genai-int4-l4", args, INT4, **level4)
    rows[OURS_GENAI_KV4], graph = genai_target_row(hf_dir, tmp / "genai-kv4", args, [*INT4, KV4], **level4)
    latent = mla(*args.mla)
    rows[OURS_GENAI_MLA], _ = genai_target_row(hf_dir, tmp / "genai-mla", args, [latent])
    rows[OURS_GENAI_MLA_KV4], _ = genai_target_row(
        hf_dir, tmp / "genai-mla-kv4", args, [latent, *INT4, LATENT4], **level4
    )
    for precision in () if args.mla_only else ("fp32", "int4"):
        rows[BUILDER.format(precision)] = in_genai(str(hf_dir), tmp / f"builder-{precision}", args, precision)
    scales = ["--kv-scales", str(kv_scale_file(graph, tmp / "kv_scales.json"))]
    rows[BUILDER.format("int4 + int4 KV")] = in_genai(str(hf_dir), tmp / "builder-kv4", args, "int4", scales)
    return rows


RATIOS = (
    (OURS_INT4, OURS_EXTERNAL),
    (OURS_GENAI, OURS_EXTERNAL),
    (OURS_GENAI, BUILDER.format("fp32")),
    (OURS_GENAI_INT4, BUILDER.format("int4")),
    (OURS_GENAI_INT4_L4, BUILDER.format("int4")),
    (OURS_GENAI_GPTQ, BUILDER.format("int4")),
    (OURS_GENAI_KV4, BUILDER.format("int4 + int4 KV")),
    (OURS_GENAI_KV4, OURS_EXTERNAL),
    (OURS_GENAI_MLA, OURS_GENAI),
    (OURS_GENAI_MLA_KV4, OURS_GENAI),
    (OURS_GENAI_MLA_KV4, OURS_EXTERNAL),
    (OURS_GENAI_MLA_KV4, BUILDER.format("int4 + int4 KV")),
    (OURS_GENAI_MLA_KV4, OURS_GENAI_KV4),
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--mla", type=int, nargs=2, default=[48, 16], metavar=("KV_RANK", "ROPE_DIMS"))
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--contexts", type=int, nargs="+", help="default 512 2048 4096 (--example: 256 512 896)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--all", action="store_true", help="also the inline-weights and DequantizeLinear rows")
    ap.add_argument("--mla-only", action="store_true", help="only the rows gqa_to_mla's goal compares")
    ap.add_argument("--example", action="store_true", help="the trained example LM instead, with perplexity")
    ap.add_argument("--example-mla", type=int, nargs=2, default=[32, 32], metavar=("KV_RANK", "ROPE_DIMS"))
    ap.add_argument("--tokens", type=int, default=65536, help="--example: held-out bytes scored")
    args = ap.parse_args()
    args.contexts = args.contexts or ([256, 512, 896] if args.example else [512, 2048, 4096])
    with tempfile.TemporaryDirectory() as tmp:
        rows = (example_rows if args.example else shape_rows)(Path(tmp), args)
    rows = {name: row for name, row in rows.items() if row is not None}
    if args.example:
        shape = f"the trained example LM (vocab padded to {EXAMPLE_VOCAB}); gqa_to_mla kv_rank, rope dims {args.example_mla}"
    else:
        shape = f"hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, vocab {args.vocab}"
        shape += f"; gqa_to_mla kv_rank, rope dims {args.mla}"
    print(f"\nLlama shape: {shape}; prompt {args.prompt} tokens; {args.threads} threads\n")
    contexts = " | ".join(f"decode ms @{c}" for c in args.contexts)
    last = "perplexity" if args.example else "rel_l2"
    print(f"| artifact | file MB | session MB | MB at {max(args.contexts)} | prompt s | {contexts} | {last} |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(args.contexts) + "---:|")
    for name, row in rows.items():
        decode = " | ".join(f"{row['decode_ms'][str(c)]:.2f}" for c in args.contexts)
        held = f"{row['context_bytes'] / 2**20:.1f}" if row.get("context_bytes") else "-"
        error = f"{row['perplexity']:.4f}" if args.example else f"{row['rel_l2']:.2g}" if "rel_l2" in row else "-"
        print(
            f"| {name} | {row['file_bytes'] / 2**20:.1f} | {row['session_bytes'] / 2**20:.1f} | {held} | "
            f"{row['prompt_seconds']:.3f} | {decode} | {error} |"
        )
    if OURS_EXTERNAL in rows:
        ours = rows[OURS_EXTERNAL]
        looped = ours["prompt_token_by_token_seconds"]
        print(f"\ngraphpress prompt in one call: {ours['prompt_seconds']:.3f} s; token by token {looped:.3f} s")
    print("\nratios (memory: session after load, and holding the longest context; prompt; decode per context):")
    for mine, theirs in RATIOS:
        a, b = rows.get(mine), rows.get(theirs)
        if a and b:
            ratios = ", ".join(f"@{c} {a['decode_ms'][str(c)] / b['decode_ms'][str(c)]:.2f}x" for c in args.contexts)
            # memory only between rows measured the same way (onnxruntime-genai's process, or a bare session)
            same = ("context_bytes" in a) == ("context_bytes" in b)
            memory = f"memory {a['session_bytes'] / b['session_bytes']:.2f}x" if same else ""
            memory += f" / {a['context_bytes'] / b['context_bytes']:.2f}x, " if same and "context_bytes" in a else ", "
            quality = f", perplexity {a['perplexity'] / b['perplexity']:.3f}x" if "perplexity" in a else ""
            print(
                f"- {mine} / {theirs}: {memory}prompt {a['prompt_seconds'] / b['prompt_seconds']:.2f}x, "
                f"decode {ratios}{quality}"
            )


if __name__ == "__main__":
    sys.exit(main())
