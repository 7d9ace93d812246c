"""Rewrite rule ``group_repeated_heads``: attention's products over grouped KV heads, not repeated copies."""

from __future__ import annotations

import pytest
import torch

from graphpress.backends.grouped_heads import group_repeated_heads
from graphpress.ir import capture

aten = torch.ops.aten
HEADS, KV_HEADS, DIM = 6, 2, 8
REPEATS = {aten.repeat_interleave.self_int, aten.expand.default, aten.repeat.default}


def repeat_kv(x: torch.Tensor, groups: int, form: str) -> torch.Tensor:
    if form == "interleave":
        return x.repeat_interleave(groups, 1)
    if form == "expand":  # transformers' repeat_kv
        b, h, t, d = x.shape
        return x[:, :, None, :, :].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)
    return x.repeat(1, groups, 1, 1)  # "tile": head h reads KV head h % (H / g), not h // g


class Attention(torch.nn.Module):
    """Eager masked attention over a cache, as explicit matmuls (transformers' eager path, or the TVM
    backend's spelling of SDPA); ``query_heads`` < HEADS broadcasts the query over the heads."""

    def __init__(self, form: str, query_heads: int = HEADS) -> None:
        super().__init__()
        self.form, self.query_heads = form, query_heads

    def forward(self, q, k, v, mask):
        groups = HEADS // KV_HEADS
        q = q.reshape(q.shape[0], self.query_heads, -1, DIM)  # heads are a model's constants, lengths free
        k, v = (x.reshape(x.shape[0], KV_HEADS, -1, DIM) for x in (k, v))
        keys, values = repeat_kv(k, groups, self.form), repeat_kv(v, groups, self.form)
        scores = torch.matmul(q, keys.transpose(2, 3)) * DIM**-0.5 + mask[:, None]
        return torch.matmul(torch.softmax(scores, -1), values)


def inputs(length: int, cached: int, query_heads: int = HEADS, batch: int = 2) -> tuple:
    g = torch.Generator().manual_seed(length * 100 + cached)
    total = length + cached
    q = torch.randn(batch, query_heads, length, DIM, generator=g)
    k, v = (torch.randn(batch, KV_HEADS, total, DIM, generator=g) for _ in range(2))
    mask = torch.zeros(batch, length, total).masked_fill(torch.rand(batch, length, total, generator=g) < 0.3, -1e9)
    return q, k, v, mask


def targets(graph) -> list:
    return [n.target for n in graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("form", ["interleave", "expand"])
def test_products_read_each_kv_head_once_and_match(form):
    model = Attention(form)
    graph = capture(model, inputs(3, 4, batch=1))  # a batch of 1, as decode graphs are captured
    before = targets(graph)
    assert sum(t in REPEATS for t in before) == 2 and before.count(aten.matmul.default) == 2

    work = graph.clone()
    assert group_repeated_heads(work) == 2

    after = targets(work)
    assert not any(t in REPEATS for t in after)
    products = [n for n in work.nodes if n.op == "call_function" and n.target is aten.matmul.default]
    assert [n.meta["val"].shape[1] for n in products] == [KV_HEADS, KV_HEADS]  # one product per KV head
    for length, cached in [(3, 4), (1, 9), (5, 0)]:  # the step's one token, and shapes other than the capture's
        example = inputs(length, cached)
        expected = model(*example)
        got = work.module()(*example)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert targets(graph) == before  # the graph it was given is untouched (this test rewrote a clone)
    again = graph.clone()  # and its shapes stay free: the rewrite specialised no symbol in the shared shape env
    group_repeated_heads(again)
    shapes = [n.meta["val"].shape for n in again.nodes if n.op == "call_function" and n.target is aten.matmul.default]
    assert all(not isinstance(shape[0], int) and not isinstance(shape[2], int) for shape in shapes)


@pytest.mark.parametrize(
    ("form", "query_heads", "grouped"),
    [("tile", HEADS, 0), ("interleave", 1, 1)],
    ids=["heads-tiled-not-interleaved", "query-broadcast-over-heads"],
)
def test_products_without_interleaved_heads_on_both_sides_are_left_alone(form, query_heads, grouped):
    """Tiled heads are another mapping; a one-head query's scores product is a broadcast (the
    probabilities, which have every head by then, still take the grouped product)."""
    model = Attention(form, query_heads)
    work = capture(model, inputs(3, 4, query_heads))
    before = targets(work)

    assert group_repeated_heads(work) == grouped

    assert targets(work).count(aten.matmul.default) == 2
    assert sum(t in REPEATS for t in targets(work)) == 2 - grouped
    example = inputs(2, 5, query_heads)
    torch.testing.assert_close(work.module()(*example), model(*example), rtol=1e-5, atol=1e-6)
    assert grouped or targets(work) == before
