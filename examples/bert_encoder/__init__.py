"""A BERT-like encoder from a small ``transformers`` config, as a model directory.

``graphpress compress --model examples/bert_encoder --spec examples/bert_encoder/spec.json``.
The weights are transformers' own initialisation under a fixed seed: nothing is
downloaded, and the same seed gives the same model. Calibration text is random token
ids (the model is untrained, so there is no text it knows better).
"""

from __future__ import annotations

import torch

VOCAB = 1024
SEED = 0


def config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )


def load_model() -> torch.nn.Module:
    from transformers import BertModel

    torch.manual_seed(SEED)
    return BertModel(config(), add_pooling_layer=False).eval()


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(SEED)),)


def calibration_batches(samples: int, seq_len: int, seed: int) -> list[tuple[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (1, seq_len), generator=gen),) for _ in range(samples)]
