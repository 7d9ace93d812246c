"""A small ViT from a ``transformers`` config, as a model directory: ShiftAddViT's setting.

``graphpress compress --model examples/tiny_vit --spec examples/tiny_vit/spec.json``
turns its linears into shift-and-add form and binarizes the queries and keys entering
attention. Weights are transformers' initialisation under a fixed seed (no downloads);
calibration images are seeded smooth random fields (a few low-frequency waves per
channel), closer to natural images than white noise.
"""

from __future__ import annotations

import math

import torch

IMAGE = 32
SEED = 0


def config():
    from transformers import ViTConfig

    return ViTConfig(
        image_size=IMAGE,
        patch_size=8,
        num_channels=3,
        hidden_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=384,
        attn_implementation="sdpa",
    )


def load_model() -> torch.nn.Module:
    from transformers import ViTModel

    torch.manual_seed(SEED)
    return ViTModel(config(), add_pooling_layer=False).eval()


def images(batch: int, gen: torch.Generator, waves: int = 4) -> torch.Tensor:
    """Sums of random low-frequency plane waves, one field per channel, in [-1, 1]."""
    grid = torch.linspace(0, 1, IMAGE)
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    out = torch.zeros(batch, 3, IMAGE, IMAGE)
    for _ in range(waves):
        fx, fy, phase = torch.rand(3, batch, 3, 1, 1, generator=gen) * torch.tensor([4, 4, 2 * math.pi]).view(
            3, 1, 1, 1, 1
        )
        out += torch.sin(2 * math.pi * (fx * x + fy * y) + phase)
    return out / waves


def example_inputs() -> tuple[torch.Tensor]:
    return (images(1, torch.Generator().manual_seed(SEED)),)


def calibration_batches(samples: int, seq_len: int, seed: int) -> list[tuple[torch.Tensor]]:
    """``seq_len`` is the language models' knob; a ViT's sequence is its patches, so it is unused."""
    gen = torch.Generator().manual_seed(seed)
    return [(images(2, gen),) for _ in range(samples)]
