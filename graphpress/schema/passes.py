"""Pass configurations: one pydantic model per pass, selected by its ``"pass"`` key.

The pass implementations in ``graphpress.passes`` refer to these classes as their
``Config``; the schema owns them so that a spec can be validated (and its JSON
Schema printed) without importing any pass.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, field_serializer, model_validator

from .base import StrictModel

Targets = Annotated[
    str | list[str],
    Field(
        description="Glob pattern(s) over module paths as they appear in nn_module_stack, "
        "e.g. 'layers.*.mlp.*'. A pattern also matches a path that ends with it at a dot, "
        "so 'layers.*.mlp.up_proj' selects 'model.layers.0.mlp.up_proj' too.",
    ),
]


class ParamRatio(StrictModel):
    """Per layer, keep this fraction of its parameters: rank = floor(ratio * in * out / (in + out))."""

    param_ratio: float = Field(gt=0.0, le=1.0)


class Energy(StrictModel):
    """Per layer, the smallest rank whose singular values hold this fraction of the squared spectrum."""

    energy: float = Field(gt=0.0, le=1.0)


class Budget(StrictModel):
    """One budget for all targeted layers together; give exactly one of the three."""

    param_ratio: float | None = Field(None, gt=0.0, le=1.0, description="Fraction of the targeted layers' parameters.")
    params: int | None = Field(None, gt=0, description="Parameters of the targeted layers after factoring.")
    bytes: int | None = Field(
        None, gt=0, description="Bytes of the targeted layers' weights and biases after factoring."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Budget:
        given = [k for k in ("param_ratio", "params", "bytes") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of param_ratio, params, bytes (got {', '.join(given) or 'none'})")
        return self


class GlobalBudget(StrictModel):
    """Ranks allocated across layers to minimise total (relative) error within one budget."""

    budget: Budget


def _rank_kind(value: Any) -> str | None:
    """The tag of a rank policy: 'fixed' for an int, else the dict's single key."""
    if isinstance(value, int) and not isinstance(value, bool):
        return "fixed"
    if isinstance(value, dict) and len(value) == 1:
        return next(iter(value))
    if isinstance(value, StrictModel):
        return next(iter(type(value).model_fields))
    return None


RankPolicy = Annotated[
    Annotated[int, Tag("fixed"), Field(ge=1)]
    | Annotated[ParamRatio, Tag("param_ratio")]
    | Annotated[Energy, Tag("energy")]
    | Annotated[GlobalBudget, Tag("budget")],
    Discriminator(
        _rank_kind,
        custom_error_type="rank_policy",
        custom_error_message="a rank policy is an int or one of {'param_ratio': r}, {'energy': e}, {'budget': {...}}",
    ),
]


class PassConfig(StrictModel):
    """Fields every pass accepts."""

    targets: Targets = "*"
    exclude: list[str] = Field(default_factory=list, description="Glob patterns removed from the selection.")


class LowRankConfig(PassConfig):
    """Factor a linear y = W x (W: out x in) into y = B (A x), A: rank x in, B: out x rank.

    A layer is left alone (and reported as skipped) when rank * (in + out) >= in * out,
    i.e. when factoring would not save parameters, unless ``only_if_smaller`` is false.
    """

    pass_: Literal["low_rank"] = Field(alias="pass")
    method: Literal["svd", "whitened_svd", "fisher_svd"] = Field(
        "svd",
        description="svd: minimise weight error ||W - W'||_F. whitened_svd (SVD-LLM/ASVD): minimise output error "
        "||X (W - W')^T||_F on the calibration inputs. fisher_svd (FWSVD): weight rows by their Fisher information.",
    )
    rank: RankPolicy = Field(
        description="A fixed rank (int); {'param_ratio': r} or {'energy': e} per layer; or "
        "{'budget': {'param_ratio' | 'params' | 'bytes': ...}} for all targeted layers together."
    )
    min_rank: int = Field(1, ge=1, description="Never factor below this rank.")
    rank_multiple: int = Field(
        1,
        ge=1,
        description="Round every rank down to a multiple of this (4 lets nm_sparsity's 2:4 take the second factor; "
        "8 or 16 suit tensor cores); a rank below it is raised to it.",
    )
    only_if_smaller: bool = Field(True, description="Skip layers where factoring would not save parameters.")
    svd: Literal["auto", "exact", "randomized"] = Field(
        "auto",
        description="randomized (Halko et al., seeded) is used by 'auto' when min(in, out) >= 1024 and "
        "rank + oversample <= min(in, out) / 2.",
    )
    oversample: int = Field(10, ge=0, le=4096, description="Extra columns of the randomized range finder.")
    power_iters: int = Field(
        2, ge=0, le=32, description="Power iterations of the randomized range finder (a few are enough: Halko et al.)."
    )
    damping: float = Field(
        1e-4,
        ge=0,
        description="whitened_svd: ridge added to X^T X, relative to its mean diagonal (keeps it invertible).",
    )


