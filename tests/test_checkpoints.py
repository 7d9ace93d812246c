"""`graphpress compress --model CHECKPOINT_DIR`: save_pretrained folders, calibrated on a text file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from graphpress import SpecError, compress
from graphpress.cli import main
from graphpress.model_source import load_source

from .conftest import rel_err
from .families import build, token_ids

transformers = pytest.importorskip("transformers")
TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n" * 40


def tokenizer(text: str):
    """A byte-level BPE tokenizer trained here on ``text`` (offline), 128 tokens like the models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>"], show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Qwen2 in float32 and Llama in bfloat16, each with a tokenizer; and a Llama without one."""
    root = tmp_path_factory.mktemp("checkpoints")
    (root / "calib.txt").write_text(TEXT)
    tok = tokenizer(TEXT)
    dirs = {}
    for name, family, dtype, with_tokenizer in (
        ("qwen2", "qwen2", torch.float32, True),
        ("llama_bf16", "llama", torch.bfloat16, True),
        ("bare", "llama", torch.float32, False),
    ):
        model = build(family).to(dtype)
        model.save_pretrained(root / name)
        if with_tokenizer:
            tok.save_pretrained(root / name)
        dirs[name] = root / name
    return root, dirs


def spec_file(root, name, **capture):
    spec = {
        "capture": capture,
        "calibration": {"samples": 2, "seq_len": 24, "text": str(root / "calib.txt")},
        "passes": [
            {"pass": "qkvo_lock", "seed": 3},
            {"pass": "low_rank", "targets": "layers.*.mlp.*", "rank": {"param_ratio": 0.8}},
        ],
        "verify": {"max": 0.5},
    }
    path = root / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def test_a_checkpoint_loads_offline_in_its_dtype_with_its_tokenizer(checkpoints):
    _, dirs = checkpoints
    source = load_source(dirs["llama_bf16"])
    assert type(source.model).__name__ == "LlamaForCausalLM"
    assert {p.dtype for p in source.model.parameters()} == {torch.bfloat16}
    assert source.tokenize is not None and source.tokenize("the quick brown fox")
    assert load_source(dirs["bare"]).tokenize is None


@pytest.mark.parametrize(("name", "capture"), [("qwen2", {}), ("llama_bf16", {"dtype": "float32"})])
def test_compress_a_checkpoint_from_the_command_line(checkpoints, name, capture, capsys):
    root, dirs = checkpoints
    out = root / f"out_{name}"
    assert (
        main(
            [
                "compress",
                "--model",
                str(dirs[name]),
                "--spec",
                str(spec_file(root, name, **capture)),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"] == {
        "samples": 2,
        "source": str(root / "calib.txt"),
        "seed": 0,
        "verification": {"samples": 2, "source": "2 windows sharing no token with calibration's"},
    }
    assert report["capture"]["dtype"] == "float32"
    assert report["capture"]["model_dtype"] == ("bfloat16" if name == "llama_bf16" else "float32")
    assert report["capture"]["inputs"]["input_ids"][0] == [0, None]  # any batch
    assert report["passes"][0]["verification"]["rel_l2"] < 1e-5  # qkvo_lock stays exact
    assert report["backends"][0]["errors"]["rel_l2"] < 1e-5
    assert (out / "model.onnx").exists() and (out / "report.html").exists()


def test_a_bf16_checkpoint_compresses_in_bf16_and_onnx_says_to_capture_float32(checkpoints):
    root, dirs = checkpoints
    spec = json.loads(spec_file(root, "bf16").read_text())
    result = compress(dirs["llama_bf16"], {**spec, "backends": []}, progress=False)
    assert {result.graph.weight(lin.weight).dtype for lin in result.graph.linears()} == {torch.bfloat16}
    assert result.report.capture["dtype"] == "bfloat16"
    ids = token_ids(2, 20)
    with torch.no_grad():
        reference = load_source(dirs["llama_bf16"]).model(ids).logits
    assert rel_err(result.model(ids).logits, reference) < 0.5  # low_rank in bf16: lossy, but the same model

    out = root / "out_bf16_onnx"
    assert (
        main(
            [
                "compress",
                "--model",
                str(dirs["llama_bf16"]),
                "--spec",
                str(spec_file(root, "bf16")),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 2
    )
    assert not out.exists() or not any(out.iterdir())


def test_calibration_files_and_their_errors(checkpoints, tmp_path):
    root, dirs = checkpoints
    spec = {"calibration": {"samples": 3, "seq_len": 16, "text": str(root / "calib.txt")}, "backends": []}
    with pytest.raises(SpecError, match=r"calibration\.text: the model has no tokenizer"):
        compress(dirs["bare"], spec, progress=False)
    with pytest.raises(SpecError, match=r"calibration\.text: cannot read"):
        compress(dirs["qwen2"], {**spec, "calibration": {"text": str(tmp_path / "missing.txt")}}, progress=False)

    np.save(tmp_path / "ids.npy", token_ids(1, 100)[0].numpy())
    tokens = {"samples": 3, "seq_len": 16, "tokens": str(tmp_path / "ids.npy")}
    result = compress(dirs["bare"], {**spec, "calibration": tokens}, progress=False)
    assert result.report.calibration["samples"] == 3
    assert result.report.calibration["verification"] == {
        "samples": 2,
        "source": "2 windows sharing no token with calibration's",
    }
    again = compress(dirs["bare"], {**spec, "calibration": tokens}, progress=False)
    assert result.report.original == again.report.original
    with pytest.raises(SpecError, match=r"calibration\.tokens: holds 100 tokens, fewer than calibration\.seq_len=128"):
        compress(dirs["bare"], {**spec, "calibration": {**tokens, "seq_len": 128}}, progress=False)
    (tmp_path / "bad.json").write_text("[[1, 2], [3, 4]]")
    with pytest.raises(SpecError, match=r"calibration\.tokens: .* expected 1-D integer token ids"):
        compress(dirs["bare"], {**spec, "calibration": {"tokens": str(tmp_path / "bad.json")}}, progress=False)
    with pytest.raises(SpecError, match="alternatives"):
        compress(dirs["bare"], {**spec, "calibration": {**tokens, "text": "x.txt"}}, progress=False)
