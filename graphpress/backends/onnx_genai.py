"""The onnx target's onnxruntime-genai form: a folder that ``onnxruntime_genai.Model(dir)`` runs.

onnxruntime-genai drives a decoder through named inputs and outputs described in a
``genai_config.json``. graphpress's decode step already follows its conventions (``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.%d.key`` / ``.value`` in; ``logits``,
``present.%d.key`` / ``.value`` out; one graph for the prompt and every token), so the folder
is the ONNX file, that config and the checkpoint's tokenizer files. Where GroupQueryAttention
alone reads a float cache, the runtime gives past and present one buffer of the longest length
(``past_present_share_buffer``: no copy of the cache per step); else it keeps them apart.

What it carries: a key and a value per layer, of one shape in every layer (the config has one
head size), in floats or as kv_cache_quant's static-scale codes (GroupQueryAttention's quantized
cache); gqa_to_mla's absorbed latent arrives as one such head (:mod:`.latent_kv`). KIVI's
dynamic groups have no form in the op; those graphs are refused with the reason.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import BackendError
from ..ir import Graph

GQA = torch.ops.graphpress.group_query_attention.default

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
CONFIG = "genai_config.json"
DEFAULT_CONTEXT = 4096  # where the model does not say how many positions it takes


def check(graph: Graph, spec_path: str, notes: tuple[str, ...] = ()) -> None:
    """Refuse, with the reason (and ``notes`` on what was not rewritten), a graph onnxruntime-genai cannot drive."""
    where = f"{spec_path}.runtime: onnxruntime-genai"
    if graph.cache is None:
        raise BackendError(f'{where} runs decode graphs; set "capture": {{"mode": "decode"}}')
    if graph.cache.step_tokens is not None:
        raise BackendError(
            f"{where} feeds a prompt in one call, and this step graph takes one token (its attention pins the "
            "query length under export); load the model with attn_implementation='sdpa'"
        )
    if _suffix(graph) is None:
        entries = list(graph.cache)
        names = ", ".join(e.name for e in entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise BackendError(
            f"{where} keeps a key and a value per layer (floats, or kv_cache_quant's static-scale codes); this "
            f"graph caches {names} (GroupQueryAttention has no form for gqa_to_mla's latent unless absorbed, nor "
            "for kv_cache_quant's dynamic KIVI layouts). Use the plain onnx runtime for it"
            + "".join(f"; {n}" for n in notes)
        )
    shapes = {}
    for entry in graph.cache:
        shapes.setdefault(entry.shape[1:], []).append(entry.name.split(".")[1])
    if len(shapes) > 1:
        found = "; ".join(
            f"layers {', '.join(sorted(set(layers), key=int))}: {s[0]} x {s[-1]}" for s, layers in shapes.items()
        )
        raise BackendError(
            f"{where} takes one KV head count and head size for every layer ({CONFIG}'s head_size); this graph's "
            f"caches differ ({found}): convert every layer alike (gqa_to_mla's targets, kv_rank)"
        )


def _suffix(graph: Graph) -> str | None:
    """'' for a cache of float keys and values per layer, '.codes' for static-scale codes; None otherwise."""
    entries = list(graph.cache)
    for suffix in ("", ".codes"):
        if len(entries) % 2 == 0 and all(
            e.name == f"layers.{i // 2}.{part}{suffix}" and e.kind == f"{part}{suffix}"
            for i, (e, part) in enumerate(zip(entries, ["key", "value"] * len(entries)))
        ):
            return suffix
    return None


def shares_buffers(graph: Graph) -> bool:
    """Whether the runtime may give past and present one buffer of the longest length (no copy of the cache per
    step): every cache input read by GroupQueryAttention alone, which appends in place and takes the valid
    length from ``attention_mask``, and the cache in floats (onnxruntime shares quantized caches on CUDA only)."""

    def harmless(user, entry) -> bool:  # the attention itself, or a size other than the sequence length
        size = user.target is torch.ops.aten.sym_size.int and user.args[1] % len(entry.shape) != entry.seq_axis
        return user.op == "call_function" and (user.target is GQA or size)

    only_attention = all(harmless(u, e) for e in graph.cache for u in graph.cache_input(e.name).users)
    return only_attention and all(e.dtype.startswith("float") for e in graph.cache)


def _text_config(source):
    """The model's (text) config, or None."""
    config = getattr(getattr(source, "model", None), "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def context_length(source) -> int | None:
    """The most positions the model was built for (its config's), or None where it does not say."""
    value = _first(_text_config(source), "max_position_embeddings", "max_seq_len", "n_positions")
    return int(value) if value is not None else None


def write(folder: Path, graph: Graph, filename: str, source) -> list[str]:
    """``genai_config.json`` for ``folder/filename``, and the checkpoint's tokenizer files beside it; warnings."""
    model, text = getattr(source, "model", None), _text_config(source)
    key, suffix = graph.cache.entries[0], _suffix(graph)
    packed = 2 if key.dtype == "uint8" else 1  # two 4-bit codes a byte
    context = context_length(source) or DEFAULT_CONTEXT
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": filename,
        "head_size": key.shape[3] * packed,
        "num_key_value_heads": key.shape[1],
        "num_hidden_layers": len(graph.cache) // 2,
        "inputs": {
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "position_ids": "position_ids",
            "past_key_names": f"past_key_values.%d.key{suffix}",
            "past_value_names": f"past_key_values.%d.value{suffix}",
        },
        "outputs": {
            "logits": "logits",
            "present_key_names": f"present.%d.key{suffix}",
            "present_value_names": f"present.%d.value{suffix}",
        },
    }
    for name, keys in (("hidden_size", ("hidden_size", "n_embd")), ("num_attention_heads", ("num_attention_heads",))):
        value = _first(text, *keys)
        if value is not None:
            decoder[name] = value
    vocab = int(graph.user_outputs()[0].meta["val"].shape[-1])
    tokens = {name: _token_id(model, text, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    outside = {name: t for name, t in tokens.items() if t is not None and not 0 <= t < vocab}
    tokens.update(dict.fromkeys(outside))  # onnxruntime-genai refuses ids outside the vocabulary
    eos = tokens["eos_token_id"] if tokens["eos_token_id"] is not None else 0
    body = {
        "model": {
            "type": "decoder",
            "context_length": int(context),
            "vocab_size": vocab,
            "decoder": decoder,
            "bos_token_id": tokens["bos_token_id"] if tokens["bos_token_id"] is not None else eos,
            "eos_token_id": eos,
            "pad_token_id": tokens["pad_token_id"] if tokens["pad_token_id"] is not None else eos,
        },
        "search": {
            "do_sample": False,
            "max_length": int(context),
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": shares_buffers(graph),
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
            "repetition_penalty": 1.0,
        },
    }
    (folder / CONFIG).write_text(json.dumps(body, indent=2) + "\n")
    copied = copy_tokenizer(source, folder)
    warnings = [
        f"{CONFIG}: the model's {name} {t} is outside its vocabulary of {vocab}: left out"
        for name, t in outside.items()
    ]
    if tokens["eos_token_id"] is None:
        warnings.append(f"{CONFIG}: the model names no eos_token_id; generation stops at token 0 (edit eos_token_id)")
    if not copied:
        warnings.append(f"{CONFIG}: no tokenizer files (the model is not a checkpoint that has them): feed token ids")
    return warnings


def copy_tokenizer(source, folder: Path) -> list[str]:
    """Copy the checkpoint's tokenizer files (those it has) into ``folder``; their names."""
    directory = getattr(source, "directory", None)
    copied = [name for name in TOKENIZER_FILES if directory is not None and (Path(directory) / name).is_file()]
    for name in copied:
        shutil.copyfile(Path(directory) / name, folder / name)
    return copied


def greedy_agreement(folder: Path, graph: Graph, prompt: torch.Tensor, new_tokens: int) -> dict:
    """Greedy tokens of onnxruntime-genai on ``folder`` against ``graph``'s eager decode loop (prompt in one call)."""
    import onnxruntime_genai as og

    from ..runtime import TorchDecoder, greedy_generate

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.to(torch.int32).numpy())
    while not generator.is_done():
        generator.generate_next_token()
    theirs = list(generator.get_sequence(0))[prompt.shape[1] :]  # shorter where it stopped at eos_token_id
    ours = greedy_generate(TorchDecoder(graph), prompt, new_tokens)[0, prompt.shape[1] :].tolist()
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(theirs))
    return {"prompt_tokens": prompt.shape[1], "generated": len(theirs), "agree": agree}


def _first(config, *names):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _token_id(model, text_config, name: str) -> int | None:
    """A special token id from the generation config, else the model config (the first of a list)."""
    for config in (getattr(model, "generation_config", None), text_config):
        value = getattr(config, name, None)
        if isinstance(value, list | tuple):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None