class RopeHandling(StrictModel):
    """How gqa_to_mla treats rotary position embeddings on the keys."""

    mode: Literal["after_up_projection", "decoupled"] = Field(
        "after_up_projection",
        description="after_up_projection: cache the latent before RoPE, rebuild K from it and rotate it (exact "
        "RoPE at any rank; no absorption). decoupled (TransMLA): rotate heads per frequency (RoRoPE) so a few "
        "dimensions carry the positions, keep those as a RoPE key shared by all heads, compress the rest "
        "without RoPE; enables the absorbed form.",
    )
    dims: int | None = Field(
        None,
        ge=2,
        description="decoupled: dimensions of the shared RoPE key (even; default: head_dim). All of "
        "num_kv_heads * head_dim keeps every position-carrying dimension (exact at full kv_rank).",
    )
    freqfold: int = Field(
        1,
        ge=1,
        description="decoupled: FreqFold (TransMLA v3): the per-frequency PCA across KV heads also spans this many "
        "neighbouring RoPE frequencies, treated as one, so rope.dims holds more of the key energy; each kept "
        "component turns at the frequency it weighs most (approximate unless the folded frequencies are equal). "
        "1: RoRoPE as published first (exact at full rope.dims).",
    )
    per_frequency: bool = Field(
        False,
        description="decoupled: keep at most one RoPE component per frequency, the strongest (TransMLA's choice), so "
        "with rope.dims = head_dim the RoPE key turns like one original head, frequency for frequency, as "
        "DeepSeek's MLA layout needs. Off: the strongest rope.dims/2 components wherever they are.",
    )


class GqaToMlaConfig(PassConfig):
    """Grouped-query attention -> multi-head latent attention (TransMLA).

    K and V are produced from one latent c = W_down x that is cached instead of them. The latent
    basis is the PCA of the calibration K/V activations (K and V balanced to equal norm first),
    so at full rank the conversion is exact and below it the cache keeps the most energy.
    """

    pass_: Literal["gqa_to_mla"] = Field(alias="pass")
    targets: Targets = Field("*", description="Glob pattern(s) over attention module paths, e.g. 'layers.*.self_attn'.")
    kv_rank: int | None = Field(
        None,
        ge=1,
        description="Numbers cached per token per layer for the latent (plus rope.dims in decoupled mode). "
        "Default: full rank (2 * num_kv_heads * head_dim, minus rope.dims when decoupled): exact, no saving.",
    )
    kv_ratio: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Instead of kv_rank, for any model: the fraction of each layer's K and V numbers per token that "
        "the cache keeps (latent + rope.dims); the latent rank is rounded down to an even number (4-bit codes "
        "pack in pairs). 0.5 halves the cache.",
    )
    rope: RopeHandling = Field(
        default_factory=RopeHandling,
        description="How RoPE survives the latent cache: {'mode': 'after_up_projection'} or "
        "{'mode': 'decoupled', 'dims': d} (see RopeHandling's fields in the JSON Schema).",
    )
    absorb: bool | None = Field(
        None,
        description="Absorbed form (decoupled mode only; its default): W_uk folded into the query projection, "
        "W_uv into the output projection, attention computed on the latent directly.",
    )
    balance_kv: bool = Field(True, description="Scale K to V's norm before the joint PCA, as TransMLA does.")

    @model_validator(mode="after")
    def _check(self) -> GqaToMlaConfig:
        if self.kv_rank is not None and self.kv_ratio is not None:
            raise ValueError("kv_rank and kv_ratio are alternatives; give one")
        if self.rope.mode == "after_up_projection":
            if self.absorb:
                raise ValueError("absorb needs rope.mode 'decoupled' (RoPE on the rebuilt K prevents absorbing W_uk)")
            if self.rope.dims is not None:
                raise ValueError("rope.dims applies to rope.mode 'decoupled' only")
            if self.rope.freqfold != 1 or self.rope.per_frequency:
                raise ValueError("rope.freqfold and rope.per_frequency apply to rope.mode 'decoupled' only")
        if self.rope.dims is not None and self.rope.dims % 2:
            raise ValueError(f"rope.dims must be even (RoPE rotates pairs of dimensions), got {self.rope.dims}")
        return self


