"""Evaluation in the pipeline (spec ``evaluate``): held-out perplexity and lm-evaluation-harness tasks of the
original model, the compressed graph in eager PyTorch and every artifact in its own runtime, on the same data,
so the figures compare directly (perplexity equals ``examples/tiny_llama/evaluate.py``'s on its text).

An artifact is run the way its backend's validation ran it (the runner ``Backend.compare_with_eager`` was
given): a forward artifact called on a batch of token ids, a decode step fed each sequence token by token from
an empty cache (what generation reads) or as one prompt.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import harness
from .calibration import token_stream
from .errors import SpecError
from .ir import Graph
from .metrics import logits_of, perplexity
from .progress import step
from .runtime import TorchDecoder, prefill, teacher_forced_logits
from .schema.spec import EvaluateConfig

FIELD = "evaluate.perplexity"
RUNTIMES = {"onnx": "onnxruntime", "tvm": "TVM", "mlir": "torch-mlir reference", "cuda": "Triton kernels"}
"""What runs each target's artifact when its validation (and so evaluation) calls it."""


@dataclass
class Scored:
    """One model evaluation scores: token ids (B, L) -> logits (B, L, V), or None with why it cannot run."""

    name: str
    runs_in: str
    bytes: int
    lm: Callable[[torch.Tensor], torch.Tensor] | None
    why_not: str | None = None
    required: bool = False
    """The original and the compressed graph must score; an artifact that fails is reported, not fatal."""


def prepare(cfg: EvaluateConfig, tokenize: Callable[[str], list[int]] | None) -> torch.Tensor | None:
    """Read and check the evaluation data before any compression work: the perplexity tokens (returned) and
    the lm-eval tasks (loaded once to fail early on a missing package, task or data file)."""
    if cfg.lm_eval is not None:
        harness.check(cfg.lm_eval, tokenize)
    if cfg.perplexity is None:
        return None
    p = cfg.perplexity
    return token_stream(p.text, p.tokens, tokenize, FIELD, p.seq_len, p.max_tokens)


def check(graph: Graph, argument_names: list[str], model, tokens: torch.Tensor | None) -> None:
    """Before the passes run: the model can be scored. Evaluation feeds token ids alone (a forward graph captured
    with more inputs cannot take them), and every perplexity token must be one of the model's logits."""
    if graph.cache is None and len(argument_names) != 1:
        raise SpecError(
            [
                (
                    "evaluate",
                    f"the captured forward takes ({', '.join(argument_names)}); evaluation calls it with token ids "
                    "alone: capture it with example inputs of token ids only, or use capture.mode 'decode'",
                )
            ]
        )
    if tokens is None:
        return
    with torch.no_grad():
        vocabulary = logits_of(model(torch.zeros(1, 2, dtype=torch.long))).shape[-1]
    if int(tokens.max()) >= vocabulary or int(tokens.min()) < 0:
        bad = int(tokens.max()) if int(tokens.max()) >= vocabulary else int(tokens.min())
        raise SpecError([(FIELD, f"token id {bad} is outside the model's {vocabulary} logits (not its tokenizer?)")])


def evaluate(
    cfg: EvaluateConfig, tokens, tokenize, model, original: Graph, graph: Graph, backends, records
) -> tuple[dict, list[str]]:
    """({'perplexity': {...}, 'lm_eval': {...}}, warnings): every metric asked for, for the original, the compressed
    graph, then each backend's artifact (one that fails to run is a row with its error and a warning)."""
    models = [
        Scored("original", "eager PyTorch", original.summary().bytes, model, required=True),
        Scored("compressed", "eager PyTorch", graph.summary().bytes, _graph_lm(graph, cfg.decode), required=True),
    ]
    for i, (backend, record) in enumerate(zip(backends, records)) if cfg.artifacts else ():
        name, runs_in = f"backends[{i}] {record['target']}", RUNTIMES.get(record["target"], record["target"])
        size = sum(record["files"].values())
        if backend.runners is None:
            why = "its artifact is specialised to one input shape (no runner for other shapes)"
            models.append(Scored(name, runs_in, size, None, why))
        else:
            models.append(Scored(name, runs_in, size, _artifact_lm(graph, *backend.runners, cfg.decode)))
    results, warnings = {}, []
    if cfg.perplexity is not None:
        p = cfg.perplexity
        rows = [_scored(m, lambda lm: {"perplexity": perplexity(lm, tokens, p.seq_len, p.batch_size)}) for m in models]
        data = p.text if p.text is not None else p.tokens
        scored = len(tokens) // p.seq_len * p.seq_len
        results["perplexity"] = {"data": data, "tokens": scored, "seq_len": p.seq_len, "decode": cfg.decode}
        results["perplexity"]["rows"] = rows
    if cfg.lm_eval is not None:
        rows = [_scored(m, lambda lm: {"tasks": harness.run(cfg.lm_eval, lm, tokenize)}) for m in models]
        results["lm_eval"] = {"tasks": cfg.lm_eval.tasks, "limit": cfg.lm_eval.limit, "rows": rows}
    for metric in results.values():
        warnings += [
            f"evaluate: {r['model']} could not be scored: {r['error']}" for r in metric["rows"] if "error" in r
        ]
    return results, warnings


def _scored(model: Scored, score: Callable[[Callable], dict]) -> dict:
    row = {"model": model.name, "runs_in": model.runs_in, "bytes": model.bytes}
    if model.lm is None:
        return {**row, "error": model.why_not}
    start = time.perf_counter()
    try:
        with step(f"evaluate: {model.name} ({model.runs_in})"):
            row.update(score(model.lm))
    except SpecError:
        raise
    except Exception as exc:
        if model.required:
            raise
        return {**row, "error": " ".join(str(exc).split())[:300] or type(exc).__name__}
    return {**row, "seconds": round(time.perf_counter() - start, 3)}


def _graph_lm(graph: Graph, decode: str):
    if graph.cache is None:
        module = graph.module()
        return lambda batch: module(batch)
    return _decoder_lm(lambda: TorchDecoder(graph), decode)


def _artifact_lm(graph: Graph, run, decoder, decode: str):
    if graph.cache is None:
        return lambda batch: run([batch])[0]
    return _decoder_lm(decoder, decode)


def _decoder_lm(decoder, decode: str):
    made = decoder()
    if decode == "prompt":
        return lambda batch: prefill(made, batch)[0]
    return lambda batch: teacher_forced_logits(made, batch)
