"""CUDA backend: compressed linears fused into kernel ops, the program saved, run on CPU (reference)
and through the Triton kernels (the interpreter here; a GPU where one exists)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from graphpress import compress
from graphpress.backends import build_backend
from graphpress.backends.fuse_linear import fuse_format_linears
from graphpress.ir import capture
from graphpress.passes import PassContext, build_pass
from graphpress.schema import CudaBackendConfig, load_spec

MLP = "layers.*.mlp.*"


def rewritten(graph, calibration, *passes):
    ctx = PassContext(calibration)
    for config in load_spec({"passes": list(passes)}).passes:
        graph = build_pass(config).run(graph, ctx).graph
    return graph


def calls(graph) -> dict[str, int]:
    found: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_function":
            found[str(node.target)] = found.get(str(node.target), 0) + 1
    return found


def test_fusion_rule_before_expected():
    """Before: linear(x, lut_weight(idx, cb, ...), b) twice. Expected: lut_linear(x, idx, cb, ..., b) twice."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 32)).eval()
    x = torch.randn(6, 64)
    before = rewritten(capture(model, (x,)), [(x,)], {"pass": "weight_clustering", "bits": 4, "group_size": 16})
    assert calls(before)["graphpress.lut_weight.default"] == 2 and calls(before)["aten.linear.default"] == 2
    after, counts = fuse_format_linears(before)
    expected = calls(after)
    assert counts == {"graphpress::lut_linear": 2}
    assert expected["graphpress.lut_linear.default"] == 2
    assert "aten.linear.default" not in expected and "graphpress.lut_weight.default" not in expected
    fused = [n for n in after.nodes if n.op == "call_function" and "lut_linear" in str(n.target)]
    assert all(n.args[-1] is not None for n in fused)  # the biases moved into the fused op
    torch.testing.assert_close(after.module()(x), before.module()(x), rtol=0, atol=0)
    assert calls(before)["graphpress.lut_weight.default"] == 2  # the input graph is untouched


VARIANTS = {
    "clustering on 2:4": [
        {"pass": "nm_sparsity", "targets": MLP},
        {"pass": "weight_clustering", "targets": MLP, "bits": 3, "group_size": 16},
    ],
    "shift_add": [{"pass": "shift_add", "targets": MLP, "attention": True}],
    "low_rank + 4-bit": [
        {"pass": "low_rank", "targets": MLP, "rank": 64},
        {"pass": "weight_clustering", "targets": MLP, "bits": 4},
    ],
    "nm_sparsity": [{"pass": "nm_sparsity", "targets": MLP}],
    "weight_clustering": [{"pass": "weight_clustering", "targets": "layers.*", "bits": 4}],
    "low_rank": [{"pass": "low_rank", "targets": MLP, "rank": 64}],
    "qkvo_lock": [{"pass": "qkvo_lock"}],
}
EXPECTED = {  # fused ops per variant; low_rank and qkvo_lock leave plain linears (nothing to fuse)
    "clustering on 2:4": {"graphpress::nm_linear": 12},
    "shift_add": {"graphpress::shift_linear": 12},
    "low_rank + 4-bit": {"graphpress::lut_linear": 24},
    "nm_sparsity": {"graphpress::nm_linear": 12},
    "weight_clustering": {"graphpress::lut_linear": 28},
    "low_rank": {},
    "qkvo_lock": {},
}


@pytest.fixture(scope="module")
def calibration():
    gen = torch.Generator().manual_seed(4)
    return [(torch.randint(0, 256, (2, 16), generator=gen),)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_example_lm_through_the_kernels(trained_llama, calibration, tmp_path, name):
    from graphpress.backends.cuda import kernels

    graph = rewritten(capture(trained_llama, calibration[0]), calibration, *VARIANTS[name])
    record = build_backend(CudaBackendConfig(target="cuda"), "backends[1]").build(graph, calibration, tmp_path)
    assert record.details["fused"] == EXPECTED[name] and record.errors["rel_l2"] < 1e-5
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]
    fused, _ = fuse_format_linears(graph)
    ids = torch.randint(0, 256, (1, 6))
    with kernels.on_cpu() as ran:
        ours = fused.module()(ids)
    assert sum(ran.values()) == sum(EXPECTED[name].values())
    torch.testing.assert_close(ours, graph.module()(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_saved_program_loads_and_runs_elsewhere(trained_llama, calibration, tmp_path):
    graph = rewritten(capture(trained_llama, calibration[0]), calibration, *VARIANTS["shift_add"])
    build_backend(CudaBackendConfig(target="cuda"), "backends[0]").build(graph, calibration, tmp_path)
    ids = torch.randint(0, 256, (3, 7))
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch\n"
        "from graphpress.backends.cuda import load\n"
        "m = load(sys.argv[1])\n"
        "torch.save(m(torch.load(sys.argv[2])), sys.argv[3])\n"
    )
    paths = [str(tmp_path / name) for name in ("model.pt2", "ids.pt", "out.pt")]
    subprocess.run([sys.executable, "-c", script, *paths], check=True, env={"PYTHONPATH": "."}, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), graph.module()(ids), rtol=1e-5, atol=1e-5)


