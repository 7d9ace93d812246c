"""Small transformers models of every major decoder family, each from its DEFAULT config.

Only sizes are set (hidden 64, 2 layers, 4 heads, a 128-token vocabulary): ``use_cache``,
``return_dict``, attention implementation, rotary layout, biases and norms are each
family's defaults, as a user's checkpoint has them (``llama_eager`` also sets
``attn_implementation="eager"``, what users pick for attention maps). Weights are random (seeded).
"""

from __future__ import annotations

import torch

SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
GQA = dict(SIZES, num_key_value_heads=2)

# name -> (model class, config class, config kwargs)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", GQA),
    "llama_mha": ("LlamaForCausalLM", "LlamaConfig", SIZES),
    "llama_eager": ("LlamaForCausalLM", "LlamaConfig", dict(GQA, attn_implementation="eager")),  # matmul/softmax
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", GQA),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(GQA, head_dim=16)),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(GQA, sliding_window=8)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(GQA, pad_token_id=0)),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(GQA, head_dim=16)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(GQA, head_dim=16, sliding_window=8)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(GQA, head_dim=24, sliding_window=8)),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4)),
    "gptneox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", SIZES),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(GQA, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2moe": (
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        dict(GQA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64),
    ),
}
MOE = {"mixtral", "qwen2moe"}
SHAPE_200M = dict(  # a ~200M-parameter Llama (760 MB in fp32): streaming's memory test and benchmarks/scale.py
    vocab_size=8000,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=12,
    num_attention_heads=16,
    num_key_value_heads=4,
)
ENCODERS = {  # name -> (model class, config class, config kwargs, example input shape)
    "bert": ("BertModel", "BertConfig", SIZES, None),
    "vit": ("ViTModel", "ViTConfig", dict(SIZES, image_size=32, patch_size=8, vocab_size=None), (3, 32, 32)),
}
DENSE = [name for name in FAMILIES if name not in MOE]


def build(name: str) -> torch.nn.Module:
    """The family's causal LM from its default config (sizes only), random weights seeded by name."""
    import transformers

    model_class, config_class, sizes = FAMILIES[name]
    config = getattr(transformers, config_class)(**sizes)
    torch.manual_seed(sum(map(ord, name)))
    return getattr(transformers, model_class)(config).eval()


def build_encoder(name: str) -> tuple[torch.nn.Module, callable]:
    """An encoder from its default config and a function batch -> example inputs (token ids or pixels)."""
    import transformers

    model_class, config_class, sizes, pixels = ENCODERS[name]
    config = getattr(transformers, config_class)(**{k: v for k, v in sizes.items() if v is not None})
    torch.manual_seed(sum(map(ord, name)))
    model = getattr(transformers, model_class)(config).eval()
    if pixels is None:
        return model, lambda batch, length=12, seed=0: token_ids(batch, length, seed)
    return model, lambda batch, length=None, seed=0: torch.randn(
        batch, *pixels, generator=torch.Generator().manual_seed(seed)
    )


