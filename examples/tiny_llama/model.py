"""TinyLlama: the project's bundled example LM.

A Llama-shaped causal LM small enough to train on two CPU cores: byte-level
vocabulary (256), RMSNorm, rotary position embeddings (half-split pairing, as
in Hugging Face Llama), grouped-query attention (8 query heads sharing 2 KV
heads) through ``scaled_dot_product_attention`` and a SwiGLU MLP.

Module paths follow Hugging Face Llama (``layers.N.self_attn.q_proj``,
``layers.N.mlp.down_proj``) so one spec targets both.

With ``past_key_values`` (a list of per-layer ``(key, value)`` tensors, each
``(batch, kv_heads, past_len, head_dim)``, keys after RoPE), ``position_ids`` and an
``attention_mask`` over past and new tokens (0: padding), ``forward`` runs a cached step
over any number of new tokens and returns ``(logits, present)``: the protocol
``graphpress`` decode-mode capture drives (with ``init_kv_cache``).

This directory is a *model directory* for ``graphpress compress --model``:
it provides ``load_model()``, ``example_inputs()`` and ``calibration_batches()``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class TinyLlamaConfig:
    vocab_size: int = 256
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    rope_theta: float = 10000.0
    max_seq_len: int = 1024
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, KV, S, D) -> (B, KV * n_rep, S, D): each KV head serves n_rep query heads."""
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, 1)  # not expand + reshape: its view check pins lengths of 1 under export


class Attention(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past=None, mask=None):
        """Causal self-attention; with ``past`` (key, value) also returns the grown cache."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        present = (k, v)
        n_rep = self.num_heads // self.num_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        if past is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))
        return out if past is None else (out, present)


class MLP(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past=None, mask=None):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, past, mask)
        attn, present = attn if past is not None else (attn, None)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x if past is None else (x, present)


class TinyLlama(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope_tables(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(seq_len, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def rope_at(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables (batch, 1, seq, head_dim) at the given positions."""
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos(), emb.sin()

    def init_kv_cache(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """An empty cache: per layer (key, value), each (batch, kv_heads, 0, head_dim)."""
        cfg = self.config
        shape = (batch_size, cfg.num_kv_heads, 0, cfg.head_dim)
        dtype = self.lm_head.weight.dtype
        return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in self.layers]

    def forward(self, input_ids: torch.Tensor, past_key_values=None, position_ids=None, attention_mask=None):
        x = self.embed_tokens(input_ids)
        if past_key_values is None:
            cos, sin = self.rope_tables(input_ids.shape[1])
            for layer in self.layers:
                x = layer(x, cos, sin)
            return self.lm_head(self.norm(x))
        past_len = past_key_values[0][0].shape[2]
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + input_ids.shape[1])[None].expand(input_ids.shape[0], -1)
        cos, sin = self.rope_at(position_ids)
        # Causal by cache slot (a left-padded row's positions start after its pads), minus the pads.
        slots = torch.arange(past_len + input_ids.shape[1], device=input_ids.device)
        mask = slots[None, :] <= torch.arange(input_ids.shape[1], device=input_ids.device)[:, None] + past_len
        if attention_mask is not None:  # gathered, so the mask's length stays a size of its own under export
            mask = mask[None] & attention_mask.index_select(1, slots)[:, None, :].bool()
        mask = mask[:, None] if mask.dim() == 3 else mask[None, None]
        mask = mask | ~mask.any(-1, keepdim=True)  # a pad's own query sees no key: no NaN from an empty softmax
        present = []
        for layer, past in zip(self.layers, past_key_values, strict=True):
            x, kv = layer(x, cos, sin, past, mask)
            present.append(kv)
        return self.lm_head(self.norm(x)), present


def init_weights(model: TinyLlama, seed: int) -> None:
    """GPT-2-style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2L)."""
    gen = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / (2 * model.config.num_layers) ** 0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.copy_(torch.randn(p.shape, generator=gen) * residual_std)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def load_model(path: str | Path = HERE) -> TinyLlama:
    """The trained checkpoint, in fp32 (stored as fp16 to keep the repo small)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = TinyLlamaConfig(**json.loads((path / "config.json").read_text()))
    model = TinyLlama(cfg)
    state = {k: v.float() for k, v in load_file(path / "model.safetensors").items()}
    model.load_state_dict(state)
    return model.eval()


def save_model(model: TinyLlama, path: str | Path = HERE) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(asdict(model.config), indent=2) + "\n")
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, path / "model.safetensors")


def example_inputs(batch: int = 1, seq_len: int = 64) -> tuple[torch.Tensor]:
    from .data import load_split

    tokens = load_split("calibration")[: batch * seq_len]
    return (tokens.view(batch, seq_len),)


def calibration_batches(samples: int, seq_len: int, seed: int) -> list[tuple[torch.Tensor]]:
    """`samples` windows of `seq_len` bytes from the calibration split, chosen by `seed`."""
    from .data import load_split, random_windows

    return [(w[None],) for w in random_windows(load_split("calibration"), samples, seq_len, seed)]


def tokenize(text: str) -> list[int]:
    """The model's tokenizer: UTF-8 bytes (vocab 256), so `calibration.text` / `evaluate.perplexity.text` work."""
    return list(text.encode("utf-8"))
