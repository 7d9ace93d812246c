"""An ONNX file run piece by piece: cut by weight bytes along the dataflow, the same outputs as one session,
each piece's weights read from the file's own external data."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from onnx import helper as h

from graphpress import compress
from graphpress.backends.onnx_pieces import Pieces, lean_session
from graphpress.errors import BackendError

from .families import build


def _weight(name: str, rows: int, cols: int, seed: int) -> TensorProto:
    data = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return onnx.numpy_helper.from_array(data, name)


def chain(tmp_path, with_if: bool = False):
    """Before: x -> MatMul w0 -> Relu -> MatMul w1 -> Add x (a residual read three nodes later) -> MatMul w2 -> y,
    each weight 8x8 floats (256 bytes), stored as external data; with ``with_if`` the last MatMul sits in an If
    branch that reads w2 and h from the enclosing scope."""
    nodes = [
        h.make_node("MatMul", ["x", "w0"], ["a"]),
        h.make_node("Relu", ["a"], ["r"]),
        h.make_node("MatMul", ["r", "w1"], ["m"]),
        h.make_node("Add", ["m", "x"], ["h"]),
    ]
    if with_if:
        branch = h.make_graph(
            [h.make_node("MatMul", ["h", "w2"], ["y_then"])],
            "then",
            [],
            [h.make_tensor_value_info("y_then", TensorProto.FLOAT, None)],
        )
        other = h.make_graph(
            [h.make_node("Identity", ["h"], ["y_else"])],
            "else",
            [],
            [h.make_tensor_value_info("y_else", TensorProto.FLOAT, None)],
        )
        nodes.append(h.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=other))
        inputs = [h.make_tensor_value_info("flag", TensorProto.BOOL, [])]
    else:
        nodes.append(h.make_node("MatMul", ["h", "w2"], ["y"]))
        inputs = []
    graph = h.make_graph(
        nodes,
        "chain",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8]), *inputs],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [_weight(f"w{k}", 8, 8, k) for k in range(3)],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    path = tmp_path / "chain.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="chain.onnx.data", size_threshold=0)
    return path


def whole(path, feeds: dict) -> np.ndarray:
    """The file in one session, made as the pieces' are (onnxruntime may fuse across what the pieces cut)."""
    return lean_session(path).run(None, feeds)[0]


@pytest.mark.parametrize(
    "budget, expected",
    [
        # Expected: a cut before each node that would take the piece over 256 bytes of weights; the residual x
        # is read across the first cut
        (256, [(["x"], ["r"], ["w0"]), (["r", "x"], ["h"], ["w1"]), (["h"], ["y"], ["w2"])]),
        (512, [(["x"], ["h"], ["w0", "w1"]), (["h"], ["y"], ["w2"])]),
        (1, [(["x"], ["r"], ["w0"]), (["r", "x"], ["h"], ["w1"]), (["h"], ["y"], ["w2"])]),  # one weight: a piece
        (10**6, [(["x"], ["y"], ["w0", "w1", "w2"])]),
    ],
)
def test_pieces_cut_by_weight_bytes_along_the_dataflow(tmp_path, budget, expected):
    path = chain(tmp_path)
    pieces = Pieces(path, budget)
    assert [(p.inputs, p.outputs, sorted(p.initializers)) for p in pieces.pieces] == expected
    x = np.random.default_rng(9).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_allclose(pieces([torch.from_numpy(x)])[0].numpy(), whole(path, {"x": x}), rtol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.onnx", "chain.onnx.data"]  # no piece left behind


def test_a_branch_reading_the_enclosing_scope_takes_its_values_into_its_piece(tmp_path):
    path = chain(tmp_path, with_if=True)
    pieces = Pieces(path, 256)
    last = pieces.pieces[-1]
    assert (sorted(last.inputs), sorted(last.initializers)) == (["flag", "h"], ["w2"])
    x = np.random.default_rng(9).standard_normal((3, 8)).astype(np.float32)
    for flag in (True, False):
        feeds = [torch.from_numpy(x), torch.tensor(flag)]
        np.testing.assert_allclose(pieces(feeds)[0].numpy(), whole(path, {"x": x, "flag": np.array(flag)}), rtol=1e-5)


def test_a_sweep_runs_every_input_and_drops_each_value_after_its_last_reader(tmp_path, monkeypatch):
    path = chain(tmp_path)
    pieces = Pieces(path, 256)
    xs = [np.random.default_rng(s).standard_normal((s + 1, 8)).astype(np.float32) for s in range(3)]
    made = []
    real = Pieces._session
    monkeypatch.setattr(
        Pieces, "_session", lambda self, piece, values: made.append(sorted(values)) or real(self, piece, values)
    )
    swept = pieces.sweep([[torch.from_numpy(x)] for x in xs])
    assert made == [["x"], ["r", "x"], ["h"]]  # one session per piece for all inputs; x gone once the Add has run
    for x, (outputs, seconds) in zip(xs, swept):
        np.testing.assert_allclose(outputs[0].numpy(), whole(path, {"x": x}), rtol=1e-5)
        assert seconds > 0
    with pytest.raises(BackendError, match=r"onnx: the ONNX model takes 1 tensor inputs, got 2"):
        pieces([torch.from_numpy(xs[0])] * 2)


def test_the_pieces_read_the_files_own_weights(tmp_path):
    """A changed byte in the external data changes the pieces' output: they run the file, not a copy."""
    path = chain(tmp_path)
    x = torch.ones(1, 8)
    before = Pieces(path, 256)([x])[0]
    data = path.with_name("chain.onnx.data")
    raw = bytearray(data.read_bytes())
    raw[300] ^= 0x40  # inside w1
    data.write_bytes(bytes(raw))
    assert not torch.equal(Pieces(path, 256)([x])[0], before)


SPEC = {
    "passes": [{"pass": "low_rank", "targets": "layers.*.mlp.*", "rank": {"param_ratio": 0.6}}],
    "verify": {"max": 1.0},
}


def test_the_onnx_backend_validates_in_pieces_when_asked(tmp_path):
    """``validation_piece_mb``: a Llama's file checked in several pieces agrees with eager as one session does;
    a decode graph refuses the option by name."""
    model, ids = build("llama"), torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    records = []
    for extra in ({}, {"validation_piece_mb": 0.02}):
        spec = {**SPEC, "backends": [{"target": "onnx", "external_data": "always", **extra}]}
        records.append(compress(model, spec, (ids,), out_dir=tmp_path / str(extra), progress=False).report.backends[0])
    one, pieces = records
    assert one["errors"]["rel_l2"] < 1e-5 and pieces["errors"]["rel_l2"] < 1e-5
    assert "pieces" not in one["latency"] and pieces["latency"]["pieces"] > 2
    spec = {**SPEC, "capture": {"mode": "decode"}, "backends": [{"target": "onnx", "validation_piece_mb": 1}]}
    with pytest.raises(BackendError, match=r"backends\[0\]\.validation_piece_mb: a decode graph"):
        compress(model, spec, (ids,), out_dir=tmp_path / "decode", progress=False)
