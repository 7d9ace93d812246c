"""Shared fixtures: small models built in code (no downloads) and the bundled trained example LM."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on the CPU in its interpreter (set before they are defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from examples.tiny_llama import load_model
from examples.tiny_llama.model import TinyLlama, TinyLlamaConfig, init_weights

torch.set_num_threads(2)


def state_hash(model: torch.nn.Module) -> str:
    """A hash of every tensor's bytes, names and dtypes: equal iff the state is byte-identical."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="session")
def tiny_llama() -> TinyLlama:
    """A 2-layer TinyLlama with random (seeded) weights: fast to capture and export."""
    model = TinyLlama(TinyLlamaConfig(num_layers=2))
    init_weights(model, seed=0)
    return model.eval()


@pytest.fixture(scope="session")
def trained_llama() -> TinyLlama:
    """The bundled, trained 4-layer example LM."""
    return load_model()


@pytest.fixture
def token_batch() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def hf_llama():
    """transformers' LlamaForCausalLM from a small config (GQA: 4 query heads, 2 KV heads)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(config).eval()


class ToyAttention(torch.nn.Module):
    """One GQA attention layer with a choice of position encoding: 'half' (Llama), 'interleaved' (GPT-J),
    'reversed' (a rotation no pass knows: x * cos - flip(x) * sin) or none."""

    def __init__(
        self, rope: str | None, d: int = 32, heads: int = 4, kv_heads: int = 2, bias: bool = False, freqs=None
    ):
        super().__init__()
        self.rope, self.heads, self.kv_heads, self.hd = rope, heads, kv_heads, d // heads
        self.freqs = 0.1 * torch.arange(1, self.hd // 2 + 1) if freqs is None else freqs  # one per rotated pair
        self.q_proj = torch.nn.Linear(d, heads * self.hd, bias=bias)
        self.k_proj = torch.nn.Linear(d, kv_heads * self.hd, bias=bias)
        self.v_proj = torch.nn.Linear(d, kv_heads * self.hd, bias=bias)
        self.o_proj = torch.nn.Linear(heads * self.hd, d, bias=bias)

    def _rotate(self, x, cos, sin):
        if self.rope == "reversed":
            return x * cos + (-x.flip(-1)) * sin
        if self.rope == "half":
            h = x.shape[-1] // 2
            return x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin
        pairs = torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)
        return x * cos + pairs * sin

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.hd).transpose(1, 2)
        if self.rope:
            freqs = self.freqs
            pairs = freqs.repeat_interleave(2) if self.rope == "interleaved" else torch.cat((freqs, freqs))
            angles = torch.arange(s)[:, None] * pairs
            q, k = self._rotate(q, angles.cos(), angles.sin()), self._rotate(k, angles.cos(), angles.sin())
        group = self.heads // self.kv_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
