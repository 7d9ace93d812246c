"""Lazy checkpoints and streamed runs: capture reads no weight, a sweep reads each weight once and gives
bitwise what the in-memory graph gives, spilled tensors come back as written."""

from __future__ import annotations

import functools

import pytest
import torch

from graphpress import compress
from graphpress.errors import BackendError, CaptureError, SpecError, VerificationError
from graphpress.ir import capture
from graphpress.ir.store import SpillStore, is_lazy, materialize
from graphpress.ir.stream import Sweep
from graphpress.metrics import logits_of
from graphpress.model_source import load_checkpoint, stored_weights
from graphpress.passes import low_rank
from graphpress.schema import load_spec
from graphpress.streaming import JOBS_DIR, STORE_DIR, streams

from .families import SHAPE_200M, build, random_checkpoint

transformers = pytest.importorskip("transformers")


def checkpoint(tmp_path_factory, family: str, shard: str | None = None):
    folder = tmp_path_factory.mktemp(family)
    build(family).save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return folder


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return checkpoint(tmp_path_factory, "llama", shard="40KB")  # several shards and an index


def ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def lazy_graph(folder):
    source = load_checkpoint(folder, lazy=True)
    return capture(source.model, (ids(),), stored=stored_weights(source)), source.weights.counter


def test_lazy_capture_reads_no_weight_until_asked(llama_folder):
    assert len(list(llama_folder.glob("*.safetensors"))) > 1
    graph, reads = lazy_graph(llama_folder)
    assert reads.tensors == 0 and reads.bytes == 0
    q = next(lin for lin in graph.linears() if lin.path.endswith("layers.0.self_attn.q_proj"))
    assert (q.out_features, q.in_features) == (64, 64) and is_lazy(graph.stored(q.weight))
    assert graph.summary().params == sum(p.numel() for p in build("llama").parameters())
    assert reads.tensors == 0  # selection and size accounting read shapes only
    weight = graph.weight(q.weight)
    assert reads.tensors == 1 and reads.bytes == weight.numel() * 4
    assert torch.equal(weight, build("llama").model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma"])  # plain, Conv1D canonicalised, tied embeddings
def test_sweep_equals_the_in_memory_graph_bitwise(tmp_path_factory, family):
    folder = checkpoint(tmp_path_factory, family)
    graph, reads = lazy_graph(folder)
    before = reads.tensors
    in_memory = capture(load_checkpoint(folder).model, (ids(),))
    inputs = [(ids(),), (ids(1, 5, seed=1),), (ids(3, 9, seed=2),)]
    outputs = Sweep(graph, inputs).finish()
    for args, output in zip(inputs, outputs):
        assert torch.equal(logits_of(output), logits_of(in_memory.module()(*args)))
    readers = sum(
        1 for n in graph.fx.nodes if n.op == "call_function" for a in n.all_input_nodes if is_lazy_input(graph, a)
    )
    assert reads.tensors - before == readers  # once per reading node, not once per input
    assert {graph.tensor_name(a) for n in graph.fx.nodes for a in n.all_input_nodes if is_lazy_input(graph, a)} == {
        name for name, tensor in graph.tensors().items() if is_lazy(tensor)
    }


def is_lazy_input(graph, node) -> bool:
    name = graph.tensor_name(node)
    return name is not None and is_lazy(graph.stored(name))


def test_sweep_stops_where_asked_and_taps_each_input_in_order(llama_folder):
    graph, reads = lazy_graph(llama_folder)
    first, second = [lin.node.name for lin in graph.linears("layers.*.mlp.down_proj")]
    seen = []
    sweep = Sweep(graph, [(ids(),), (ids(seed=3),)], {first: lambda v: seen.append(("first", v.shape))})
    sweep.run_until([first])
    assert seen == [("first", (2, 12, 64))] * 2
    assert second not in sweep.ran and sweep.outputs is None
    in_layer_1 = [lin.weight for lin in graph.linears("layers.1.*")]
    assert reads.tensors < len(graph.tensors()) - len(in_layer_1)  # the second block's weights not read yet
    assert len(sweep.finish()) == 2


def test_sweep_drops_values_after_their_last_reader(llama_folder):
    graph, _ = lazy_graph(llama_folder)
    sweep = Sweep(graph, [(ids(),)])
    down = graph.linears("layers.0.mlp.down_proj")[0].node
    q_proj = graph.linears("layers.0.self_attn.q_proj")[0].node
    sweep.run_until([down.name])
    assert down in sweep.values  # the residual add that reads it has not run
    assert down.args[0] not in sweep.values and q_proj not in sweep.values  # read for the last time: dropped


def test_a_checkpoint_in_an_older_key_format_is_refused_by_name(tmp_path_factory):
    folder = checkpoint(tmp_path_factory, "gptneox")  # saved as embed_out, the module says lm_head
    with pytest.raises(CaptureError, match=r"'lm_head.weight' is not in its safetensors files .*save_pretrained"):
        load_checkpoint(folder, lazy=True)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(3, 5),
        torch.randn(7).to(torch.bfloat16),
        torch.tensor([True, False, True]),
        torch.empty(0, 4),
        torch.arange(6, dtype=torch.int64).reshape(2, 3),
    ],
)
def test_spilled_tensors_read_back_bitwise(tmp_path, tensor):
    store = SpillStore(tmp_path)
    store.put(torch.randn(3))  # not at offset 0: alignment exercised
    stand_in = store.put(tensor)
    assert stand_in.device.type == "meta" and stand_in.shape == tensor.shape and stand_in.dtype == tensor.dtype
    back = materialize(stand_in)
    assert back.dtype == tensor.dtype and torch.equal(back, tensor)


