"""RMS normalization as one op, for runtimes that fuse it: onnxruntime's ``SimplifiedLayerNormalization``.

    graphpress::rms_norm(x, weight, eps) = weight * (x / sqrt(mean(x^2, -1) + eps))

computed in float32 and cast back to x's dtype before the weight multiplies, as transformers'
``LlamaRMSNorm`` does (Zhang & Sennrich 2019, eq. 4). onnxruntime runs it as one kernel (and folds
a residual add in front into ``SkipSimplifiedLayerNormalization``); as standard ops an RMSNorm is
six nodes per norm, two norms a layer.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    h = x.float()
    normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed


rms_norm = torch.library.custom_op("graphpress::rms_norm", rms_norm_reference, mutates_args=())


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))


def rms_norm_onnx(x, weight, eps: float):
    """``SimplifiedLayerNormalization`` (onnxruntime registers it in the default domain), statistics in float32."""
    from .contrib import ort_op

    return ort_op("SimplifiedLayerNormalization", domain="", outputs=1)(x, weight, axis=-1, epsilon=eps, stash_type=1)


ONNX_TRANSLATIONS = {torch.ops.graphpress.rms_norm.default: rms_norm_onnx}
DECOMPOSITIONS = {torch.ops.graphpress.rms_norm.default: rms_norm_reference}
