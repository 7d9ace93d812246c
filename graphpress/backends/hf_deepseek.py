"""DeepSeek's MLA layout for ``gqa_to_mla``'s output: what the hf backend writes for a converted model.

TransMLA's deliverable is a model DeepSeek's inference stack runs. transformers'
``DeepseekV3Attention`` (and vLLM's, SGLang's) computes, per head h,

    q_h = W_q,h x = [q_nope_h; q_rope_h]
    [c'; k_rope] = kv_a_proj_with_mqa(x),   c = kv_a_layernorm(c')
    [k_nope_h; v_h] = kv_b_proj,h c,        k_h = [k_nope_h; RoPE(k_rope)]
    o = o_proj [softmax(scaling q_h^T k_h) v_h]_h,   scaling = (qk_nope + qk_rope)^-0.5

which is ``gqa_to_mla``'s decoupled form term for term (``rewrite_decoupled``):

* non-absorbed: q_nope_h = the graph's q_nope head, k_nope = k_up c (one key for all heads),
  v_h = v_up of head h's KV head; qk_nope_head_dim = kv_heads * head_dim - rope dims,
  v_head_dim = head_dim.
* absorbed: q_nope_h = q_latent_h, k_nope = v = c: kv_b_proj is [I; I] per head and o_proj is
  the graph's o_latent; qk_nope_head_dim = v_head_dim = kv_rank.

Three pieces of DeepSeek's layout the conversion does not produce, and how each is handled:

* **the latent RMSNorm** (``kv_a_layernorm``, eps fixed at 1e-6): the latent is written scaled by
  sigma = 2^-40 and the norm's weight is sqrt(eps) / sigma. For s = sigma c,
  RMSNorm(s) = s w / sqrt(mean(s^2) + eps) = c / sqrt(1 + sigma^2 mean(c^2) / eps): the norm is
  the identity to a relative error of sigma^2 mean(c^2) / (2 eps) = 4e-19 mean(c^2), below
  float32's resolution for any latent under 1e10 in mean square. A power of two scales the
  weights exactly; float32 and bfloat16 hold both ends of the range, float16 does not (refused).
* **the softmax scale** (qk_head_dim^-0.5 instead of the model's): the ratio is folded into q_proj.
* **q_lora** (a low-rank, normed query): not used for a query without bias (``q_lora_rank`` None,
  a dense ``q_proj``). DeepSeek's q_proj has no bias, so a query with one (Qwen2) takes the q_lora
  path with q_lora_rank = hidden + 1: q_a_proj lifts x to sigma [x; 1], q_a_layernorm is the
  identity on it as on the latent, and q_b_proj is [W | b].

RoPE: DeepSeek's key turns at every frequency of a ``qk_rope_head_dim``-dim head once, half-split.
``gqa_to_mla``'s key does that when converted with ``rope.per_frequency`` and ``rope.dims`` equal to
a head's rotary dims (its ``rope_freqs`` buffer then lists each frequency once, in order); any other
choice of frequencies is refused with the fix. The rest of the model (embeddings, norms, dense
MLPs, lm_head) keeps its tensors under the same names; ``first_k_dense_replace`` = all layers.
"""

from __future__ import annotations

import math

import torch

from ..errors import BackendError
from ..ir import Graph
from ..ir.blocks import SDPA

