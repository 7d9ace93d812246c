"""Capture and block recognition on the example LM and on transformers' Llama."""

import pytest
import torch

from graphpress import CaptureError
from graphpress.ir import capture

from .conftest import rel_err, state_hash


def test_capture_runs_on_other_shapes(tiny_llama, token_batch):
    graph = capture(tiny_llama, (token_batch[:1],))  # captured at batch 1 ...
    other = torch.randint(0, 256, (3, 40))  # ... runs at batch 3, length 40
    with torch.no_grad():
        assert rel_err(graph(other), tiny_llama(other)) < 1e-6


def test_capture_copies_tensors_and_leaves_the_model_alone(tiny_llama, token_batch):
    before = state_hash(tiny_llama)
    graph = capture(tiny_llama, (token_batch,))
    assert state_hash(tiny_llama) == before
    weight = graph.weight("layers.0.mlp.up_proj.weight")
    assert weight.data_ptr() != tiny_llama.layers[0].mlp.up_proj.weight.data_ptr()
    assert torch.equal(weight, tiny_llama.layers[0].mlp.up_proj.weight)


def test_linears_by_glob(tiny_llama, token_batch):
    graph = capture(tiny_llama, (token_batch,))
    assert [lin.path for lin in graph.linears("layers.1.mlp.*")] == [
        "layers.1.mlp.gate_proj",
        "layers.1.mlp.up_proj",
        "layers.1.mlp.down_proj",
    ]
    assert len(graph.linears()) == 2 * 7 + 1  # 7 per layer + lm_head
    assert [lin.path for lin in graph.linears("*proj", exclude=["*mlp*", "*q_proj", "*k_proj", "*v_proj"])] == [
        "layers.0.self_attn.o_proj",
        "layers.1.self_attn.o_proj",
    ]
    down = graph.linears("layers.0.mlp.down_proj")[0]
    assert (down.in_features, down.out_features, down.weight) == (704, 256, "layers.0.mlp.down_proj.weight")


def test_attention_blocks_of_the_example_model(tiny_llama, token_batch):
    graph = capture(tiny_llama, (token_batch,))
    blocks = graph.attention_blocks()
    assert [b.path for b in blocks] == ["layers.0.self_attn", "layers.1.self_attn"]
    block = blocks[0]
    assert (block.num_heads, block.num_kv_heads, block.head_dim, block.group_size) == (8, 2, 32, 4)
    assert [p.path.rsplit(".", 1)[-1] for p in (block.q_proj, block.k_proj, block.v_proj, block.o_proj)] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    ]
    assert block.rope and block.rope_nodes
    assert len(block.repeat_kv_nodes) == 2  # one expand for K, one for V


def test_mlp_blocks_of_the_example_model(tiny_llama, token_batch):
    graph = capture(tiny_llama, (token_batch,))
    blocks = graph.mlp_blocks()
    assert [b.path for b in blocks] == ["layers.0.mlp", "layers.1.mlp"]
    assert blocks[0].activation == "silu"
    assert blocks[0].gate_proj.path.endswith("gate_proj")
    assert blocks[0].up_proj.path.endswith("up_proj")
    assert blocks[0].down_proj.path.endswith("down_proj")


def test_hf_llama_capture_and_blocks(hf_llama):
    ids = torch.randint(0, 128, (2, 16))
    graph = capture(hf_llama, (ids,))
    with torch.no_grad():
        other = torch.randint(0, 128, (3, 33))
        assert rel_err(graph(other).logits, hf_llama(other).logits) < 1e-6
    blocks = graph.attention_blocks("layers.*.self_attn")  # suffix match: paths start with 'model.'
    assert [b.path for b in blocks] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert (blocks[0].num_heads, blocks[0].num_kv_heads, blocks[0].head_dim, blocks[0].rope) == (4, 2, 16, True)
    mlps = graph.mlp_blocks()
    assert [m.path for m in mlps] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert mlps[0].gate_proj.path == "model.layers.0.mlp.gate_proj"


def test_mha_without_rope_is_recognised():
    class MHA(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.out = (torch.nn.Linear(32, 32) for _ in range(4))

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = (p(x).view(b, s, 4, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return self.out(y.transpose(1, 2).reshape(b, s, 32))

    (block,) = capture(MHA(), (torch.randn(2, 5, 32),)).attention_blocks()
    assert (block.num_heads, block.num_kv_heads, block.rope, block.repeat_kv_nodes) == (4, 4, False, ())
    assert block.o_proj.path == "out" and block.q_proj.bias == "q.bias"


class Inner(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot capture this
            return x * 2
        return x


class Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.branchy = Inner()

    def forward(self, x):
        return self.branchy(self.proj(x))


def test_capture_error_names_the_module():
    with pytest.raises(CaptureError, match="module 'branchy'"):
        capture(Outer(), (torch.randn(2, 4),))


def test_capture_rejects_non_modules_and_bad_inputs(tiny_llama):
    with pytest.raises(CaptureError, match="nn.Module"):
        capture(lambda x: x, (torch.randn(2),))
    with pytest.raises(CaptureError, match="do not fit"):
        capture(tiny_llama, (torch.zeros(1, 4, dtype=torch.long), None, None, None, torch.zeros(1)))
    with pytest.raises(CaptureError, match="mode 'prefill'"):
        capture(tiny_llama, (torch.zeros(1, 4, dtype=torch.long),), mode="prefill")
    with pytest.raises(CaptureError, match="decode capture needs a transformers causal LM.*init_kv_cache"):
        capture(torch.nn.Linear(4, 4), (torch.randn(1, 4),), mode="decode")


def test_capture_restores_training_flags(tiny_llama):
    tiny_llama.train()
    try:
        capture(tiny_llama, (torch.zeros(2, 4, dtype=torch.long),))
        assert all(m.training for m in tiny_llama.modules())
    finally:
        tiny_llama.eval()


@torch.library.custom_op("graphpress_test::no_fake", mutates_args=())
def _no_fake(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


class UsesOpWithoutFake(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = torch.nn.Sequential(torch.nn.Linear(4, 4))

    def forward(self, x):
        return _no_fake(self.block(x)) + 1


def test_capture_error_names_the_op():
    with pytest.raises(
        CaptureError, match="module '<root>' at op graphpress_test::no_fake: RuntimeError: There was no fake impl"
    ):
        capture(UsesOpWithoutFake(), (torch.randn(2, 4),))
    with pytest.raises(CaptureError, match=r"or compress a submodule whose forward is traceable$"):
        capture(UsesOpWithoutFake(), (torch.randn(2, 4),))  # the hint is a whole sentence


def test_forward_hooks_run_once_during_capture_and_are_part_of_the_graph():
    """What the README promises about hooks on the user's model."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    calls = []
    model[0].register_forward_hook(lambda module, args, out: calls.append(1) or out * 2)
    x = torch.randn(2, 4)
    graph = capture(model, (x,))
    assert len(calls) == 1
    calls.clear()
    assert torch.allclose(graph.module()(x), 2 * torch.nn.functional.linear(x, model[0].weight, model[0].bias))
    assert calls == []  # the graph does not call back into the user's hooks
