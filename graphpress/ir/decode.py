"""Decode mode: one decoding step of a causal LM, its KV cache explicit at the graph boundary.

The captured step is ``step(input_ids (B, S), attention_mask (B, P + S), position_ids (B, S),
cache: list[Tensor]) -> (logits (B, S, V), cache')``: every cache tensor comes in holding
the P past tokens and goes out with these S appended on its sequence axis. One graph
serves the prompt (S = prompt length, P = 0) and every decoding step (S = 1), as
onnxruntime-genai runs its models. ``attention_mask`` covers past and new tokens (0: a pad,
left or right), so sequences of unequal length share a batch. With the cache a plain
graph input/output, a pass that changes what is cached (a latent instead of K and V,
packed integers instead of floats) changes the graph's signature, which is where a runtime
(and the ONNX file) sees the saving.

Attention that branches on the query length in Python (transformers' eager kernels) pins
S under ``torch.export``; such a model's step takes one token (``CacheLayout.step_tokens``)
and runtimes feed its prompt token by token (:mod:`graphpress.ir.capture` decides).

:class:`CacheLayout` says what each cache tensor is; it travels with the Graph and into
the ONNX file's metadata, so runtimes need no model code.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import CaptureError


@dataclass(frozen=True)
class CacheEntry:
    """One cache tensor. ``shape`` has None for the batch and sequence axes.

    One slot on the sequence axis covers ``tokens_per_slot`` tokens (a quantization
    group's scales cover several). A ``max_len`` entry is a bounded window (a
    full-precision residual): it does not grow with the context.
    """

    name: str
    kind: str
    shape: tuple[int | None, ...]
    seq_axis: int
    dtype: str = "float32"
    tokens_per_slot: int = 1
    max_len: int | None = None

    @property
    def numbers_per_slot(self) -> int:
        n = 1
        for i, d in enumerate(self.shape):
            if i != self.seq_axis and d is not None:
                n *= d
        return n

    @property
    def bytes_per_slot(self) -> int:
        return self.numbers_per_slot * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    @property
    def bytes_per_token(self) -> float:
        """What the entry adds per token of context (0 for a bounded window)."""
        return 0 if self.max_len is not None else self.bytes_per_slot / self.tokens_per_slot

    def empty(self, batch_size: int) -> torch.Tensor:
        shape = [batch_size if d is None and i != self.seq_axis else d for i, d in enumerate(self.shape)]
        shape[self.seq_axis] = 0
        return torch.zeros(shape, dtype=getattr(torch, self.dtype))


STEP_INPUTS = ("input_ids", "attention_mask", "position_ids")  # then the cache entries


@dataclass(frozen=True)
class CacheLayout:
    """The cache tensors of a decode graph, in the order they appear in its inputs and outputs.

    ``step_tokens`` is how many tokens one step takes: None for any number, 1 for a graph
    captured on one token.
    """

    entries: tuple[CacheEntry, ...]
    step_tokens: int | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def index(self, name: str) -> int:
        for i, entry in enumerate(self.entries):
            if entry.name == name:
                return i
        raise KeyError(name)

    @property
    def bytes_per_token(self) -> float:
        """Bytes the cache grows by per token per sequence (all layers; bounded windows excluded)."""
        return sum(e.bytes_per_token for e in self.entries)

    @property
    def window_bytes(self) -> int:
        """Bytes of the bounded windows at their largest, per sequence (all layers)."""
        return sum(e.bytes_per_slot * e.max_len for e in self.entries if e.max_len is not None)

    def bytes_at(self, context: int) -> float:
        """Bytes held for one sequence of ``context`` tokens (windows counted full)."""
        return self.bytes_per_token * context + self.window_bytes

    def empty(self, batch_size: int) -> list[torch.Tensor]:
        return [e.empty(batch_size) for e in self.entries]

    def with_entries(self, entries) -> CacheLayout:
        return CacheLayout(tuple(entries), self.step_tokens)

    def to_json(self) -> str:
        return json.dumps({"entries": [asdict(e) for e in self.entries], "step_tokens": self.step_tokens})

    @classmethod
    def from_json(cls, text: str) -> CacheLayout:
        data = json.loads(text)
        if isinstance(data, list):  # files written before steps took several tokens
            data = {"entries": data, "step_tokens": 1}
        entries = tuple(CacheEntry(**{**e, "shape": tuple(e["shape"])}) for e in data["entries"])
        return cls(entries, data["step_tokens"])


def kv_layout(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> CacheLayout:
    """The standard cache: per layer a key and a value, each (B, kv_heads, T, head_dim)."""
    dtype_name = str(dtype).removeprefix("torch.")
    return CacheLayout(
        tuple(
            CacheEntry(f"layers.{layer}.{kind}", kind, (None, num_kv_heads, None, head_dim), 2, dtype_name)
            for layer in range(num_layers)
            for kind in ("key", "value")
        )
    )


class DecodeStep(nn.Module):
    """Adapts a causal LM to the flat decode-step signature that torch.export captures."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.hf = _is_transformers_model(model)
        if self.hf:
            cfg = model.config
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
            dtype = next(model.parameters()).dtype
            self.layout = kv_layout(cfg.num_hidden_layers, kv_heads, head_dim, dtype)
        elif callable(getattr(model, "init_kv_cache", None)):
            # A model without attention_mask still runs; its step ignores the mask (unpadded batches only).
            self.takes_mask = "attention_mask" in inspect.signature(model.forward).parameters
            pairs = model.init_kv_cache(1)
            k, v = pairs[0]
            self.layout = kv_layout(len(pairs), k.shape[1], k.shape[3], k.dtype)
            if v.shape != k.shape:
                raise CaptureError(f"{type(model).__name__}.init_kv_cache: key {k.shape} and value {v.shape} differ")
        else:
            raise CaptureError(
                f"decode capture needs a transformers causal LM, or a model with init_kv_cache(batch_size) and "
                f"forward(input_ids, past_key_values=, position_ids=, attention_mask=) -> (logits, present) "
                f"(see examples/tiny_llama); "
                f"{type(model).__name__} has neither"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: list[torch.Tensor],
    ):
        pairs = [(cache[i], cache[i + 1]) for i in range(0, len(cache), 2)]
        if self.hf:
            from transformers import DynamicCache

            past = DynamicCache(ddp_cache_data=pairs)  # full layers: a sliding window is the mask's job
            out = self.model(
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=attention_mask,
                past_key_values=past,
                use_cache=True,
            )
            logits, present = out.logits, [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        else:
            mask = {"attention_mask": attention_mask} if self.takes_mask else {}
            logits, present = self.model(input_ids, past_key_values=pairs, position_ids=position_ids, **mask)
        return logits, [t for pair in present for t in pair]


def decode_example(layout: CacheLayout, batch_size: int, past_len: int = 3, new_tokens: int = 2) -> tuple:
    """Inputs for one step of ``new_tokens`` after ``past_len`` (zeros: only shapes matter to export)."""
    caches = []
    for entry in layout:
        shape = [batch_size if d is None else d for d in entry.shape]
        shape[entry.seq_axis] = past_len
        caches.append(torch.zeros(shape, dtype=getattr(torch, entry.dtype)))
    ids = torch.zeros(batch_size, new_tokens, dtype=torch.long)
    mask = torch.ones(batch_size, past_len + new_tokens, dtype=torch.long)
    positions = torch.arange(past_len, past_len + new_tokens).expand(batch_size, -1)
    return ids, mask, positions, caches


ANY_LENGTH_SDPA = "graphpress_sdpa"


def _sdpa_any_length(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' ``sdpa`` attention without its Python branches on the query length.

    transformers picks ``is_causal`` and GQA packing by ``q_len == 1`` / ``q_len > 1``;
    under export each test pins the length. With the explicit mask a decode step always
    has, both branches compute this: K/V heads repeated to the query heads, SDPA with the mask.
    ``repeat_interleave`` rather than expand + reshape, whose view check pins lengths of 1.
    """
    if attention_mask is None or kwargs.get("position_bias") is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
    )
    return out.transpose(1, 2).clone(memory_format=torch.contiguous_format), None  # no stride test: pins S


@contextlib.contextmanager
def any_length_attention(model: nn.Module) -> Iterator[None]:
    """While capturing, run a transformers model's ``sdpa`` attention as :func:`_sdpa_any_length`.

    Registered through transformers' own ``AttentionInterface`` under a name of its own;
    every config set to ``sdpa`` is switched for the capture and switched back after.
    Other implementations (eager, chosen by the user or the family) are left as they are.
    """
    if not _is_transformers_model(model):
        yield
        return
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ANY_LENGTH_SDPA, _sdpa_any_length)
    AttentionMaskInterface.register(ANY_LENGTH_SDPA, sdpa_mask)
    configs = {id(c): c for c in _configs(model)}.values()
    switched = [c for c in configs if getattr(c, "_attn_implementation_internal", None) == "sdpa"]
    for config in switched:
        config._attn_implementation_internal = ANY_LENGTH_SDPA
    try:
        yield
    finally:
        for config in switched:
            config._attn_implementation_internal = "sdpa"


def _configs(model: nn.Module) -> Iterator:
    """Every config object the model's modules hold, and their sub-configs."""
    todo = [getattr(m, "config", None) for m in model.modules()]
    while todo:
        config = todo.pop()
        if config is None or not hasattr(config, "sub_configs"):
            continue
        yield config
        todo.extend(getattr(config, key, None) for key in config.sub_configs)


def _is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)