SIGMA = 2.0**-40  # the latent's scale: exact in binary, tiny against DeepSeek's fixed eps
LATENT_EPS = 1e-6  # DeepseekV3RMSNorm's default, which kv_a_layernorm uses
MLA_LINEARS = ("kv_down", "k_rope", "q_rope", "q_nope", "k_up", "v_up", "q_latent", "o_latent")  # gqa_to_mla's
SHAPE = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "q_lora_rank")
KEPT = (  # the model's config fields DeepSeek's has under the same name and meaning
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def mla_paths(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Attention paths gqa_to_mla converted (they hold a latent down-projection)."""
    return sorted(name[: -len(".kv_down.weight")] for name in tensors if name.endswith(".kv_down.weight"))


def deepseek_v3(graph: Graph, tensors: dict[str, torch.Tensor], config, where: str):
    """(DeepseekV3Config, state dict) of the converted model; refused, with the reason, where the layout cannot
    express it."""
    from transformers import DeepseekV3Config

    paths = mla_paths(tensors)
    layers = [f"model.layers.{i}.self_attn" for i in range(config.num_hidden_layers)]
    if paths != layers:
        missing = sorted(set(layers) - set(paths)) or paths
        raise BackendError(
            f"{where}.layout: DeepSeek's layout has MLA in every layer; {missing[0]} "
            f"{'is not converted by gqa_to_mla' if missing[0] in layers else 'is not a decoder layer attention'} "
            "(convert every layer's attention)"
        )
    if getattr(config, "sliding_window", None) is not None:
        raise BackendError(
            f"{where}.layout: {type(config).__name__}.sliding_window = {config.sliding_window}: DeepSeek's attention "
            "is global, so it cannot express a sliding window"
        )
    dtype = tensors[f"{paths[0]}.kv_down.weight"].dtype
    if dtype == torch.float16:
        raise BackendError(
            f"{where}.layout: DeepSeek's latent RMSNorm is made the identity by a 2^-40 scale, which float16 cannot "
            "hold; capture in float32 or bfloat16 (capture.dtype)"
        )
    state = {k: v for k, v in tensors.items() if not any(k.startswith(p + ".") for p in paths)}
    shapes = set()
    for path in paths:
        attention, shape = _attention(graph, tensors, path, config, where)
        state.update(attention)
        shapes.add(shape)
    if len(shapes) > 1:
        raise BackendError(
            f"{where}.layout: DeepSeek's config has one MLA shape for all layers; the layers have "
            f"{', '.join(str(dict(s)) for s in sorted(shapes))}"
        )
    rope = {k: v for k, v in (config.rope_parameters or {}).items() if k != "partial_rotary_factor"}
    biased = any(k.endswith(("kv_a_proj_with_mqa.bias", "o_proj.bias", "q_a_proj.bias")) for k in state)
    deepseek = DeepseekV3Config(
        **dict(next(iter(shapes))),
        **{field: getattr(config, field) for field in KEPT},
        num_key_value_heads=config.num_attention_heads,
        first_k_dense_replace=config.num_hidden_layers,
        num_mtp_layers=0,
        rope_parameters=rope,
        rope_interleave=False,
        attention_bias=biased,
        tie_word_embeddings=getattr(config, "tie_word_embeddings", False),
    )
    deepseek.dtype = dtype
    return deepseek, _biases_for(state, paths, biased)


def layout_details(config) -> dict:
    """The report's record of a DeepSeek checkpoint's MLA shape (nothing for the model's own class)."""
    if getattr(config, "model_type", None) != "deepseek_v3":
        return {}
    return {"layout": "deepseek_v3", **{k: getattr(config, k) for k in SHAPE}, "latent_scale": SIGMA}


def _attention(graph: Graph, t: dict[str, torch.Tensor], path: str, config, where: str):
    """One layer's DeepSeek tensors and its shape fields."""
    at = f"{where}.layout: {path}"
    if f"{path}.k_rope.weight" not in t:
        raise BackendError(
            f"{at} was converted with rope.mode 'after_up_projection' (RoPE on keys rebuilt from the latent), which "
            "DeepSeek's MLA cannot express: it keeps RoPE on a separate key; convert with rope.mode 'decoupled'"
        )
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    down, k_rope = t[f"{path}.kv_down.weight"], t[f"{path}.k_rope.weight"]
    rank, dr = down.shape[0], k_rope.shape[0]
    _check_frequencies(t[f"{path}.rope_freqs"], dr, at)
    absorbed = f"{path}.q_latent.weight" in t
    if absorbed:
        nope, v_dim = rank, rank
        eye = torch.eye(rank, dtype=down.dtype)
        kv_b = torch.cat([eye, eye] * heads)
        o_weight, o_bias = t[f"{path}.o_latent.weight"], t.get(f"{path}.o_latent.bias")
    else:
        k_up, v_up = t[f"{path}.k_up.weight"], t[f"{path}.v_up.weight"]
        nope, v_dim = k_up.shape[0], v_up.shape[0] // kv_heads
        group = heads // kv_heads
        kv_b = torch.cat(
            [torch.cat([k_up, v_up[(h // group) * v_dim : (h // group + 1) * v_dim]]) for h in range(heads)]
        )
        o_weight, o_bias = t[f"{path}.o_proj.weight"], t.get(f"{path}.o_proj.bias")
    ratio = _scale(graph, path, at) * math.sqrt(nope + dr)  # the graph's scale over DeepSeek's
    nope_part = "q_latent" if absorbed else "q_nope"
    q = _query(t, path, nope_part, heads, (nope, dr), down.shape[-1])
    state = {
        **_query_state(path, (q.double() * ratio).to(q.dtype), down.shape[-1]),
        f"{path}.kv_a_proj_with_mqa.weight": torch.cat([down * SIGMA, k_rope]),
        f"{path}.kv_a_layernorm.weight": torch.full((rank,), math.sqrt(LATENT_EPS) / SIGMA, dtype=down.dtype),
        f"{path}.kv_b_proj.weight": kv_b.contiguous(),
        f"{path}.o_proj.weight": o_weight,
    }
    if any(f"{path}.{part}.bias" in t for part in ("kv_down", "k_rope")):
        latent_bias = _bias(t, f"{path}.kv_down", rank, down.dtype) * SIGMA
        state[f"{path}.kv_a_proj_with_mqa.bias"] = torch.cat([latent_bias, _bias(t, f"{path}.k_rope", dr, down.dtype)])
    if o_bias is not None:
        state[f"{path}.o_proj.bias"] = o_bias
    q_lora = q.shape[-1] if q.shape[-1] != down.shape[-1] else None
    return state, tuple(zip(SHAPE, (rank, dr, nope, v_dim, q_lora)))


def _query(t: dict[str, torch.Tensor], path: str, nope_part: str, heads: int, dims: tuple, hidden: int):
    """Each head's query rows, [nope; rope], as DeepSeek's q_proj lays them out; with a bias, [W | b]."""
    parts = list(zip((nope_part, "q_rope"), dims))
    weights = [t[f"{path}.{name}.weight"].reshape(heads, rows, hidden) for name, rows in parts]
    if any(f"{path}.{name}.bias" in t for name, _ in parts):
        weights = [
            torch.cat([w, _bias(t, f"{path}.{name}", heads * rows, w.dtype).reshape(heads, rows, 1)], -1)
            for w, (name, rows) in zip(weights, parts)
        ]
    return torch.cat(weights, 1).reshape(heads * sum(dims), -1)


def _bias(t: dict[str, torch.Tensor], linear: str, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """A linear's bias, or zeros where it has none (a DeepSeek tensor that joins it with one that has)."""
    return t.get(f"{linear}.bias", torch.zeros(rows, dtype=dtype))


def _query_state(path: str, q: torch.Tensor, hidden: int) -> dict[str, torch.Tensor]:
    """A query without bias is DeepSeek's dense q_proj. DeepSeek's q_proj has no bias, so a query with one, [W | b],
    takes the q_lora path instead: q_a_proj makes sigma [x; 1] (its bias gives the 1), q_a_layernorm (eps 1e-6,
    weight sqrt(eps) / sigma) turns that back into [x; 1] as it does the latent, and q_b_proj is [W | b]."""
    if q.shape[-1] == hidden:
        return {f"{path}.q_proj.weight": q}
    d, dtype = hidden, q.dtype
    lift = torch.cat([torch.eye(d, dtype=dtype), torch.zeros(1, d, dtype=dtype)]) * SIGMA
    one = torch.zeros(d + 1, dtype=dtype)
    one[-1] = SIGMA
    return {
        f"{path}.q_a_proj.weight": lift,
        f"{path}.q_a_proj.bias": one,
        f"{path}.q_a_layernorm.weight": torch.full((d + 1,), math.sqrt(LATENT_EPS) / SIGMA, dtype=dtype),
        f"{path}.q_b_proj.weight": q,
    }


def _biases_for(state: dict[str, torch.Tensor], paths: list[str], biased: bool) -> dict[str, torch.Tensor]:
    """With ``attention_bias`` every layer's kv_a_proj_with_mqa and o_proj has a bias: zeros where the graph has
    none."""
    if not biased:
        return state
    for path in paths:
        for name in ("kv_a_proj_with_mqa", "o_proj"):
            weight = state[f"{path}.{name}.weight"]
            state.setdefault(f"{path}.{name}.bias", torch.zeros(weight.shape[0], dtype=weight.dtype))
    return state


def _check_frequencies(freqs: torch.Tensor, dr: int, at: str) -> None:
    """DeepSeek's RoPE key turns at each frequency of its dr-dim head once, half-split: the graph's key must read
    the model's cos/sin columns that way (half-split tables: 0..dr-1; interleaved: 0, 2, ..., then 1, 3, ...)."""
    half = torch.arange(dr // 2)
    layouts = (torch.cat([half, half + dr // 2]), torch.cat([2 * half, 2 * half + 1]))
    if not any(torch.equal(freqs.cpu(), layout) for layout in layouts):
        raise BackendError(
            f"{at}: its RoPE key turns at table columns {freqs.tolist()}, not at each of a {dr}-dim head's frequencies "
            "once; DeepSeek's layout needs that: convert with rope.per_frequency true and rope.dims equal to a head's "
            "rotary dims"
        )


def _scale(graph: Graph, path: str, at: str) -> float:
    """The softmax scale of the attention that reads ``path``'s query (the rewrite always states it)."""
    start = next((n for n in graph.nodes if graph.tensor_name(n) == f"{path}.q_rope.weight"), None)
    seen, todo = set(), [start] if start is not None else []
    while todo:
        node = todo.pop()
        if node.op == "call_function" and node.target in SDPA:
            return float(node.kwargs.get("scale") or 1 / math.sqrt(node.args[0].meta["val"].shape[-1]))
        todo.extend(u for u in node.users if u not in seen and not seen.add(u))
    raise BackendError(f"{at}: no attention reads its query ({path}.q_rope); not gqa_to_mla's decoupled form")
