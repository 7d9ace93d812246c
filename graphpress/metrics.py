"""Metrics: output error between two runs, and held-out perplexity of a causal LM."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def logits_of(output) -> torch.Tensor:
    """Logits from a plain tensor, a tuple whose first item is logits, or an HF ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seq_len: int = 256, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `seq_len` tokens.

    Each window is scored on its own (no context carried across windows), so the
    figure depends only on the model, the text and `seq_len`.
    """
    if tokens.dim() != 1 or len(tokens) < seq_len:
        raise ValueError(f"need a 1-D token tensor of at least seq_len={seq_len} tokens")
    windows = tokens[: len(tokens) // seq_len * seq_len].view(-1, seq_len)
    total_nll, count = 0.0, 0
    for batch in windows.split(batch_size):
        logits = logits_of(model(batch)).float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        count += batch[:, 1:].numel()
    return math.exp(total_nll / count)


def compare_outputs(outputs: list, references: list) -> dict[str, float]:
    """Error of ``outputs`` vs ``references`` over every tensor leaf of every sample.

    rel_l2 = ||y - r||_2 / ||r||_2, max_abs = max |y - r|, cosine_distance = 1 - cos(y, r),
    each over all samples and outputs flattened into one vector.
    """
    import torch.utils._pytree as pytree

    diff_sq = ref_sq = dot = out_sq = 0.0
    max_abs = 0.0
    for out, ref in zip(outputs, references, strict=True):
        out_leaves = [t for t in pytree.tree_leaves(_plain(out)) if isinstance(t, torch.Tensor)]
        ref_leaves = [t for t in pytree.tree_leaves(_plain(ref)) if isinstance(t, torch.Tensor)]
        if len(out_leaves) != len(ref_leaves):
            raise ValueError(f"output structure differs: {len(out_leaves)} tensors vs {len(ref_leaves)}")
        for y, r in zip(out_leaves, ref_leaves):
            if y.shape != r.shape:
                raise ValueError(f"output shape differs: {tuple(y.shape)} vs {tuple(r.shape)}")
            y, r = y.detach().double(), r.detach().double()
            diff_sq += (y - r).pow(2).sum().item()
            ref_sq += r.pow(2).sum().item()
            out_sq += y.pow(2).sum().item()
            dot += (y * r).sum().item()
            if y.numel():
                max_abs = max(max_abs, (y - r).abs().max().item())
    rel_l2 = math.sqrt(diff_sq) / math.sqrt(ref_sq) if ref_sq > 0 else math.sqrt(diff_sq)
    cosine = dot / math.sqrt(out_sq * ref_sq) if out_sq > 0 and ref_sq > 0 else 1.0
    return {"rel_l2": rel_l2, "max_abs": max_abs, "cosine_distance": 1.0 - cosine}


def _plain(output):
    """HF ModelOutput -> its tuple, so models with and without transformers compare alike."""
    return output.to_tuple() if hasattr(output, "to_tuple") else output