class KvQuantSide(StrictModel):
    """How one kind of cache tensor is quantized."""

    bits: Literal[2, 4, 8] = Field(2, description="Bits per code; 8 // bits codes are packed per byte.")
    axis: Literal["channel", "token"] = Field(
        description="channel: each channel gets a scale per group of group_size tokens (KIVI's keys). "
        "token: each token gets a scale per group of group_size channels (KIVI's values)."
    )
    group_size: int = Field(32, ge=1, description="Tokens (axis 'channel') or channels (axis 'token') per scale.")
    symmetric: bool = Field(False, description="Symmetric codes (no zero point stored) instead of min/max.")
    rotate: Literal["none", "hadamard"] = Field(
        "none",
        description="hadamard (RotateKV-style): quantize x H instead of x, H the orthonormal Hadamard matrix of the "
        "channel count (a power of two), which spreads outlier channels over all of them; undone after "
        "dequantization.",
    )


class KvCacheQuantConfig(PassConfig):
    """Quantize the KV cache of a decode graph at its boundary (KIVI): packed codes + scales cross it.

    The newest tokens stay in full precision in a residual window of ``residual`` to
    ``residual + block - 1`` tokens (block: the key group size for per-channel keys, 1 for
    per-token); whole blocks leaving it are quantized and appended to the packed cache.
    """

    pass_: Literal["kv_cache_quant"] = Field(alias="pass")
    targets: Targets = Field("*", description="Glob pattern(s) over cache entry names, e.g. 'layers.*.key'.")
    key: KvQuantSide = Field(KvQuantSide(bits=2, axis="channel"), description="Keys (and MLA's RoPE key).")
    value: KvQuantSide = Field(KvQuantSide(bits=2, axis="token"), description="Values.")
    latent: KvQuantSide | None = Field(None, description="MLA latents (gqa_to_mla); default: the key settings.")
    residual: int = Field(
        32,
        ge=0,
        le=8192,
        description="Newest tokens kept in full precision (KIVI's residual length; KIVI uses 32-128). Nothing is "
        "quantized before residual + key group size tokens: the report says from which token the saving starts.",
    )
    scales: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="dynamic (KIVI): each group's scale (and zero point) computed from its tokens as they are "
        "quantized. static: onnxruntime's quantized GroupQueryAttention cache (kv_cache_bit_width): one fixed "
        "scale per channel of each KV head, absmax / (2^(bits-1) - 1) over the calibration data, symmetric, every "
        "token quantized as it enters (the step attends its own tokens quantized too); needs key and value "
        "axis 'channel', equal bits of 4 or 8, residual 0, no rotation. The onnxruntime-genai target lowers it "
        "into the op.",
    )

    @model_validator(mode="after")
    def _check(self) -> KvCacheQuantConfig:
        if self.scales == "static":
            sides = {"key": self.key, "value": self.value, **({"latent": self.latent} if self.latent else {})}
            for name, side in sides.items():
                if side.axis != "channel" or side.rotate != "none" or side.bits not in (4, 8):
                    raise ValueError(
                        f"scales 'static' is per channel, 4 or 8 bits, unrotated: {name} has axis {side.axis!r}, "
                        f"bits {side.bits}, rotate {side.rotate!r}"
                    )
                if "symmetric" in side.model_fields_set and not side.symmetric:
                    raise ValueError(f"scales 'static' is symmetric: {name}.symmetric false contradicts it")
                if "group_size" in side.model_fields_set:
                    raise ValueError(
                        f"scales 'static' has one scale per channel for all tokens: drop {name}.group_size"
                    )
            if self.key.bits != self.value.bits:
                raise ValueError(
                    f"scales 'static' has one bit width for the cache: key {self.key.bits}, value {self.value.bits}"
                )
            if self.residual:
                raise ValueError(f"scales 'static' quantizes every token: set residual to 0 (got {self.residual})")
        return self