def test_a_streaming_graph_writes_new_tensors_to_its_spill(tmp_path, llama_folder):
    graph, _ = lazy_graph(llama_folder)
    graph.spill = SpillStore(tmp_path)
    value = torch.randn(4, 64)
    graph.add_parameter("extra.weight", value)
    assert is_lazy(graph.stored("extra.weight")) and torch.equal(graph.weight("extra.weight"), value)
    assert graph.clone().spill is graph.spill


SPEC = {
    "calibration": {"samples": 3, "seq_len": 16},
    "passes": [
        {"pass": "low_rank", "targets": ["mlp.*"], "method": "whitened_svd", "rank": {"energy": 0.9}},
        {"pass": "weight_clustering", "targets": ["self_attn.*"], "bits": 4, "group_size": 16},
    ],
    "verify": {"max": 10},
}


def streamed_and_in_memory(folder, tmp_path, spec=SPEC):
    return [
        compress(str(folder), {**spec, "execution": {"stream": s}}, out_dir=tmp_path / str(s)) for s in (True, False)
    ]


INTEGER = {
    **SPEC,
    "passes": [{"pass": "weight_quant", "method": "gptq", "bits": 4, "group_size": 16}],
    "backends": [{"target": "onnx", "opset": 21, "ort_contrib_ops": True}],  # MatMulNBits, as stored
}


SPARSE = {**SPEC, "passes": [{"pass": "nm_sparsity", "score": "activation", "update": True}]}
GPT2 = {**SPEC, "passes": [SPEC["passes"][0], {**SPEC["passes"][1], "targets": ["attn.*"]}]}


@pytest.mark.parametrize(
    "family, spec",
    [("llama", SPEC), ("llama", INTEGER), ("llama", SPARSE), ("gpt2", GPT2), ("gemma", SPEC)],
    ids=["low_rank+clustering", "gptq", "wanda+refit", "gpt2", "gemma"],  # Conv1D canonicalised; tied embeddings
)
def test_a_streamed_run_is_byte_identical_to_the_in_memory_run(llama_folder, tmp_path_factory, family, spec):
    folder = llama_folder if family == "llama" else checkpoint(tmp_path_factory, family)
    streamed, in_memory = streamed_and_in_memory(folder, tmp_path_factory.mktemp("out"), spec)
    assert streamed.graph.lazy and not in_memory.graph.lazy
    assert streamed.report.capture["streamed"] and not in_memory.report.capture["streamed"]
    ours, theirs = streamed.graph.tensors(), in_memory.graph.tensors()
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(materialize(ours[k]), theirs[k]) for k in ours)
    assert [p["layers"] for p in streamed.report.passes] == [p["layers"] for p in in_memory.report.passes]
    assert streamed.artifacts["onnx"].read_bytes() == in_memory.artifacts["onnx"].read_bytes()
    assert (streamed.out_dir / STORE_DIR / "spill.bin").stat().st_size > 0  # what result.model reads
    assert not (in_memory.out_dir / STORE_DIR).exists()
    assert torch.equal(streamed.model(ids()).logits, in_memory.model(ids()).logits)
    assert streamed.report.backends[0]["latency"]["pieces"] >= 1  # validated in pieces, to the same errors
    errors = in_memory.report.backends[0]["errors"]
    assert streamed.report.backends[0]["errors"] == pytest.approx(errors, abs=1e-6)  # onnxruntime's rounding


