"""The graphpress op set: each compressed format is a ``torch.library.custom_op`` under ``graphpress::``.

One file per op family: reference implementation (in plain aten arithmetic, so it is
also the op's decomposition), fake implementation, ONNX lowering, TVM Relax converter;
fused linears over the weight formats (``fused``) are what the CUDA backend's Triton
kernels implement. ``low_rank`` and ``gqa_to_mla`` need
none: a factored linear is two linears, and latent attention is linears and SDPA.
"""

import torch

from . import fused, gqa, int_weight, kv_quant, lut, nm_sparse, rms_norm, shift


def onnx_translations(opset: int = 18, accuracy_level: int = 0) -> dict:
    """custom op overload -> ONNX lowering, for ``torch.onnx.export(custom_translation_table=...)``.

    ``graphpress::int_linear`` (integer weights fused for onnxruntime, on request) lowers to
    ``com.microsoft::MatMulNBits`` (its ``accuracy_level``); every other op to standard ONNX of ``opset``.
    """

    def int_linear_onnx(x, codes, scales, zeros, bits: int, block_size: int, in_features: int, bias):
        return int_weight.int_linear_onnx(x, codes, scales, zeros, bits, block_size, in_features, bias, accuracy_level)

    def int_weight_onnx(codes, scales, zeros, bits: int, block_size: int, in_features: int):
        return int_weight.int_weight_onnx(codes, scales, zeros, bits, block_size, in_features, opset)

    return {
        torch.ops.graphpress.int_weight.default: int_weight_onnx,
        torch.ops.graphpress.int_linear.default: int_linear_onnx,
        **gqa.ONNX_TRANSLATIONS,
        **kv_quant.ONNX_TRANSLATIONS,
        **lut.ONNX_TRANSLATIONS,
        **nm_sparse.ONNX_TRANSLATIONS,
        **rms_norm.ONNX_TRANSLATIONS,
        **shift.ONNX_TRANSLATIONS,
    }


def relax_converters() -> dict:
    """``from_exported_program(custom_convert_map=...)`` keys (the overload's name) -> TVM Relax converter."""
    converters = {
        **int_weight.RELAX_CONVERTERS,
        **kv_quant.RELAX_CONVERTERS,
        **lut.RELAX_CONVERTERS,
        **nm_sparse.RELAX_CONVERTERS,
        **shift.RELAX_CONVERTERS,
    }
    return {overload.__name__: convert for overload, convert in converters.items()}


def packed_rows() -> dict:
    """weight-format op -> its TIR form (:class:`.bitstream.PackedRows` from the op's stored tensors and
    arguments), for the TVM backend's fused kernels: the formats whose codes a kernel decodes in registers."""
    return {**int_weight.PACKED_ROWS, **lut.PACKED_ROWS, **nm_sparse.PACKED_ROWS, **shift.PACKED_ROWS}


def decompositions() -> dict:
    """custom op overload -> its reference, for ``ExportedProgram.run_decompositions`` (backends
    without graphpress ops, e.g. torch-mlir, see the compressed formats' rebuild as aten ops)."""
    return {
        **fused.DECOMPOSITIONS,
        **gqa.DECOMPOSITIONS,
        **int_weight.DECOMPOSITIONS,
        **kv_quant.DECOMPOSITIONS,
        **lut.DECOMPOSITIONS,
        **nm_sparse.DECOMPOSITIONS,
        **rms_norm.DECOMPOSITIONS,
        **shift.DECOMPOSITIONS,
    }
