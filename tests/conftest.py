"""Shared fixtures: small models built in code (no downloads) and the bundled trained example LM."""

from __future__ import annotations

import hashlib

import pytest
import torch

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
        use_cache=False,
        attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(config).eval()
