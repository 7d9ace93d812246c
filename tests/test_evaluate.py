"""evaluate: perplexity of the original, the compressed graph and each artifact, in the report and the summary."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.tiny_llama.data import load_split
from examples.tiny_llama.evaluate import onnx_lm
from graphpress import compress
from graphpress.calibration import token_stream
from graphpress.cli import main
from graphpress.errors import SpecError
from graphpress.metrics import perplexity
from graphpress.schema import load_spec

from .families import build, token_ids

HELDOUT = "examples/tiny_llama/data/heldout.txt.gz"
TOKENS = 1024


def spec(mode: str, passes: list, **perplexity_fields) -> dict:
    return {
        "capture": {"mode": mode},
        "calibration": {"samples": 2, "seq_len": 64},
        "passes": passes,
        "verify": {"max": 1.0},
        "evaluate": {"perplexity": {"text": HELDOUT, "max_tokens": TOKENS, **perplexity_fields}},
    }


def scores(report) -> dict[str, float]:
    return {row["model"]: row["perplexity"] for row in report.evaluation["perplexity"]["rows"]}


@pytest.mark.parametrize(
    ("mode", "passes"),
    [
        ("forward", [{"pass": "weight_quant", "targets": "layers.*", "bits": 4, "group_size": 32}]),
        ("decode", [{"pass": "kv_cache_quant", "residual": 0, "key": {"axis": "channel", "group_size": 8}}]),
    ],
    ids=["forward", "decode"],
)
def test_evaluate_reproduces_the_example_scripts_numbers(tmp_path, capsys, trained_llama, mode, passes):
    """The original and the ONNX file score what examples.tiny_llama.evaluate scores on the same text
    (decode files token by token there and here); the compressed eager graph scores what its artifact does."""
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec(mode, passes)))
    assert main(["compress", "--model", "examples/tiny_llama", "--spec", str(path), "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    rows = {row["model"]: row for row in report["evaluation"]["perplexity"]["rows"]}
    assert list(rows) == ["original", "compressed", "backends[0] onnx"]
    heldout = load_split("heldout")[:TOKENS]
    assert rows["original"]["perplexity"] == pytest.approx(perplexity(trained_llama, heldout), rel=1e-6)
    onnx = perplexity(onnx_lm(str(tmp_path / "o" / "model.onnx")), heldout)
    assert rows["backends[0] onnx"]["perplexity"] == pytest.approx(onnx, rel=1e-6)
    assert rows["compressed"]["perplexity"] == pytest.approx(onnx, rel=1e-4)
    assert rows["compressed"]["perplexity"] != rows["original"]["perplexity"]  # lossy: the metric sees it
    assert rows["original"]["bytes"] == report["original"]["bytes"]
    assert rows["compressed"]["bytes"] == report["compressed"]["bytes"]
    before, after = rows["original"]["perplexity"], rows["compressed"]["perplexity"]
    assert f"perplexity {before:.4f} -> {after:.4f} ({after / before - 1:+.1%})" in printed.splitlines()[0]
    assert f"perplexity on {TOKENS:,} tokens of {HELDOUT}: original {before:.4f}" in printed
    markdown = (tmp_path / "o" / "report.md").read_text()
    assert "## evaluation" in markdown and f"| {before:.4f} |" in markdown
    assert (tmp_path / "o" / "plots" / "evaluation.png").exists()


def test_a_default_config_transformers_lm_is_scored_through_its_decode_step(tmp_path):
    """Qwen2 as its default config builds it (use_cache=True, a cache object returned): with no pass, the
    compressed graph and its ONNX decode step score the original's perplexity."""
    np.save(tmp_path / "ids.npy", token_ids(1, 96, seed=5).flatten().numpy())
    data = spec("decode", [], tokens=str(tmp_path / "ids.npy"), seq_len=32, batch_size=2)
    del data["evaluate"]["perplexity"]["text"]
    result = compress(build("qwen2"), data, (token_ids(1, 8),), out_dir=tmp_path / "o")
    ppl = scores(result.report)
    assert ppl["compressed"] == pytest.approx(ppl["original"], rel=1e-5)
    assert ppl["backends[0] onnx"] == pytest.approx(ppl["original"], rel=1e-4)
    assert result.report.evaluation["perplexity"]["tokens"] == 96