class WeightClusteringConfig(PassConfig):
    """Palettize linear weights: each weight becomes a b-bit index into a k-means codebook of 2^bits values."""

    pass_: Literal["weight_clustering"] = Field(alias="pass")
    bits: int = Field(4, ge=1, le=8, description="Index bits: 2^bits centroids per codebook.")
    granularity: Literal["tensor", "channel", "group"] = Field(
        "group",
        description="One codebook per tensor, per output channel, or per group of group_size output channels.",
    )
    group_size: int = Field(64, ge=1, description="Output channels per codebook (granularity 'group').")
    weighting: Literal["none", "activation"] = Field(
        "none",
        description="activation: weight each value in k-means by its input channel's calibration energy E[x_j^2] "
        "(sensitivity-aware clustering in the spirit of eDKM / coremltools' sensitive k-means).",
    )
    iterations: int = Field(
        30,
        ge=1,
        le=1000,
        description="At most this many Lloyd iterations after k-means++ (seeded); stops when no code moves.",
    )
    error_feedback: bool = Field(
        False,
        description="Assign codes column by column and push each column's error onto the columns not yet assigned "
        "through the inverse Hessian of the calibration inputs (GPTQ's sweep, as GPTVQ does); codebooks from "
        "k-means as before. N:M values are assigned without it (a warning says so).",
    )
    damping: float = Field(
        0.01, gt=0, le=1, description="error_feedback: ridge added to the Hessian, relative to its mean diagonal."
    )


class WeightQuantConfig(PassConfig):
    """Integer weight-only quantization: b-bit codes with a scale (and zero point) per block of input columns.

    Stored in onnxruntime's MatMulNBits layout (graphpress::int_weight), so the ONNX backend's
    ort_contrib_ops lowering keeps the weights packed at run time.
    """

    pass_: Literal["weight_quant"] = Field(alias="pass")
    bits: Literal[2, 3, 4, 8] = Field(4, description="Bits per weight code (MatMulNBits runs 2, 4 and 8).")
    group_size: Literal[16, 32, 64, 128, 256, "channel"] = Field(
        128,
        description="Input columns per scale (the last block of a row is padded); 'channel': one scale per output "
        "channel over all its inputs (stored as one block of the next power of two).",
    )
    symmetric: bool = Field(
        False,
        description="Codes centred on 2^(bits-1), no zero points stored (the signed extreme of a block maps to "
        "the lowest code exactly). Off: min/max range with a zero point per block.",
    )
    method: Literal["rtn", "gptq"] = Field(
        "gptq",
        description="rtn: round every weight to the nearest code. gptq (Frantar et al. 2022): quantize column by "
        "column and push each column's error onto the columns not yet quantized through the inverse Hessian "
        "of the calibration inputs (H = X^T X + damping).",
    )
    clip: Literal["minmax", "mse"] = Field(
        "minmax",
        description="Block ranges: the min/max of each block, or the shrunk range (1.0 down to 0.8 of it) with the "
        "lowest squared error, weighted by the input channels' calibration energy where it reached them.",
    )
    awq: bool = Field(
        False,
        description="Activation-aware scaling (AWQ, Lin et al. 2023) before rounding: per input channel "
        "s = mean|x|^alpha, alpha searched on the calibration rows, W multiplied by s and 1/s folded into the op "
        "producing x (an RMSNorm weight, a previous linear's rows); inputs where it cannot fold are left unscaled.",
    )
    awq_grid: int = Field(20, ge=2, le=100, description="awq: alpha values tried, evenly spaced in [0, 1).")
    act_order: bool = Field(
        True,
        description="gptq: quantize columns in order of decreasing Hessian diagonal (largest inputs first); block "
        "scales are fixed from the unquantized weight first (static groups), so blocks stay contiguous columns and "
        "it costs nothing at run time. Off: columns left to right, each block's scales fitted when it is reached.",
    )
    damping: float = Field(
        0.01, gt=0, le=1, description="gptq: ridge added to the Hessian, relative to its mean diagonal."
    )
    lazy_block: int = Field(
        128, ge=1, le=4096, description="gptq: columns per lazy batch update (speed only; the result is the same)."
    )

    @property
    def block_size(self) -> int | None:
        return None if self.group_size == "channel" else self.group_size