DECODE = {  # passes, the fused attention op, teacher-forced steps (one sequence: the interpreter runs B x H programs)
    "gqa": ([], "graphpress::decode_attention", 5),
    "mla absorbed": ([{"pass": "gqa_to_mla"}], "graphpress::decode_attention", 5),
    "kivi": (
        [{"pass": "kv_cache_quant", "residual": 4, "key": {"axis": "channel", "group_size": 8}}],
        "graphpress::quantized_decode_attention",
        14,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DECODE))
def test_decode_steps_through_the_kernels(trained_llama, calibration, tmp_path, name):
    """A one-token step graph's attention is fused into the decode-attention ops (its mask becomes ``keep``);
    KIVI's 14 teacher-forced steps cross its window's flushes (values every token, keys every 8). A step
    graph that takes any number of tokens keeps its SDPA (the kernels take one query token)."""
    from graphpress.backends.cuda import kernels
    from graphpress.backends.cuda.fuse_attention import fuse_decode_attention
    from graphpress.runtime import TorchDecoder, teacher_forced_logits

    passes, attention, steps = DECODE[name]
    graph = rewritten(capture(trained_llama, calibration[0], mode="decode", step_tokens=1), calibration, *passes)
    record = build_backend(CudaBackendConfig(target="cuda"), "backends[0]").build(graph, calibration, tmp_path)
    assert record.details["fused"][attention] == 4 and record.errors["rel_l2"] < 1e-5
    fused, _ = fuse_decode_attention(fuse_format_linears(graph)[0])
    assert not [n for n in fused.nodes if "scaled_dot_product" in str(n.target)]
    ids = calibration[0][0][:1, :steps]
    with kernels.on_cpu() as ran:
        ours = teacher_forced_logits(TorchDecoder(fused), ids)
    assert ran[attention.split("::")[1]] == 4 * steps
    torch.testing.assert_close(ours, teacher_forced_logits(TorchDecoder(graph), ids), rtol=1e-4, atol=1e-4)
    any_length = rewritten(capture(trained_llama, calibration[0], mode="decode"), calibration, *passes)
    assert not fuse_decode_attention(any_length)[1]


@pytest.mark.slow
def test_spec_with_cuda_backend(tmp_path):
    spec = {
        "calibration": {"samples": 1, "seq_len": 16},
        "passes": [{"pass": "weight_clustering", "targets": MLP, "bits": 4}],
        "backends": [{"target": "cuda"}],
    }
    result = compress("examples/tiny_llama", spec, out_dir=tmp_path)
    assert result.artifacts["cuda"] == tmp_path / "model.pt2"
    record = result.report.backends[0]
    assert record["details"]["fused"] == {"graphpress::lut_linear": 12}
    assert record["details"]["gpu"] is None or record["details"]["gpu"]["rel_l2"] < 1e-3


class _Marker:
    """Unpickling this runs code: it creates the file named by ``path``."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_program_cannot_run_code_as_it_loads(tmp_path):
    """A .pt2 whose weight is a pickle (torch.export.load would unpickle it with weights_only=False) is refused."""
    import json
    import pickle
    import zipfile

    from graphpress.backends.cuda import load
    from graphpress.errors import BackendError

    ep = torch.export.export(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    good = tmp_path / "good.pt2"
    torch.export.save(ep, good)
    assert torch.equal(load(good)(torch.ones(2, 4)), ep.module()(torch.ones(2, 4)))  # a plain archive loads
    marker = tmp_path / "ran"
    crafted = tmp_path / "crafted.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(crafted, "w") as dst:
        payload = "weights/" + config_path_name(src, "weight")
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("model_weights_config.json"):
                config = json.loads(data)
                config["config"]["weight"]["use_pickle"] = True
                data = json.dumps(config).encode()
            if name.endswith(payload):
                data = pickle.dumps(_Marker(str(marker)))
            dst.writestr(name, data)
    with pytest.raises(BackendError, match="holds pickled objects, not just tensors"):
        load(crafted)
    assert not marker.exists()
    with pytest.raises(RuntimeError):  # the file is a real attack: plain torch.export.load runs its code
        torch.export.load(crafted)
    assert marker.exists()


def config_path_name(archive, fqn: str) -> str:
    import json

    name = next(n for n in archive.namelist() if n.endswith("model_weights_config.json"))
    return json.loads(archive.read(name))["config"][fqn]["path_name"]