def test_an_artifact_that_cannot_be_scored_is_a_row_and_a_warning(tmp_path, monkeypatch):
    import graphpress.evaluation as evaluation

    def broken(*_args):
        def call(_batch):
            raise RuntimeError("the runtime refused the batch")

        return call

    monkeypatch.setattr(evaluation, "_artifact_lm", broken)
    data = spec("forward", [])
    result = compress("examples/tiny_llama", data, out_dir=tmp_path / "o")
    row = result.report.evaluation["perplexity"]["rows"][-1]
    assert "perplexity" not in row and "refused the batch" in row["error"]
    assert any("backends[0] onnx could not be scored" in w for w in result.report.warnings)
    assert "failed: the runtime refused the batch" in (tmp_path / "o" / "report.md").read_text()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"text": "missing.txt"}, r"evaluate\.perplexity\.text: cannot read 'missing.txt'"),
        (
            {"seq_len": 4096},
            rf"evaluate\.perplexity\.text: holds {TOKENS} tokens, fewer than evaluate\.perplexity\.seq_len",
        ),
    ],
)
def test_bad_evaluation_data_fails_before_any_work(tmp_path, fields, message):
    with pytest.raises(SpecError, match=message):
        compress("examples/tiny_llama", spec("forward", [], **fields), out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_token_ids_outside_the_vocabulary_are_named(tmp_path):
    (tmp_path / "ids.json").write_text(json.dumps([300] * 64))
    data = spec("forward", [], tokens=str(tmp_path / "ids.json"), seq_len=32)
    del data["evaluate"]["perplexity"]["text"]
    with pytest.raises(SpecError, match=r"evaluate\.perplexity: token id 300 is outside the model's 256 logits"):
        compress("examples/tiny_llama", data, out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_forward_graph_with_more_inputs_than_token_ids_is_refused(tmp_path):
    model = build("llama")
    ids = token_ids(1, 8)
    (tmp_path / "ids.json").write_text(json.dumps(list(range(64))))
    data = spec("forward", [], tokens=str(tmp_path / "ids.json"), seq_len=32)
    del data["evaluate"]["perplexity"]["text"]
    with pytest.raises(SpecError, match=r"evaluate: the captured forward takes \(input_ids, attention_m"):
        compress(model, data, (ids, torch.ones_like(ids)), out_dir=tmp_path / "o")


def test_the_schema_wants_one_source():
    with pytest.raises(SpecError, match="give perplexity, lm_eval or both"):
        load_spec({"evaluate": {}})
    with pytest.raises(SpecError, match="give one of text .* or tokens"):
        load_spec({"evaluate": {"perplexity": {"text": "a.txt", "tokens": "b.npy"}}})


def test_text_files_gzip_and_jsonl_read_as_one_stream(tmp_path):
    (tmp_path / "a.txt").write_text("ab\ncd")
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(b"ab\ncd"))
    (tmp_path / "a.jsonl").write_text('{"text": "ab"}\n\n{"text": "cd"}\n')
    tokenize = lambda text: list(text.encode())  # noqa: E731
    expect = list(b"ab\ncd")
    for name in ("a.txt", "a.txt.gz"):
        assert token_stream(str(tmp_path / name), None, tokenize, "evaluate.perplexity", 2).tolist() == expect
    assert token_stream(str(tmp_path / "a.jsonl"), None, tokenize, "x", 2).tolist() == list(b"ab\n\ncd")
    (tmp_path / "b.jsonl").write_text('{"txt": "ab"}\n')
    with pytest.raises(SpecError, match=r"x\.text: .*b\.jsonl' line 1: expected an object with a string 'text'"):
        token_stream(str(tmp_path / "b.jsonl"), None, tokenize, "x", 2)


# ---------------------------------------------------------------------- lm-evaluation-harness
TASKS = "tests/data/lm_eval"


def loglikelihood(model, context: str, continuation: str) -> float:
    """log p(continuation | context) under the example LM's byte tokenizer, straight from its logits."""
    ids = list((context + continuation).encode())
    logits = model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)
    count = len(continuation.encode())
    return logits[-count:].gather(-1, torch.tensor(ids[-count:])[:, None]).sum().item()