def token_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, SIZES["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


# family x pass: the cells of the matrix (tests/test_families.py, benchmarks/families.py)
EXACT = {
    "qkvo_lock": ("forward", {"pass": "qkvo_lock", "seed": 1}),
    "gqa_to_mla": ("decode", {"pass": "gqa_to_mla"}),  # full rank, RoPE after the up-projection
    "gqa_to_mla_absorbed": ("decode", {"pass": "gqa_to_mla", "rope": {"mode": "decoupled"}}),  # dims: all K dims
    "low_rank": ("forward", {"pass": "low_rank", "rank": 512, "only_if_smaller": False}),  # full rank
}
LOSSY = {
    "nm_sparsity": ("forward", {"pass": "nm_sparsity", "targets": "*", "exclude": ["lm_head"]}),
    "weight_clustering": (
        "forward",
        {"pass": "weight_clustering", "bits": 4, "group_size": 16, "targets": "*", "exclude": ["*mlp.gate", "*_gate"]},
    ),
    "shift_add": ("forward", {"pass": "shift_add", "targets": "*", "exclude": ["lm_head"]}),
    "weight_quant": (
        "forward",
        {"pass": "weight_quant", "bits": 4, "group_size": 16, "awq": True, "targets": "*", "exclude": ["lm_head"]},
    ),
    "kv_cache_quant": (
        "decode",
        {
            "pass": "kv_cache_quant",
            "key": {"bits": 4, "axis": "channel", "group_size": 8},
            "value": {"bits": 4, "axis": "token", "group_size": 8},
            "residual": 4,
        },
    ),
}
EAGER = r"written out as matmul/softmax/matmul"
REFUSED = {
    ("gemma2", "gqa_to_mla_absorbed"): EAGER + " with soft-capped scores",
    ("llama_eager", "gqa_to_mla_absorbed"): EAGER,
    ("gpt2", "gqa_to_mla_absorbed"): "has no RoPE; 'decoupled' splits RoPE off the latent",
    **{(f, "gqa_to_mla_absorbed"): r"\(QK-norm\), which RoRoPE's mixing" for f in ("qwen3", "gemma3")},
}
CALIBRATION = [(token_ids(2, 16, seed),) for seed in range(2)]


def run_pass(model, mode, config):
    """Compress ``model`` with one pass (no backends), calibrated on CALIBRATION; (result, the pass's report)."""
    from graphpress import compress

    spec = {
        "capture": {"mode": mode},
        "passes": [config],
        "verify": {"max": 100.0, "data": "calibration"},
        "backends": [],
    }
    result = compress(model, spec, (token_ids(1, 12),), calibration_data=CALIBRATION, progress=False)
    return result, result.report.passes[0]


def run_pass_on(graph, config):
    """One pass on a captured graph, as ``compress`` runs it after its capture (the pass manager, calibrated on
    CALIBRATION, no verification): (result, the pass's report). Passes clone their input, so one capture
    serves many passes."""
    from graphpress.passes import PassContext, PassManager, build_pass
    from graphpress.schema import load_spec

    manager = PassManager([build_pass(p) for p in load_spec({"passes": [config]}).passes])
    result = manager.run(graph, PassContext(CALIBRATION, reference=graph))
    return result, result.report.children[0].to_dict()


def matrix_config(model, pass_name: str) -> tuple[str, dict]:
    """(capture mode, pass config) of one matrix cell; decoupled gqa_to_mla keeps RoPE on every rotary key dim."""
    mode, config = {**EXACT, **LOSSY}[pass_name]
    if pass_name == "gqa_to_mla_absorbed":
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        rotary = int(head_dim * (getattr(cfg, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0))
        config = {**config, "rope": {"mode": "decoupled", "dims": kv_heads * rotary}}
    return mode, config


def random_checkpoint(folder, config, dtype=torch.float32, seed: int = 0, shard_bytes: int = 2**31) -> int:
    """Write a checkpoint of ``config``'s causal LM with random weights straight to safetensors shards (one
    tensor in memory at a time: big shapes fit), as ``save_pretrained`` lays it out. Returns its bytes.

    Matrices are N(0, 0.02), vectors (norms) ones, as transformers initialises them.
    """
    import json
    import zlib
    from pathlib import Path

    import transformers

    from graphpress.ir.store import write_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    shapes = {name: (dtype, tuple(p.shape)) for name, p in model.named_parameters()}  # tied: stored once

    def value_of(name: str) -> torch.Tensor:
        shape = shapes[name][1]
        if len(shape) == 1:
            return torch.ones(shape)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.randn(shape, generator=gen) * 0.02

    shards, size = [[]], 0
    for name, (_, shape) in shapes.items():
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / file, {n: shapes[n] for n in names}, value_of)
        weight_map.update(dict.fromkeys(names, file))
    total = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for d, s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.architectures = [type(model).__name__]
    config.dtype = dtype
    config.save_pretrained(folder)
    return total
