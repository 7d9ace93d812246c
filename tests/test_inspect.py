"""``graphpress inspect``: what an ONNX artifact holds, checked against the file itself."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from graphpress.backends import build_backend
from graphpress.cli import main
from graphpress.inspection import InspectError, format_inspection, inspect_onnx
from graphpress.ir import capture
from graphpress.passes import PassContext, build_pass
from graphpress.schema import OnnxBackendConfig, load_spec


def export(model, mode, passes, tmp_path, **fields):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    graph = capture(model, (ids,), mode=mode)
    for config in load_spec({"passes": passes}).passes:
        graph = build_pass(config).run(graph, PassContext([(ids,)])).graph
    record = build_backend(OnnxBackendConfig(target="onnx", **fields)).build(graph, [(ids,)], tmp_path)
    return graph, record.artifact


def test_forward_model_summary_matches_the_file(tiny_llama, tmp_path):
    _, path = export(tiny_llama, "forward", [{"pass": "weight_clustering", "targets": "layers.*.mlp.*"}], tmp_path)
    info = inspect_onnx(path)
    model = onnx.load(path)
    arrays = [numpy_helper.to_array(t) for t in model.graph.initializer]
    assert info["initializer_bytes"] == sum(a.nbytes for a in arrays)
    assert info["bytes_by_dtype"]["uint8"] == sum(a.nbytes for a in arrays if a.dtype == np.uint8) > 0  # packed codes
    assert info["file_bytes"] == (tmp_path / "model.onnx").stat().st_size and info["external_data"] == []
    assert info["opsets"]["ai.onnx"] == 18 and info["custom_domains"] == []
    assert [v["name"] for v in info["inputs"]] == [i.name for i in model.graph.input]
    assert info["inputs"][0]["dtype"] == "int64" and isinstance(info["inputs"][0]["shape"][0], str)  # symbolic batch
    assert sum(info["ops"].values()) == info["nodes"] == len(model.graph.node)
    assert info["ops"]["Gather"] >= 4  # the LUT rebuilds (plus the embedding)
    assert info["kv_cache"] == {"inputs": [], "outputs": [], "layout": None}
    assert len(info["largest_tensors"]) == 10
    assert info["largest_tensors"][0]["bytes"] == max(a.nbytes for a in arrays)
    text = format_inspection(info)
    assert "custom domains: none" in text and "KV cache" not in text and "uint8" in text


def test_decode_model_lists_its_quantized_cache(tiny_llama, tmp_path):
    graph, path = export(tiny_llama, "decode", [{"pass": "kv_cache_quant"}], tmp_path)
    info = inspect_onnx(path)
    cache = info["kv_cache"]
    assert len(cache["inputs"]) == len(cache["outputs"]) == len(graph.cache)
    assert {v["dtype"] for v in cache["inputs"] if v["name"].endswith(".packed")} == {"uint8"}
    assert json.loads(cache["layout"]) == json.loads(graph.cache.to_json())
    assert "KV cache: 16 inputs, 16 outputs; input dtypes float x12, uint8 x4" in format_inspection(info)


def test_external_data_is_counted(tiny_llama, tmp_path):
    _, path = export(tiny_llama, "forward", [], tmp_path, external_data="always")
    info = inspect_onnx(path)
    assert info["external_data"] == ["model.onnx.data"]
    on_disk = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert (
        info["file_bytes"] == on_disk
        and info["initializer_bytes"] > 0.9 * (tmp_path / "model.onnx.data").stat().st_size
    )


def test_cli(tiny_llama, tmp_path, capsys):
    _, path = export(tiny_llama, "forward", [], tmp_path)
    assert main(["inspect", path]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: ")
    assert main(["inspect", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nodes"] > 0
    (tmp_path / "junk.onnx").write_text("not a model")
    assert main(["inspect", str(tmp_path / "junk.onnx")]) == 2
    assert "not an ONNX model" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(InspectError, match="no such file"):
        inspect_onnx(tmp_path / "missing.onnx")


def tiny_onnx(directory, edit) -> str:
    """y = x + w with a 4-float initializer w, after ``edit(w)`` breaks it; saved without checks."""
    w = numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")
    edit(w)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])],
        [w],
    )
    path = directory / "model" / "m.onnx"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(onnx.helper.make_model(graph).SerializeToString())
    return str(path)


def external(location: str, **more):
    def edit(w):
        w.ClearField("raw_data")
        w.data_location = onnx.TensorProto.EXTERNAL
        for key, value in {"location": location, "length": "16", **more}.items():
            w.external_data.add(key=key, value=value)

    return edit


def test_broken_or_escaping_onnx_files_are_named_errors(tmp_path, capsys):
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 999)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "link.data").symlink_to(secret)

    def set_type(t):
        def edit(w):
            w.ClearField("raw_data")
            w.float_data.extend([0.0] * 4)
            w.data_type = t

        return edit

    cases = [
        (set_type(99), "data type unknown\\(99\\), which has no fixed size"),
        (set_type(onnx.TensorProto.UNDEFINED), "data type undefined"),
        (external("../secret"), "points its external data at '../secret', outside the model's folder"),
        (external(str(secret)), "outside the model's folder"),
        (external("link.data"), "'link.data', outside the model's folder"),
        (external("gone.data"), "external data file 'gone.data' is missing"),
        (external("", length="16"), "names no location"),
        (external("ok.data", length="lots"), "has length 'lots', not a size"),
    ]
    (tmp_path / "model" / "ok.data").write_bytes(b"\0" * 16)
    for edit, message in cases:
        path = tiny_onnx(tmp_path, edit)
        with pytest.raises(InspectError, match=message):
            inspect_onnx(path)
        assert main(["inspect", path]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(secret.stat().st_size) not in err
    info = inspect_onnx(tiny_onnx(tmp_path, external("ok.data")))
    assert info["external_data"] == ["ok.data"] and info["initializer_bytes"] == 16
