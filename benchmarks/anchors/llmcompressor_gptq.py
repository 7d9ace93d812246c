"""Anchor: llm-compressor's GPTQ on a local Hugging Face checkpoint; writes the dequantized linear weights.

Runs in the anchors' own environment (``bash scripts/anchors.sh`` makes ``.venv-anchors``),
never in graphpress's: it imports no graphpress code.

    .venv-anchors/bin/python benchmarks/anchors/llmcompressor_gptq.py HF_DIR CALIB.pt OUT.safetensors \
        [--bits 4] [--group 128] [--symmetric]

CALIB.pt holds one (samples, seq_len) int64 tensor of token ids: the same windows graphpress
calibrates on. OUT holds, per quantized linear, ``<module path>.weight`` as llm-compressor
leaves it after ``oneshot``: rounded onto its grid and dequantized (so any runtime can score
it), plus ``<path>.levels``, the most distinct values in any one (row, group), as evidence.
llm-compressor needs a linear's columns divisible by the group: where they are not (704-column
down projections at group 128) that linear gets the largest power-of-two group that divides
them (64), finer than graphpress's padded last block, so the anchor is favoured there.
"""

from __future__ import annotations

import argparse
import re

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, QuantizationStrategy
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from safetensors.torch import save_file
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast


def byte_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A stand-in processor (oneshot insists on one): the data arrive as token ids and are never tokenized."""
    table = {f"<{i}>": i for i in range(vocab)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(table, "<0>")), pad_token="<0>")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("calibration")
    ap.add_argument("out")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--symmetric", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, local_files_only=True)
    ids = torch.load(args.calibration)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    groups = {}  # group size -> module paths; llm-compressor needs the columns divisible by it
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            group = args.group
            while module.in_features % group:
                group //= 2
            groups.setdefault(group, []).append(f"re:^{re.escape(name)}$")
    schemes = {
        f"group_{group}": QuantizationScheme(
            targets=names,
            weights=QuantizationArgs(
                num_bits=args.bits, strategy=QuantizationStrategy.GROUP, group_size=group, symmetric=args.symmetric
            ),
        )
        for group, names in groups.items()
    }
    recipe = GPTQModifier(config_groups=schemes, dampening_frac=0.01)
    oneshot(
        model=model,
        processor=byte_tokenizer(model.config.vocab_size),
        dataset=data,
        recipe=recipe,
        max_seq_length=ids.shape[1],
        num_calibration_samples=ids.shape[0],
    )
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            w = module.weight.detach().float().contiguous()
            group = next(g for g, names in groups.items() if f"re:^{re.escape(name)}$" in names)
            levels = max(len(torch.unique(g)) for g in w.reshape(-1, group))
            out[name + ".weight"] = w
            out[name + ".levels"] = torch.tensor([levels])
    save_file(out, args.out)


if __name__ == "__main__":
    main()
