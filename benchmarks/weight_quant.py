"""weight_quant on the example LM: perplexity, stored bytes, onnxruntime memory and latency, one run.

    .venv/bin/python -m benchmarks.weight_quant [--bytes 16384] [--repeats 20] [--samples 16]

1. Every MLP and attention linear of ``layers.*`` quantized: rtn vs gptq vs awq + gptq at
   4 bits (group 32 and 128) and 3 bits (group 128); 4- and 3-bit k-means clustering
   with and without GPTQ-style error feedback; the anchor: onnxruntime's own ``MatMulNBitsQuantizer`` (RTN, block 32,
   asymmetric) applied to the plain fp32 export of the same linears. Held-out perplexity
   (eager for ours, onnxruntime for the anchor) and the stored bytes of the quantized
   tensors (codes, scales, zero points) against their fp32 weights.
2. onnxruntime CPU sessions of fp32, the standard lowerings (opset 18: unpack + Sub/Mul;
   opset 21: a blocked ``DequantizeLinear`` of uint4 codes, which onnxruntime fuses into
   ``MatMulNBits`` at load) and the ``MatMulNBits`` lowering (``ort_contrib_ops``) of gptq 4-bit g32
   (sessions with ``session.qdq_matmulnbits_accuracy_level=0``, as graphpress runs them): resident memory the
   session adds when it loads (measured in a fresh process each), and the latency of a
   256-token forward and of a one-token forward (the GEMV shape of decoding), interleaved
   call by call.

3. llm-compressor's GPTQ (``oneshot`` + ``GPTQModifier``, its default static act-order and
   sequential layer-by-layer calibration) as the anchor for the algorithm: the example LM
   written as a transformers ``LlamaForCausalLM`` checkpoint (the same function: checked to
   1e-6), quantized in ``.venv-anchors`` (``bash scripts/anchors.sh``; skipped, with a note,
   when missing) on the same calibration windows, its dequantized weights put back into the
   example LM and scored like ours.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks.timing import interleaved_median
from benchmarks.weight_formats import Builder
from examples.tiny_llama import calibration_batches, load_model
from examples.tiny_llama.data import load_split
from examples.tiny_llama.evaluate import OnnxLM
from graphpress.backends import build_backend
from graphpress.ir import capture
from graphpress.metrics import perplexity
from graphpress.passes import PassContext
from graphpress.schema import OnnxBackendConfig

LINEARS = "layers.*"


def wq(**fields) -> dict:
    return {"pass": "weight_quant", "targets": LINEARS, **fields}


CLUSTER = {"pass": "weight_clustering", "targets": LINEARS, "bits": 4, "group_size": 16, "weighting": "activation"}
CONFIGS = {
    "original (fp32)": [],
    "rtn 4-bit g128": [wq(method="rtn")],
    "rtn 4-bit g128, mse clip": [wq(method="rtn", clip="mse")],
    "gptq 4-bit g128": [wq()],
    "gptq 4-bit g128, no act_order": [wq(act_order=False)],
    "gptq 4-bit g128, symmetric": [wq(symmetric=True)],
    "awq + gptq 4-bit g128": [wq(awq=True)],
    "rtn 4-bit g32": [wq(method="rtn", group_size=32)],
    "gptq 4-bit g32": [wq(group_size=32)],
    "awq + gptq 4-bit g32": [wq(awq=True, group_size=32)],
    "rtn 3-bit g128": [wq(method="rtn", bits=3)],
    "gptq 3-bit g128": [wq(bits=3)],
    "gptq 3-bit g128, no act_order": [wq(bits=3, act_order=False)],
    "awq + gptq 3-bit g128": [wq(awq=True, bits=3)],
    "clustering 4-bit, per 16 channels, activation-weighted": [CLUSTER],
    "clustering 4-bit, per 16 channels, activation-weighted, error feedback": [{**CLUSTER, "error_feedback": True}],
    "clustering 3-bit, per 16 channels, activation-weighted": [{**CLUSTER, "bits": 3}],
    "clustering 3-bit, per 16 channels, activation-weighted, error feedback": [
        {**CLUSTER, "bits": 3, "error_feedback": True}
    ],
}
SERVED = "gptq 4-bit g32"
ANCHOR_ENV = Path(".venv-anchors/bin/python")
ANCHORS = {  # llm-compressor GPTQ: (bits, group, symmetric) -> our row at the same settings
    (4, 128, False): "gptq 4-bit g128",
    (4, 128, True): "gptq 4-bit g128, symmetric",
    (4, 32, False): "gptq 4-bit g32",
    (3, 128, False): "gptq 3-bit g128",
}

RSS = """
import sys, onnxruntime as ort
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
options = ort.SessionOptions(); options.intra_op_num_threads = 2
options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # graphpress.runtime.session_options
before = rss()
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
print(rss() - before)
"""


def session_memory(path: str) -> int:
    """Resident bytes an onnxruntime session adds when it loads ``path``, in a fresh process (which imports
    onnxruntime only, not torch or graphpress: RSS restates session_options' settings rather than import them)."""
    return int(subprocess.run([sys.executable, "-c", RSS, path], capture_output=True, text=True, check=True).stdout)


def quantized_bytes(graph) -> tuple[int, int]:
    """(stored bytes of the quantized or clustered tensors, fp32 bytes of the weights they replace)."""
    stored = dense = 0
    for node in graph.nodes:
        if node.op == "call_function" and str(node.target) in (
            "graphpress.int_weight.default",
            "graphpress.lut_weight.default",
        ):
            tensors = [graph.weight(graph.tensor_name(a)) for a in node.args if graph.tensor_name(a)]
            stored += sum(t.numel() * t.element_size() for t in tensors)
            dense += node.meta["val"].numel() * 4
    return stored, dense


def hf_llama_dir(model, out: Path) -> Path:
    """The example LM as a transformers LlamaForCausalLM checkpoint (same module names under ``model.``)."""
    import transformers

    c = model.config
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        rope_theta=c.rope_theta,
        max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.load_state_dict({k if k == "lm_head.weight" else "model." + k: v for k, v in model.state_dict().items()})
    ids = torch.randint(0, c.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = (hf(ids).logits - model(ids)).norm() / model(ids).norm()
    if gap > 1e-6:
        raise RuntimeError(f"the transformers copy of the example LM differs from it ({gap:.2e})")
    hf.save_pretrained(out)
    return out


def llmcompressor_gptq(model, calibration, tmp: Path, bits: int, group: int, symmetric: bool):
    """A copy of ``model`` with llm-compressor's GPTQ weights on every linear of ``layers.*``."""
    import copy

    calib = tmp / "calibration.pt"
    torch.save(torch.cat([batch[0] for batch in calibration]), calib)
    out = tmp / f"llmc-{bits}-{group}-{symmetric}.safetensors"
    command = [str(ANCHOR_ENV), "benchmarks/anchors/llmcompressor_gptq.py", str(tmp / "hf"), str(calib), str(out)]
    command += ["--bits", str(bits), "--group", str(group), *(["--symmetric"] if symmetric else [])]
    subprocess.run(command, check=True, capture_output=True)
    weights = load_file(out)
    if max(int(v) for k, v in weights.items() if k.endswith(".levels")) > 2**bits:
        raise RuntimeError("llm-compressor left more than 2^bits values in a group")
    quantized = copy.deepcopy(model)
    state = {k.removeprefix("model."): v for k, v in weights.items() if k.endswith(".weight")}
    missing = set(state) - set(quantized.state_dict())
    if missing:
        raise RuntimeError(f"llm-compressor's weights name no module of the example LM: {sorted(missing)[:3]}")
    quantized.load_state_dict(state, strict=False)
    return quantized


def ort_rtn(plain: str, out: str, block: int) -> str:
    """onnxruntime's MatMulNBitsQuantizer (RTN, asymmetric) on the plain export's linears of ``layers.*``:
    every MatMul by a stored weight but the LM head's (the one producing the logits)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(plain)
    initializers = {t.name for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    skip = [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul" and (n.input[1] not in initializers or n.output[0] in outputs)
    ]
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=False, nodes_to_exclude=skip)
    quantizer.process()
    quantizer.model.save_model_to_file(out, use_external_data_format=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bytes", type=int, default=16384, help="held-out bytes scored (windows of 256)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--samples", type=int, default=16, help="calibration samples of 128 tokens")
    args = ap.parse_args()
    torch.set_num_threads(2)

    model = load_model()
    calibration = calibration_batches(args.samples, 128, 0)
    heldout = load_split("heldout")[: args.bytes]
    build = Builder(capture(model, calibration[0]), PassContext(calibration))

    print(f"## Linears of layers.* ({len(heldout):,} held-out bytes, windows of 256; {args.samples} x 128 calibration)")
    print("| format | stored bytes vs fp32 | perplexity | increase | vs rtn's increase |")
    print("|---|---:|---:|---:|---:|")
    results = {}
    base = None
    for name, passes in CONFIGS.items():
        graph = build(passes)
        ppl = perplexity(graph.module(), heldout, 256)
        base = ppl if base is None else base
        stored, dense = quantized_bytes(graph)
        results[name] = (graph, ppl)
        rtn = {"4-bit g128": "rtn 4-bit g128", "4-bit g32": "rtn 4-bit g32", "3-bit g128": "rtn 3-bit g128"}
        match = next((r for key, r in rtn.items() if key in name and "rtn" not in name), None)
        versus = f"{(ppl - base) / (results[match][1] - base):.2f}x" if match else ""
        ratio = f"{stored / dense:.4f}x" if dense else "1x"
        print(f"| {name} | {ratio} | {ppl:.4f} | {ppl - base:+.4f} | {versus} |")

    with tempfile.TemporaryDirectory() as tmp:
        print("\n## Anchor: llm-compressor's GPTQ (eager perplexity, same calibration windows)")
        if not ANCHOR_ENV.exists():
            print(f"skipped: {ANCHOR_ENV} is missing (bash scripts/anchors.sh makes it)")
        else:
            hf_llama_dir(model, Path(tmp) / "hf")
            print("| settings | llm-compressor perplexity | increase | graphpress (same settings) | increase |")
            print("|---|---:|---:|---:|---:|")
            for (bits, group, symmetric), ours in ANCHORS.items():
                anchored = llmcompressor_gptq(model, calibration, Path(tmp), bits, group, symmetric)
                ppl = perplexity(anchored, heldout, 256)
                mine = results[ours][1]
                grid = "symmetric" if symmetric else "asymmetric"
                print(
                    f"| {bits}-bit g{group} {grid} | {ppl:.4f} | {ppl - base:+.4f} | {mine:.4f} | {mine - base:+.4f} |"
                )

        paths = {}
        for label, graph, contrib, opset in [
            ("fp32", results["original (fp32)"][0], False, 18),
            (f"{SERVED}, standard ops (opset 18: unpack + Sub/Mul)", results[SERVED][0], False, 18),
            (f"{SERVED}, standard ops (opset 21: blocked DequantizeLinear)", results[SERVED][0], False, 21),
            (f"{SERVED}, MatMulNBits", results[SERVED][0], True, 18),
        ]:
            cfg = OnnxBackendConfig(
                target="onnx", filename=f"m{len(paths)}.onnx", ort_contrib_ops=contrib, opset=opset
            )
            record = build_backend(cfg, "onnx").build(graph, calibration[:1], Path(tmp))
            paths[label] = record.artifact
        for block in (32, 128):
            label = f"onnxruntime MatMulNBitsQuantizer RTN 4-bit block {block}"
            paths[label] = ort_rtn(paths["fp32"], str(Path(tmp) / f"ort{block}.onnx"), block)
        print("\n## Anchor: onnxruntime's quantizer on the plain export (perplexity in onnxruntime)")
        print("| model | perplexity | increase |")
        print("|---|---:|---:|")
        for label in [k for k in paths if "MatMulNBitsQuantizer" in k] + [f"{SERVED}, MatMulNBits"]:
            ppl = perplexity(OnnxLM(paths[label], threads=2), heldout, 256)
            print(f"| {label} | {ppl:.4f} | {ppl - base:+.4f} |")

        print(f"\n## onnxruntime CPU sessions, 2 threads (interleaved medians, {args.repeats} calls)")
        sessions = {label: OnnxLM(path, threads=2) for label, path in paths.items()}
        memory = {label: session_memory(path) for label, path in paths.items()}
        long, short = heldout[:256].unsqueeze(0), heldout[:1].unsqueeze(0)
        lat_long = interleaved_median(sessions, long, args.repeats)
        lat_short = interleaved_median(sessions, short, args.repeats * 10)
        print("| model | file MiB | session RSS MiB | vs fp32 | 256-token ms | vs fp32 | 1-token ms | vs fp32 |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for label, path in paths.items():
            size = Path(path).stat().st_size / 2**20
            print(
                f"| {label} | {size:.2f} | {memory[label] / 2**20:.1f} | {memory[label] / memory['fp32']:.2f}x "
                f"| {lat_long[label] * 1e3:.2f} | {lat_long[label] / lat_long['fp32']:.2f}x "
                f"| {lat_short[label] * 1e3:.3f} | {lat_short[label] / lat_short['fp32']:.2f}x |"
            )


if __name__ == "__main__":
    main()
