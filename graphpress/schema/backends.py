"""Backend configurations, selected by their ``"target"`` key."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field, ValidationInfo, field_validator

from .base import StrictModel


class BackendConfig(StrictModel):
    """What every backend config has: the file it writes, checked unique across a spec."""

    output_field: ClassVar[str] = "filename"
    """The field that names what the backend writes (for errors)."""

    @property
    def output_file(self) -> str:
        return getattr(self, self.output_field)


class OnnxBackendConfig(BackendConfig):
    """Export with torch.onnx (dynamo) and validate in onnxruntime on the calibration inputs."""

    target: Literal["onnx"]
    opset: int = Field(18, ge=18, le=23, description="ONNX opset of the default domain.")
    external_data: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Store weights beside the .onnx file (model.onnx.data). 'auto' does so above 64 MiB of stored "
        "tensors: onnxruntime maps external weights but holds an inline file's twice as it loads (measured on a "
        "155M-parameter Llama: 864 MB resident inline, 482 MB external). Above 2 GB (protobuf's limit) it must.",
    )
    max_error: float = Field(
        1e-4, gt=0, description="Largest rel_l2 between onnxruntime and eager outputs before the backend fails."
    )
    filename: str = Field(
        "model.onnx", pattern=r"^[\w.-]+\.onnx$", description="Name of the ONNX file in the output directory."
    )

    ort_contrib_ops: bool = Field(
        False,
        description="Lower to onnxruntime's contrib ops where one runs a compressed format natively: integer "
        "weights (weight_quant, 2/4/8 bits) become com.microsoft::MatMulNBits, which keeps them packed in memory. "
        "Off: standard ONNX only (any runtime; the weights are dequantized by ordinary ops).",
    )
    matmul_accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        0,
        description="MatMulNBits' accuracy_level (integer weights with ort_contrib_ops or the onnxruntime-genai "
        "runtime): 0 multiplies in the activations' float type (the eager graph's result); 4 quantizes the "
        "activations to int8 per block and multiplies in integers, which onnxruntime-genai's builder uses for int4 "
        "on CPU: faster, less exact (validation still holds the output to max_error).",
    )
    runtime: Literal["onnxruntime", "onnxruntime-genai"] = Field(
        "onnxruntime",
        description="'onnxruntime-genai' lowers attention to com.microsoft::GroupQueryAttention (and integer "
        "weights to MatMulNBits) and also writes genai_config.json (and the checkpoint's tokenizer files) beside "
        "the file, so onnxruntime_genai.Model(out_dir) runs it with a Generator; it needs a decode graph whose step "
        "takes a prompt in one call and whose cache is a key and a value per layer, in floats or as kv_cache_quant's "
        "static-scale codes (the op's quantized cache), or gqa_to_mla's absorbed latent (one KV head of [latent, RoPE key]; KIVI's dynamic layouts are refused). Validated by greedy generation through onnxruntime-genai "
        "where it is installed (pip install 'graphpress[genai]').",
    )
    validation_piece_mb: float | None = Field(
        None,
        gt=0,
        description="Validate the file in onnxruntime piece by piece: its nodes cut, in order, into pieces reading "
        "at most this many MiB of weights each (a larger single weight is a piece of its own), run one session at a "
        "time, so the check never holds the whole model. Unset: 256 for a streamed run (execution.stream: its "
        "model may not fit in memory), one session of the whole file otherwise. Forward graphs only (a decode "
        "graph is checked step by step in one session).",
    )
    node_metadata: bool = Field(
        False,
        description="Keep the exporter's per-node metadata (source stack traces, module paths; about 1.4 KB a node) "
        "for debugging. Off: the file holds the model only.",
    )


class TvmTuneConfig(StrictModel):
    """MetaSchedule tuning of the TVM library's kernels on this machine, for the shapes a user runs."""

    trials: int = Field(
        256,
        ge=1,
        description="Candidate schedules measured, in all (every kernel of every shape). The example LM's 256-token "
        "prompt: 256 trials took 130 s on 2 cores. Kernels the database already holds are not tuned again.",
    )
    batch: int = Field(1, ge=1, description="Batch size the tuned copies of the model are specialised for.")
    lengths: list[Annotated[int, Field(ge=1)]] | None = Field(
        None,
        min_length=1,
        description="Tokens per call the tuned copies are specialised for (a copy of the model per length; a call "
        "of another shape runs the untuned dynamic model): prompt lengths for a forward graph (default: the first "
        "calibration input's), tokens per step for a decode graph (default: 1, a generated token).",
    )
    database: str | None = Field(
        None,
        pattern=r"^[\w.-]+$",
        description="Folder in the output directory for the tuning records (MetaSchedule's JSON database); "
        "default <filename's stem>.tuning. A rebuild into the same output directory reuses its records: a "
        "kernel tuned once is not tuned again, and the library gets the same schedules.",
    )
    strategy: Literal["evolutionary", "replay-trace"] = Field(
        "evolutionary",
        description="MetaSchedule's search: 'evolutionary' (an XGBoost cost model picks the candidates to measure) "
        "or 'replay-trace' (random candidates; cheaper per trial, for small budgets).",
    )

    @field_validator("lengths")
    @classmethod
    def _distinct(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"lengths repeat: {value}")
        return value