def test_lm_eval_tasks_score_what_the_logits_say(tmp_path, capsys, trained_llama):
    """A multiple-choice and a rolling task on local files: the original's accuracy is the argmax of the
    continuations' log-likelihoods computed here from the logits, its byte perplexity exp(-ll / bytes); the
    ONNX artifact scores what the compressed graph scores."""
    passes = [{"pass": "weight_quant", "targets": "layers.*", "bits": 2, "group_size": 32, "method": "rtn"}]
    data = {
        **spec("forward", passes),
        "evaluate": {"lm_eval": {"tasks": ["code_mc", "code_rolling"], "include_path": TASKS}},
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(data))
    assert main(["compress", "--model", "examples/tiny_llama", "--spec", str(path), "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((tmp_path / "o" / "report.json").read_text())["evaluation"]["lm_eval"]["rows"]
    assert [row["model"] for row in rows] == ["original", "compressed", "backends[0] onnx"]
    with torch.no_grad():
        docs = [json.loads(line) for line in Path(f"{TASKS}/code_mc.jsonl").read_text().splitlines()]
        right = [
            max(range(len(d["choices"])), key=lambda c: loglikelihood(trained_llama, d["question"], d["choices"][c]))
            == d["answer"]
            for d in docs
        ]
        texts = [json.loads(line)["text"] for line in Path(f"{TASKS}/code_rolling.jsonl").read_text().splitlines()]
        ll = sum(loglikelihood(trained_llama, t[0], t[1:]) for t in texts)
    original = rows[0]["tasks"]
    assert original["code_mc"]["acc"] == pytest.approx(sum(right) / len(docs))
    assert original["code_rolling"]["byte_perplexity"] == pytest.approx(
        math.exp(-ll / sum(len(t.encode()) for t in texts)), rel=1e-5
    )
    assert (
        rows[1]["tasks"]["code_rolling"]["byte_perplexity"] > original["code_rolling"]["byte_perplexity"]
    )  # 2-bit: lossy
    assert rows[2]["tasks"]["code_rolling"]["byte_perplexity"] == pytest.approx(
        rows[1]["tasks"]["code_rolling"]["byte_perplexity"], rel=1e-4
    )
    first = printed.splitlines()[0]
    assert f"code_mc acc {original['code_mc']['acc']:.4f} -> {rows[1]['tasks']['code_mc']['acc']:.4f}" in first
    assert "lm-eval code_rolling byte_perplexity: original" in printed
    assert "lm-evaluation-harness: `code_mc`, `code_rolling`." in (tmp_path / "o" / "report.md").read_text()


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (
            "output_type: generate_until\ngeneration_kwargs: {until: ['\\n']}",
            "is a generate_until task; graphpress scores",
        ),
        ("output_type: multiple_choice\ndataset_path: someone/remote_dataset", "lm-eval cannot load"),
    ],
    ids=["generation", "hub dataset"],
)
def test_lm_eval_tasks_graphpress_cannot_score_fail_before_any_work(tmp_path, task, message):
    yaml = (Path(TASKS) / "code_mc.yaml").read_text().replace("output_type: multiple_choice", task)
    if "dataset_path: someone" in task:
        yaml = yaml.replace("dataset_path: json\n", "")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "task.yaml").write_text(yaml)
    data = {
        **spec("forward", []),
        "evaluate": {"lm_eval": {"tasks": ["code_mc"], "include_path": str(tmp_path / "tasks")}},
    }
    with pytest.raises(SpecError, match=r"evaluate\.lm_eval\.tasks: .*" + message):
        compress("examples/tiny_llama", data, out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_an_unknown_lm_eval_task_is_named(tmp_path):
    data = {**spec("forward", []), "evaluate": {"lm_eval": {"tasks": ["no_such_task"], "include_path": TASKS}}}
    with pytest.raises(SpecError, match=r"evaluate\.lm_eval\.tasks: .*no_such_task"):
        compress("examples/tiny_llama", data, out_dir=tmp_path / "o")
