"""The graphpress op set: each compressed format is a ``torch.library.custom_op`` under ``graphpress::``.

One file per op family (reference implementation, fake implementation, ONNX lowering;
TVM and Triton forms arrive with those backends). ``low_rank`` and ``gqa_to_mla`` need
none: a factored linear is two linears, and latent attention is linears and SDPA.
"""

from . import kv_quant, lut, nm_sparse


def onnx_translations() -> dict:
    """custom op overload -> ONNX lowering, for ``torch.onnx.export(custom_translation_table=...)``."""
    return {**kv_quant.ONNX_TRANSLATIONS, **lut.ONNX_TRANSLATIONS, **nm_sparse.ONNX_TRANSLATIONS}