class TvmBackendConfig(BackendConfig):
    """Import into TVM Relax, compile, and validate in the Relax VM; writes a loadable library."""

    target: Literal["tvm"]
    device: Literal["llvm"] = Field("llvm", description="Compilation target (CPU via LLVM).")
    cpu: str = Field(
        "host",
        pattern=r"^[\w.-]+$",
        description="CPU the kernels are compiled for: 'host' (this machine's, e.g. znver4, with every vector "
        "extension it has; the library may stop with an illegal instruction on an older CPU), 'generic' (the "
        "architecture's baseline: runs on any CPU of it, 4-lane vectors on x86-64), or an LLVM CPU name "
        "('x86-64-v3', 'skylake-avx512', 'neoverse-n1').",
    )
    max_error: float = Field(
        1e-4, gt=0, description="Largest rel_l2 between the TVM module and eager outputs before the backend fails."
    )
    filename: str = Field(
        "model.so", pattern=r"^[\w.-]+\.so$", description="Name of the compiled library in the output directory."
    )
    blas: Literal["auto", "openblas", "none"] = Field(
        "auto",
        description="Float32 matmuls as OpenBLAS GEMM calls compiled into the library (scipy-openblas32, copied "
        "beside it): 'openblas' requires it, 'auto' uses it when installed, 'none' keeps TVM's own loops.",
    )
    tune: TvmTuneConfig | None = Field(
        None,
        description="Tune the kernels with MetaSchedule (measured here: cpu must be 'host'). The library gets a "
        "copy of the model per (batch, length) with static shapes, its kernels scheduled as measured, and calls it "
        "for inputs of that shape; hand-written kernels and BLAS calls are kept. Unset: TVM's default schedules.",
    )

    @field_validator("tune")
    @classmethod
    def _tuned_here(cls, value: TvmTuneConfig | None, info: ValidationInfo) -> TvmTuneConfig | None:
        if value is not None and info.data.get("cpu", "host") != "host":
            raise ValueError(f"tuning measures kernels on this machine's CPU; cpu is {info.data['cpu']!r}, not 'host'")
        return value


class MlirBackendConfig(BackendConfig):
    """Lower with torch-mlir to one MLIR dialect (graphpress ops decomposed to aten first) and write its text."""

    target: Literal["mlir"]
    dialect: Literal["torch", "linalg-on-tensors", "stablehlo", "tosa"] = Field(
        "linalg-on-tensors", description="torch-mlir output type."
    )
    static_shapes: bool | None = Field(
        None,
        description="Specialise the module to the first calibration input's shapes (decode graphs: one step after "
        "a few cached tokens). Default: only for tosa, which accepts static shapes only.",
    )
    max_error: float = Field(
        1e-4, gt=0, description="Largest rel_l2 between the decomposed program and the graph before the backend fails."
    )
    filename: str | None = Field(
        None, pattern=r"^[\w.-]+\.mlir$", description="Output file; default model.<dialect>.mlir."
    )

    @field_validator("static_shapes")
    @classmethod
    def _tosa_is_static(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        if value is False and info.data.get("dialect") == "tosa":
            raise ValueError("tosa takes static shapes only; leave static_shapes unset or true")
        return value

    @property
    def static(self) -> bool:
        return self.dialect == "tosa" if self.static_shapes is None else self.static_shapes

    @property
    def output_file(self) -> str:
        return self.filename or f"model.{self.dialect}.mlir"


class CudaBackendConfig(BackendConfig):
    """Fuse compressed linears into Triton-kernel ops and save the program (torch.export) for NVIDIA GPUs."""

    target: Literal["cuda"]
    max_error: float = Field(
        1e-4, gt=0, description="Largest rel_l2 between the fused program (CPU, and GPU where present) and the graph."
    )
    filename: str = Field(
        "model.pt2",
        pattern=r"^[\w.-]+\.pt2$",
        description="Name of the saved torch.export program in the output directory.",
    )


class HfBackendConfig(BackendConfig):
    """Write a Hugging Face transformers checkpoint of the compressed model, loaded back and validated."""

    output_field: ClassVar[str] = "folder"

    target: Literal["hf"]
    folder: str = Field(
        "hf", pattern=r"^[\w.-]+$", description="Folder in the output directory that holds the checkpoint."
    )
    max_error: float = Field(
        1e-4,
        gt=0,
        description="Largest rel_l2 between the logits of the checkpoint, loaded by transformers, and the graph's.",
    )
    dense: bool = Field(
        False,
        description="Rebuild weights stored in a compressed format (LUT, N:M, shift, integer codes) into the dense "
        "weights they stand for, so transformers holds them as its own: the file is as large as the original's, "
        "the values are the compressed ones (to evaluate, fine-tune or serve them elsewhere). Off: such weights are "
        "refused by name.",
    )
    layout: Literal["auto", "same", "deepseek_v3"] = Field(
        "auto",
        description="'same': the model's own class and config. 'deepseek_v3': DeepSeek's MLA layout "
        "(DeepseekV3ForCausalLM: kv_a_proj_with_mqa, kv_b_proj, ...) for a gqa_to_mla conversion (decoupled RoPE, "
        "rope.per_frequency, rope.dims = a head's rotary dims, every layer). 'auto': deepseek_v3 when the graph holds "
        "gqa_to_mla's latent projections, else same.",
    )


BACKEND_CONFIGS = {
    "onnx": OnnxBackendConfig,
    "tvm": TvmBackendConfig,
    "mlir": MlirBackendConfig,
    "cuda": CudaBackendConfig,
    "hf": HfBackendConfig,
}

AnyBackendConfig = Annotated[Union[tuple(BACKEND_CONFIGS.values())], Field(discriminator="target")]  # noqa: UP007
