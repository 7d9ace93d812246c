"""The spec: what to capture, how to calibrate, which passes, how to verify, which backends."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .backends import AnyBackendConfig, OnnxBackendConfig
from .base import StrictModel
from .passes import AnyPassConfig


class CaptureConfig(StrictModel):
    mode: Literal["forward", "decode"] = Field(
        "forward",
        description="'forward' captures the model's forward as called with the example inputs. 'decode' captures "
        "one step of a causal LM over S new tokens, the KV cache an explicit graph input and output "
        "(step(input_ids (B, S), attention_mask (B, past + S), position_ids (B, S), cache) -> (logits, cache)): "
        "one graph for the prompt and for every generated token.",
    )
    dynamic: bool = Field(True, description="Keep every input dimension symbolic (batch, sequence, ...).")
    step_tokens: Literal["any", 1] = Field(
        "any",
        description="Decode mode: how many new tokens one step takes. 'any' (prompt in one call) where the "
        "model's attention allows it; attention that branches on the query length under torch.export "
        "(transformers' eager kernels) falls back to 1, and the report says so. 1 asks for a one-token step: "
        "the form the CUDA backend's decode-attention kernels fuse.",
    )
    dtype: Literal["model", "float32", "float16", "bfloat16"] = Field(
        "model",
        description="The dtype of the captured graph and of what the passes store. 'model' keeps the model's own "
        "(a bf16 checkpoint stays bf16; passes compute in float32/float64 either way). onnxruntime's CPU provider has "
        "no bfloat16 kernels: give 'float32' for a bf16 model whose ONNX file should run there. Another dtype "
        "captures a converted copy; the user's model is never changed.",
    )


class ExecutionConfig(StrictModel):
    stream: bool | Literal["auto"] = Field(
        "auto",
        description="Stream the weights of a checkpoint folder instead of loading the model: capture reads no "
        "weight, calibration runs all samples through the graph one op at a time (each weight read once, then "
        "dropped), low_rank and weight_clustering compress one layer's input at a time, and what the passes produce "
        "is written to disk as it is made, so memory holds about one layer's weights and statistics. The result is "
        "byte for byte the in-memory one. 'auto' streams a checkpoint folder whose weights exceed a quarter of the "
        "memory available; true requires a checkpoint folder (safetensors saved by save_pretrained) and forward "
        "capture.",
    )
    engine: Literal["local", "ray"] = Field(
        "local",
        description="Where per-layer jobs run (low_rank's factorizations, weight_clustering's k-means, weight_quant's "
        "GPTQ, nm_sparsity's masks): 'local' in this process; 'ray' as Ray tasks (pip install 'graphpress[ray]'), their tensors passed through Ray's object "
        "store, while this process goes on calibrating the next layer. The result is byte for byte the local one.",
    )
    address: str = Field(
        "local",
        description="engine 'ray': 'local' starts a Ray runtime on this machine for the run (stopped after it); "
        "'auto' joins the cluster this machine is part of; 'ray://HOST:10001' connects a Ray client to a remote "
        "cluster (its workers need graphpress installed). A runtime already started in this process is used as is.",
    )
    num_cpus: int | None = Field(
        None, ge=1, le=4096, description="engine 'ray', address 'local': CPUs the local runtime gets (default: all)."
    )


class CalibrationConfig(StrictModel):
    samples: int = Field(8, ge=1, le=4096, description="Number of calibration batches.")
    seq_len: int = Field(
        128, ge=1, le=131072, description="Sequence length of each batch (model directories that generate data)."
    )
    seed: int = Field(
        0, ge=0, le=2**63 - 1, description="Seed for choosing calibration data and for every randomised pass."
    )
    text: str | None = Field(
        None,
        description="A UTF-8 text file (path relative to the working directory) to calibrate on: tokenized with the "
        "model's tokenizer (a checkpoint's own, or a model directory's tokenize()), cut into `samples` windows of "
        "`seq_len` tokens at seeded offsets.",
    )
    tokens: str | None = Field(
        None,
        description="Like `text`, but already token ids: a .npy, .pt or .json file holding one 1-D integer sequence. "
        "For models without a tokenizer.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> CalibrationConfig:
        if self.text is not None and self.tokens is not None:
            raise ValueError("calibration.text and calibration.tokens are alternatives; give one")
        return self


class VerifyConfig(StrictModel):
    metric: Literal["rel_l2", "max_abs", "cosine_distance"] = "rel_l2"
    max: float = Field(0.05, ge=0, description="Largest allowed error of the graph after each pass vs the original.")
    on_fail: Literal["error", "warn"] = "error"
    data: Literal["held_out", "calibration"] = Field(
        "held_out",
        description="What each pass is verified on. 'held_out': inputs the passes were not fitted to (windows of "
        "the calibration text that share no token with the calibration windows; other windows of a model "
        "directory's data; the last calibration batches given, then not calibrated on; or random inputs shaped "
        "like the example inputs when there is no data); the report says which. 'calibration': the calibration "
        "data itself (a fitted pass looks better there than on new inputs).",
    )
    samples: int = Field(2, ge=1, le=256, description="held_out: how many verification batches.")


class PerplexityConfig(StrictModel):
    """Held-out perplexity: exp(mean next-token NLL) over non-overlapping windows, each scored on its own."""

    text: str | None = Field(
        None,
        description="A UTF-8 text file to score (path relative to the working directory; .gz allowed; a .jsonl "
        "file's 'text' fields joined by blank lines), tokenized with the model's tokenizer (a checkpoint's own, or "
        "a model directory's tokenize()). Give text the model was not calibrated on.",
    )
    tokens: str | None = Field(
        None, description="Like `text`, but already token ids: a .npy, .pt or .json file of one 1-D integer sequence."
    )
    seq_len: int = Field(256, ge=2, le=131072, description="Tokens per window.")
    max_tokens: int | None = Field(
        65536, ge=2, description="Score only the first max_tokens tokens (null: all of them)."
    )
    batch_size: int = Field(8, ge=1, le=4096, description="Windows per call.")

    @model_validator(mode="after")
    def _one_source(self) -> PerplexityConfig:
        if (self.text is None) == (self.tokens is None):
            raise ValueError("give one of text (a text file) or tokens (a file of token ids)")
        return self


class LmEvalConfig(StrictModel):
    """lm-evaluation-harness tasks (the optional ``lm-eval`` package) on local data, loglikelihood-scored."""

    tasks: list[str] = Field(
        min_length=1,
        description="Task names defined by YAML files under include_path, or paths to task YAML files. Their data must "
        "be local (e.g. dataset_path: json with data_files): nothing is downloaded. Loglikelihood tasks only "
        "(multiple_choice, loglikelihood, loglikelihood_rolling).",
    )
    include_path: str | None = Field(None, description="A directory of task YAML files (lm-eval's --include_path).")
    limit: int | None = Field(None, ge=1, description="Score at most this many documents per task.")
    num_fewshot: int | None = Field(None, ge=0, le=64, description="Few-shot examples per prompt (the task's default).")
    max_length: int = Field(
        2048, ge=2, le=131072, description="Context tokens at most; a longer request keeps its last max_length tokens."
    )


class EvaluateConfig(StrictModel):
    """A task metric at the end of the run, on the original, the compressed graph and every artifact."""

    perplexity: PerplexityConfig | None = Field(
        None, description="Held-out perplexity of a causal LM (logits over a vocabulary)."
    )
    lm_eval: LmEvalConfig | None = Field(
        None, description="lm-evaluation-harness tasks on local data (needs: pip install 'graphpress[eval]')."
    )
    decode: Literal["token_by_token", "prompt"] = Field(
        "token_by_token",
        description="Decode graphs (the compressed eager step and its artifacts): 'token_by_token' feeds each "
        "sequence one token per step from an empty cache, as generation reads it (a quantized cache is read back "
        "at every step); 'prompt' scores each sequence in one call where the step takes a prompt.",
    )
    artifacts: bool = Field(
        True,
        description="Also score each backend's artifact in its runtime (onnxruntime, TVM, ...), as its validation "
        "runs it; false: the original and the compressed graph in eager PyTorch only.",
    )

    @model_validator(mode="after")
    def _something(self) -> EvaluateConfig:
        if self.perplexity is None and self.lm_eval is None:
            raise ValueError("give perplexity, lm_eval or both")
        return self


class Spec(StrictModel):
    version: Literal[1] = 1

    @field_validator("version", mode="before")
    @classmethod
    def _not_a_bool(cls, value):
        if isinstance(value, bool):  # True == 1 in Python; in a spec it is a mistake
            raise ValueError(f"Input should be 1, got {str(value).lower()}")
        return value

    description: str | None = Field(
        None, description="What the spec is for, in a sentence or two (shown by `graphpress presets` and the report)."
    )
    capture: CaptureConfig = CaptureConfig()
    execution: ExecutionConfig = ExecutionConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    passes: list[AnyPassConfig] = Field(default_factory=list)
    verify: VerifyConfig = VerifyConfig()
    backends: list[AnyBackendConfig] = Field(default_factory=lambda: [OnnxBackendConfig(target="onnx")])
    evaluate: EvaluateConfig | None = Field(
        None, description="Score the original, the compressed graph and each artifact on a task (see EvaluateConfig)."
    )

    @model_validator(mode="after")
    def _distinct_artifacts(self) -> Spec:
        writers: dict[str, int] = {}
        for i, backend in enumerate(self.backends):
            name = backend.output_file
            if name in writers:
                raise ValueError(
                    f"backends[{i}].{backend.output_field}: {name!r} is also written by backends[{writers[name]}]; "
                    "give one another name"
                )
            writers[name] = i
        return self