class NmSparsityConfig(PassConfig):
    """N:M structured sparsity along the input dimension: at most n non-zeros in every m consecutive inputs."""

    pass_: Literal["nm_sparsity"] = Field(alias="pass")
    n: int = Field(2, ge=1, description="Weights kept per group.")
    m: Literal[4, 8, 16] = Field(4, description="Group size along the input dimension.")
    score: Literal["magnitude", "activation"] = Field(
        "magnitude",
        description="Which weights to keep: largest |W|, or largest |W| * ||X_j|| (Wanda) from calibration.",
    )
    permute: bool = Field(
        False,
        description="Search an input-channel order that keeps more score under the masks (NVIDIA ASP), folded into "
        "the producing linears; layers whose input is not produced by linears are left in order (a warning).",
    )
    permute_rounds: int = Field(
        8,
        ge=1,
        le=1000,
        description="permute: at most this many rounds of channel swaps (each scores every swap between two groups).",
    )
    update: bool = Field(
        False,
        description="Refit the kept weights of each row by least squares on the calibration inputs "
        "(min ||X w' - X w|| over the kept support; SparseGPT-flavoured, one shot).",
    )
    damping: float = Field(0.01, gt=0, description="update: ridge on X^T X, relative to its mean diagonal.")
    storage: Literal["compressed", "dense"] = Field(
        "compressed",
        description="compressed: kept values + packed positions (graphpress::nm_weight). dense: the masked weight "
        "with zeros, for runtimes that want that.",
    )

    @model_validator(mode="after")
    def _n_below_m(self) -> NmSparsityConfig:
        if self.n >= self.m:
            raise ValueError(f"n must be smaller than m (got {self.n}:{self.m})")
        return self


REDACTED = "<redacted>"
"""What a report shows for a secret (qkvo_lock's key)."""


class QkvoLockConfig(PassConfig):
    """MergeLock: random invertible matrices on the query-key and value-output pairs of every attention block.

    Outputs are unchanged (exactly, up to rounding); the weights no longer line up with any other
    fine-tune of the same base model, so averaging or task arithmetic with them fails.
    """

    pass_: Literal["qkvo_lock"] = Field(alias="pass")
    targets: Targets = Field("*", description="Glob pattern(s) over attention module paths, e.g. 'layers.*.self_attn'.")
    qk: bool = Field(True, description="Lock queries and keys: Q M and K M^-T per KV head (M commutes with RoPE).")
    vo: bool = Field(True, description="Lock values and outputs: N V per KV head, N^-1 folded into o_proj's columns.")
    max_condition: float = Field(
        4.0,
        ge=1.0,
        le=1e4,
        description="Bound on every lock matrix's condition number (singular values log-uniform in "
        "[c^-1/2, c^1/2]); small keeps fp16/bf16 inference accurate.",
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=2**63 - 1,
        description="The lock's key: the seed of the lock matrices. Keep it private: no report or artifact holds it "
        "(reports say '<redacted>'). Default: a fresh random key each run (the OS's entropy), so that run's locked "
        "weights cannot be reproduced; give a key to reproduce them.",
    )

    @field_serializer("seed")
    def _redact(self, seed: int | None):
        return None if seed is None else REDACTED

    @model_validator(mode="after")
    def _something_to_lock(self) -> QkvoLockConfig:
        if not (self.qk or self.vo):
            raise ValueError("qk and vo are both false: nothing to lock")
        return self


class ShiftAddConfig(PassConfig):
    """ShiftAddViT: power-of-two (shift) linear weights and, optionally, binarized query-key attention.

    ``targets`` selects linears (``linears: false`` leaves them alone); ``attention_targets``
    selects the attention blocks whose Q.K becomes an additive kernel when ``attention`` is on.
    """

    pass_: Literal["shift_add"] = Field(alias="pass")
    linears: bool = Field(True, description="Reparameterize the targeted linears as scale * sign * 2^p.")
    min_exponent: int = Field(
        -6,
        ge=-126,
        le=0,
        description="Smallest power 2^p kept (relative to the channel scale). Codes take "
        "ceil(log2(max - min + 2)) + 1 bits: 4 for the default [-6, 0], at most 8.",
    )
    max_exponent: int = Field(0, ge=-126, le=0, description="Largest power 2^p; a channel's largest weight maps to it.")
    attention: bool = Field(
        False,
        description="Binarize queries and keys (sign, times their mean magnitude per token and head) so that Q.K "
        "is an additive (Hamming-style) kernel. Lossy without fine-tuning: see the verification figures.",
    )
    attention_targets: Targets = Field("*", description="Glob pattern(s) over attention module paths.")

    @model_validator(mode="after")
    def _check(self) -> ShiftAddConfig:
        if self.min_exponent > self.max_exponent:
            raise ValueError(f"min_exponent {self.min_exponent} is above max_exponent {self.max_exponent}")
        if not (self.linears or self.attention):
            raise ValueError("linears and attention are both false: nothing to do")
        return self