def test_the_onnx_backend_writes_a_streamed_graph_from_its_store(llama_folder, tmp_path, monkeypatch, capsys):
    """With far less memory than the model, the ONNX file is still written (each initializer read from the store as
    it is written) and validated (eager by a sweep, with a bar of the ops left); a backend that builds from the
    whole model is refused by name, before it starts."""
    monkeypatch.setattr("graphpress.streaming.available_memory", lambda: 100_000)
    spec = {**SPEC, "execution": {"stream": True}, "backends": [{"target": "onnx", "external_data": "always"}]}
    result = compress(str(llama_folder), spec, out_dir=tmp_path / "onnx", progress=True)
    record = result.report.backends[0]
    assert result.graph.lazy and record["errors"]["rel_l2"] < 1e-4 and record["latency"]["pieces"] == 1
    shown = capsys.readouterr().err
    ops = len(result.graph.nodes)
    assert f"backends[0] onnx: eager reference (streamed):   0%| | 0/{ops}" in shown.replace("          ", " ")
    assert "passes[1] (weight_clustering): verifying (streamed): done in" in shown
    assert (tmp_path / "onnx" / "model.onnx.data").stat().st_size > 0.9 * result.report.compressed["bytes"]
    spec["backends"].append({"target": "tvm"})
    with pytest.raises(BackendError, match=r"backends\[1\] \(tvm\): the compressed model holds .* this backend builds"):
        compress(str(llama_folder), spec, out_dir=tmp_path / "tvm")
    assert not (tmp_path / "tvm" / "model.onnx").exists()


def test_a_bf16_checkpoint_streamed_in_float32_is_converted_as_read(tmp_path):
    folder = tmp_path / "bf16"
    build("llama").to(torch.bfloat16).save_pretrained(folder)
    spec = {**SPEC, "capture": {"dtype": "float32"}}
    streamed, in_memory = streamed_and_in_memory(folder, tmp_path, spec)
    assert streamed.report.capture["dtype"] == in_memory.report.capture["dtype"] == "float32"
    assert streamed.report.capture["model_dtype"] == "bfloat16"
    ours, theirs = streamed.graph.tensors(), in_memory.graph.tensors()
    assert all(torch.equal(materialize(ours[k]), theirs[k]) for k in ours)
    assert streamed.artifacts["onnx"].read_bytes() == in_memory.artifacts["onnx"].read_bytes()


def test_a_failed_streamed_run_leaves_only_its_journal(llama_folder, tmp_path):
    spec = {**SPEC, "verify": {"max": 1e-9, "on_fail": "error"}, "execution": {"stream": True}}
    with pytest.raises(VerificationError):
        compress(str(llama_folder), spec, out_dir=tmp_path)
    assert [p.name for p in (tmp_path / STORE_DIR).iterdir()] == [JOBS_DIR]  # no spill, no artifact
    assert not (tmp_path / "model.onnx").exists()


