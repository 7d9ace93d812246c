"""The bundled example LM: the checkpoint loads, and its held-out perplexity is what training recorded."""

import json

import pytest
import torch

from examples.tiny_llama import calibration_batches, example_inputs
from examples.tiny_llama.data import SHIPPED_SPLITS, load_split
from examples.tiny_llama.model import HERE
from graphpress.metrics import perplexity


def test_shipped_text_splits():
    for name, size in SHIPPED_SPLITS.items():
        tokens = load_split(name)
        assert tokens.dtype == torch.int64 and len(tokens) == size and int(tokens.max()) < 256
    with pytest.raises(ValueError, match="unknown split"):
        load_split("train")


def test_calibration_batches_are_seeded():
    a, b = calibration_batches(3, 32, seed=5), calibration_batches(3, 32, seed=5)
    assert [x[0].shape for x in a] == [(1, 32)] * 3
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert not torch.equal(a[0][0], calibration_batches(3, 32, seed=6)[0][0])
    assert example_inputs()[0].shape == (1, 64)


@pytest.mark.slow
def test_heldout_perplexity_matches_the_training_log(trained_llama):
    log = json.loads((HERE / "train_log.json").read_text())
    ppl = perplexity(trained_llama, load_split("heldout"), seq_len=256)
    assert ppl == pytest.approx(log["heldout_ppl"], rel=1e-3)
    assert ppl < 8  # a trained byte-level model; an untrained one scores ~256