class DistillDataConfig(StrictModel):
    """Distillation data of its own, cut like calibration's: usually many more windows than calibration needs."""

    text: str | None = Field(
        None,
        description="A UTF-8 text file (path relative to the working directory; .gz allowed; a .jsonl file's 'text' "
        "fields joined by blank lines), tokenized with the model's tokenizer.",
    )
    tokens: str | None = Field(
        None, description="Like `text`, but already token ids: a .npy, .pt or .json file of one 1-D integer sequence."
    )
    samples: int = Field(64, ge=1, le=1_000_000, description="Windows cut from the file at seeded offsets.")
    seq_len: int = Field(128, ge=1, le=131072, description="Tokens per window.")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Seed of the window offsets.")

    @model_validator(mode="after")
    def _one_source(self) -> DistillDataConfig:
        if (self.text is None) == (self.tokens is None):
            raise ValueError("give one of data.text and data.tokens")
        return self


class DistillConfig(PassConfig):
    """Knowledge distillation (Hinton et al. 2015) of the compressed graph from the original on the calibration
    data: KL divergence of the logits at a temperature, AdamW, a warm-up and cosine schedule.

    Only float tensors train, so every compressed format stays intact: codes, indices and
    positions (integer tensors) are fixed; codebooks, kept values, scales, factors train.
    """

    pass_: Literal["distill"] = Field(alias="pass")
    targets: Targets = Field("*", description="Glob pattern(s) over module paths whose tensors may train.")
    train: list[Literal["compressed", "norms", "dense"]] = Field(
        default_factory=lambda: ["compressed", "norms"],
        min_length=1,
        description="Which float tensors train: 'compressed' (those an earlier pass created or changed: low-rank "
        "factors, MLA projections, LUT codebooks, N:M kept values, shift and quantization scales), 'norms' (every "
        "1-D tensor: norm weights, biases), 'dense' (the rest: weights no pass touched, embeddings).",
    )
    steps: int = Field(100, ge=1, le=1_000_000, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, le=4096, description="Calibration samples per step (cycled, seeded order).")
    lr: float = Field(1e-4, gt=0, le=1.0, description="AdamW's peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=1.0, description="AdamW's decoupled weight decay.")
    warmup: int = Field(0, ge=0, description="Steps of linear warm-up before the schedule.")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="Learning rate after warm-up.")
    temperature: float = Field(1.0, gt=0, le=100.0, description="Softmax temperature of the KL (scaled by T^2).")
    min_kl: float = Field(
        1e-7,
        ge=0,
        description="Leave the graph as it is when its mean KL on the data is already below this (an exact rewrite: "
        "Adam would move weights by about lr even on rounding-noise gradients).",
    )
    seed: int = Field(0, ge=0, description="Seed of the sample order (same seed, same bytes).")
    hidden: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="Weight of a hidden-state loss added to the KL: the mean over decoder blocks of the squared "
        "error of each block's output, relative to the teacher's (||h_s - h_t||^2 / ||h_t||^2). 0: logits only.",
    )
    data: DistillDataConfig | None = Field(
        None,
        description="Train on windows of this file instead of the calibration data (which stays what the other "
        "passes calibrate on).",
    )


PASS_CONFIGS: dict[str, type[PassConfig]] = {
    "low_rank": LowRankConfig,
    "gqa_to_mla": GqaToMlaConfig,
    "kv_cache_quant": KvCacheQuantConfig,
    "weight_clustering": WeightClusteringConfig,
    "weight_quant": WeightQuantConfig,
    "nm_sparsity": NmSparsityConfig,
    "qkvo_lock": QkvoLockConfig,
    "shift_add": ShiftAddConfig,
    "distill": DistillConfig,
}

AnyPassConfig = Annotated[Union[tuple(PASS_CONFIGS.values())], Field(discriminator="pass_")]  # noqa: UP007
