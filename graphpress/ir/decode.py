"""Decode mode: one decoding step of a causal LM, its KV cache explicit at the graph boundary.

The captured step is ``step(input_ids (B, 1), position_ids (B, 1), cache: list[Tensor])
-> (logits (B, 1, V), cache')``: every cache tensor comes in holding the past tokens and
goes out with this token appended on its sequence axis. With the cache a plain graph
input/output, a pass that changes what is cached (a latent instead of K and V, packed
integers instead of floats) changes the graph's signature, which is where a runtime
(and the ONNX file) sees the saving.

The step is one token: transformers' attention specialises on ``q_len > 1`` under
export, so a prompt is fed through the same graph token by token (``graphpress.runtime``).

:class:`CacheLayout` says what each cache tensor is; it travels with the Graph and into
the ONNX file's metadata, so runtimes need no model code.
"""

from __future__ import annotations

import json
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


@dataclass(frozen=True)
class CacheLayout:
    """The cache tensors of a decode graph, in the order they appear in its inputs and outputs."""

    entries: tuple[CacheEntry, ...]

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

    def to_json(self) -> str:
        return json.dumps([asdict(e) for e in self.entries])

    @classmethod
    def from_json(cls, text: str) -> CacheLayout:
        return cls(tuple(CacheEntry(**{**e, "shape": tuple(e["shape"])}) for e in json.loads(text)))


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
            pairs = model.init_kv_cache(1)
            k, v = pairs[0]
            self.layout = kv_layout(len(pairs), k.shape[1], k.shape[3], k.dtype)
            if v.shape != k.shape:
                raise CaptureError(f"{type(model).__name__}.init_kv_cache: key {k.shape} and value {v.shape} differ")
        else:
            raise CaptureError(
                f"decode capture needs a transformers causal LM, or a model with init_kv_cache(batch_size) and "
                f"forward(input_ids, past_key_values=, position_ids=) -> (logits, present) (see examples/tiny_llama); "
                f"{type(model).__name__} has neither"
            )

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: list[torch.Tensor]):
        pairs = [(cache[i], cache[i + 1]) for i in range(0, len(cache), 2)]
        if self.hf:
            from transformers import DynamicCache

            past = DynamicCache(ddp_cache_data=pairs)  # full layers: a sliding window is the mask's job
            # An explicit all-ones mask keeps transformers from choosing is_causal by shape.
            mask = torch.ones(input_ids.shape[0], cache[0].shape[2] + input_ids.shape[1], dtype=torch.long)
            out = self.model(
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=mask,
                past_key_values=past,
                use_cache=True,
            )
            logits, present = out.logits, [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        else:
            logits, present = self.model(input_ids, past_key_values=pairs, position_ids=position_ids)
        return logits, [t for pair in present for t in pair]


def decode_example(layout: CacheLayout, batch_size: int, past_len: int = 3) -> tuple:
    """Inputs for one step after ``past_len`` tokens (zeros: only shapes matter to export)."""
    caches = []
    for entry in layout:
        shape = [batch_size if d is None else d for d in entry.shape]
        shape[entry.seq_axis] = past_len
        caches.append(torch.zeros(shape, dtype=getattr(torch, entry.dtype)))
    ids = torch.zeros(batch_size, 1, dtype=torch.long)
    return ids, torch.full((batch_size, 1), past_len, dtype=torch.long), caches


def _is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)