def test_an_interrupted_streamed_run_resumes_from_its_finished_jobs(llama_folder, tmp_path, monkeypatch):
    """low_rank's jobs are journaled as they finish. Interrupted after two, a run of the same spec, model and data
    runs only the others and writes the uninterrupted run's bytes; another spec does not reuse the journal; a
    finished run leaves no journal."""
    ran, real, stop = [], low_rank.factor_group, [None]

    @functools.wraps(real)  # the journal knows a job by its position and function name
    def counted(*args):
        if len(ran) == stop[0]:
            raise KeyboardInterrupt
        ran.append(args[1][0].path)
        return real(*args)

    monkeypatch.setattr(low_rank, "factor_group", counted)
    spec = {**SPEC, "execution": {"stream": True}}

    def run(out, interrupt_after=None, **changes):
        ran.clear()
        stop[0] = interrupt_after
        return compress(str(llama_folder), {**spec, **changes}, out_dir=tmp_path / out)

    whole = run("whole")
    jobs = len(ran)
    assert whole.report.capture["resumed_jobs"] == 0 and not (whole.out_dir / STORE_DIR / JOBS_DIR).exists()
    with pytest.raises(KeyboardInterrupt):
        run("out", interrupt_after=2)
    journal = tmp_path / "out" / STORE_DIR / JOBS_DIR
    assert len(list(journal.glob("*.pt"))) == 2 and not (tmp_path / "out" / "model.onnx").exists()

    resumed = run("out")
    assert resumed.report.capture["resumed_jobs"] == 2 and len(ran) == jobs - 2
    assert resumed.artifacts["onnx"].read_bytes() == whole.artifacts["onnx"].read_bytes()
    assert resumed.report.passes[0]["layers"] == whole.report.passes[0]["layers"]
    assert not journal.exists()

    with pytest.raises(KeyboardInterrupt):
        run("other", interrupt_after=1)
    other = run("other", calibration={"samples": 2, "seq_len": 12})
    assert other.report.capture["resumed_jobs"] == 0 and len(ran) == jobs


@pytest.mark.parametrize(
    ("model", "spec", "match"),
    [
        ("module", {}, r"execution.stream: streaming reads the weights of a checkpoint folder .*got LlamaForCausalLM"),
        ("folder", {"capture": {"mode": "decode"}}, r"execution.stream: decode capture is not streamed yet"),
    ],
)
def test_streaming_that_cannot_be_done_is_refused_by_field(llama_folder, tmp_path, model, spec, match):
    subject = build("llama") if model == "module" else str(llama_folder)
    with pytest.raises(SpecError, match=match):
        compress(subject, {**spec, "execution": {"stream": True}}, (ids(),), out_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_auto_streams_only_what_is_big_for_this_machine(llama_folder, monkeypatch):
    spec = load_spec({"execution": {"stream": "auto"}})
    assert not streams(spec, str(llama_folder))  # a few hundred KB
    monkeypatch.setattr("graphpress.streaming.available_memory", lambda: 100_000)
    assert streams(spec, str(llama_folder))
    assert not streams(spec, build("llama"))  # a module is in memory already
    assert not streams(load_spec({"execution": {"stream": "auto"}, "capture": {"mode": "decode"}}), str(llama_folder))


MEASURE = """
import json, sys, tempfile
import transformers.models.llama.modeling_llama, tokenizers  # imported before measuring: not the run's memory
from graphpress import compress
spec = json.loads(sys.argv[2])

def status(field):  # kB in /proc/self/status
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field + ":"))

before = status("VmRSS")
compress(sys.argv[1], spec, out_dir=tempfile.mkdtemp())
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


@pytest.mark.slow
def test_a_streamed_run_holds_far_less_than_the_model(tmp_path):
    """~200M parameters (760 MB in fp32): streaming adds well under the checkpoint's size to resident memory; an
    in-memory run holds the model and its captured copy (2x) before any pass runs.

    The peak is the child's own high-water mark (VmHWM): ``ru_maxrss`` carries the parent's across fork and
    exec, which inside a long test session is gigabytes."""
    import json
    import subprocess
    import sys

    config = transformers.LlamaConfig(**SHAPE_200M)
    size = random_checkpoint(tmp_path / "ckpt", config, shard_bytes=2**28)
    spec = {
        "calibration": {"samples": 2, "seq_len": 64},
        "verify": {"samples": 2, "max": 10},
        "passes": [{"pass": "low_rank", "targets": ["mlp.*"], "rank": {"param_ratio": 0.5}}],
        "backends": [],
        "execution": {"stream": True},
    }
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path / "ckpt"), json.dumps(spec)],
        capture_output=True,
        text=True,
        check=True,
    )
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    added = measured["peak"] - measured["before"]
    assert size > 700 * 2**20
    assert added < 0.75 * size, f"streaming added {added / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB checkpoint"
