"""Drive decode graphs: greedy generation and teacher-forced scoring, in eager torch or onnxruntime.

A *decoder* is anything with ``layout`` (a :class:`~graphpress.ir.decode.CacheLayout`) and
``step(input_ids, attention_mask, position_ids, cache) -> (logits, cache)`` on torch tensors.
One step graph serves the prompt (one call: :func:`prefill`) and every generated token; a
graph captured on one token (``layout.step_tokens == 1``) takes its prompt token by token.
A batch of prompts of unequal length is left-padded, with ``attention_mask`` 0 on the pads
and positions counted from each row's first real token, as transformers' ``generate`` does.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .fileio import verify_published
from .ir import Graph
from .ir.decode import CacheLayout

LAYOUT_KEY = "graphpress.cache_layout"


class Decoder(Protocol):
    layout: CacheLayout

    def step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: list[torch.Tensor],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]: ...


def session_options(threads: int | None = None):
    """onnxruntime session options graphpress runs its files with: a blocked ``DequantizeLinear`` → ``MatMul``
    that onnxruntime fuses into ``MatMulNBits`` computes in fp32 (accuracy level 0), as the file says; by
    default onnxruntime quantizes the activations to int8 there (level 4), faster and about 0.4% off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


class TorchDecoder:
    """A decode Graph run eagerly; with ``taps``, through the FX interpreter so taps see each node."""

    def __init__(self, graph: Graph, taps: dict[str, Callable[[Any], None]] | None = None):
        if graph.cache is None:
            raise ValueError("TorchDecoder needs a decode graph (captured with mode='decode')")
        self.graph, self.layout, self.taps = graph, graph.cache, taps

    @torch.no_grad()
    def step(self, input_ids, attention_mask, position_ids, cache):
        inputs = (input_ids, attention_mask, position_ids, list(cache))
        if self.taps is not None:
            flat = self.graph.run_with_taps(inputs, self.taps)
            return flat[0], list(flat[1:])
        logits, present = self.graph.module()(*inputs)
        return logits, list(present)


class OnnxDecoder:
    """An ONNX decode graph written by graphpress (its cache layout is in the file's metadata)."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None):
        import onnx
        import onnxruntime as ort

        verify_published(path)
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if LAYOUT_KEY not in meta:
            raise ValueError(f"{path}: not a graphpress decode graph (no {LAYOUT_KEY!r} metadata)")
        self.layout = CacheLayout.from_json(meta[LAYOUT_KEY])
        self.session = ort.InferenceSession(
            str(path), session_options(threads), providers=providers or ["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def step(self, input_ids, attention_mask, position_ids, cache):
        tensors = [input_ids, attention_mask, position_ids, *cache]
        feeds = dict(zip(self.input_names, map(_numpy, tensors)))
        outs = self.session.run(self.output_names, feeds)
        return torch.from_numpy(outs[0]), [torch.from_numpy(o) for o in outs[1:]]


def blas_library(soname: str) -> ctypes.CDLL:
    """The OpenBLAS the loaded TVM libraries call: opened by its soname, which finds the copy already loaded
    (a path would load a second copy when the first came from another folder)."""
    return ctypes.CDLL(soname, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)


STEP_BLAS_THREADS = 1
"""OpenBLAS threads for a decoding step of a library whose sidecar asks for one (``step_blas_threads``: the
backend's choice, from the size of the weights BLAS multiplies). Its products are a row or a few: on the example
LM (2 cores) a step @ 2048 took 2.00 ms on one thread, 2.76 on two (attention's small batched GEMMs), while a
hidden-1024, 8-layer Llama's (350 MB of weights to stream) took 58.3 ms on one and 31.7 on two."""

STEP_TOKENS = 8
"""Most tokens in a call that :class:`TvmDecoder` runs as a step."""


def unpinned_tvm_threads() -> None:
    """TVM's thread pool left unpinned (``TVM_BIND_THREADS=0``) unless the environment says otherwise; read when
    the pool starts (the first parallel kernel in the process). Pinned, its workers wait for the cores that other
    thread pools in the process (OpenBLAS, onnxruntime, torch) also run on: the example LM's tuned 256-token prompt,
    timed beside onnxruntime in one process on 2 cores, took 17.9 ms pinned and 14.5 ms unpinned (alone, 14.5)."""
    os.environ.setdefault("TVM_BIND_THREADS", "0")


VECTOR_FEATURES = ("sse", "avx", "fma", "f16c", "amx", "neon", "sve", "sme")
"""LLVM feature prefixes of instruction sets (LLVM's feature lists also hold per-model tuning flags)."""


def missing_vector_features(cpu: str | None) -> list[str]:
    """The vector instruction sets the LLVM CPU ``cpu`` has and this machine's lacks (none for 'generic')."""
    if cpu in (None, "generic"):
        return []
    import tvm
    from tvm.target import codegen

    def features(name: str) -> set[str]:
        found = codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": name}))
        return {f for f in found if f.startswith(VECTOR_FEATURES)}

    return sorted(features(cpu) - features(codegen.llvm_get_system_cpu()))


class TvmModule:
    """A library written by graphpress' TVM backend, called with and returning torch tensors (CPU)."""

    def __init__(self, path: str | Path, blas_threads: int | None = None):
        """``blas_threads``: OpenBLAS threads for a library whose matmuls call the BLAS beside it (None: its
        default, ``OPENBLAS_NUM_THREADS`` or every core). The count is OpenBLAS's, for the whole process, so
        each call sets the one it runs with."""
        import tvm
        from tvm import relax

        unpinned_tvm_threads()
        self.path = Path(path)
        verify_published(self.path)
        verify_published(f"{path}.json")
        self.meta = json.loads(Path(f"{path}.json").read_text())
        missing = missing_vector_features(self.meta.get("cpu"))
        if missing:
            warnings.warn(
                f"{path} was compiled for {self.meta['cpu']}, and this CPU lacks {', '.join(missing)}: its kernels may "
                "stop with an illegal instruction (rebuild with the tvm backend's cpu: 'host' here, or 'generic')",
                stacklevel=2,
            )
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
        self.main = self.vm["main"]
        # copies of main tuned at a (batch, tokens) of the first input (the backend's tune field)
        self.specialised = {key: self.vm[name] for key, name in self.meta.get("specialised", {}).items()}
        blas = self.meta.get("blas")  # the backend's record of the BLAS beside the library, if it calls one
        self._set_blas_threads, self.blas_threads = None, None
        if blas is not None:
            library = blas_library(blas["library"])
            self._set_blas_threads = getattr(library, f"{blas['prefix']}openblas_set_num_threads")
            default = getattr(library, f"{blas['prefix']}openblas_get_num_threads")()
            self.blas_threads = int(blas_threads) if blas_threads is not None else default
        self._tvm = tvm

    def __call__(self, *tensors: torch.Tensor, blas_threads: int | None = None) -> list[torch.Tensor]:
        """Tensors in and out through DLPack: a decode step's cache is not copied on either side.
        ``blas_threads``: this call's OpenBLAS threads (None: the module's)."""
        if self._set_blas_threads is not None:
            self._set_blas_threads(blas_threads or self.blas_threads)
        main = self.main
        if self.specialised and tensors and tensors[0].dim() >= 2:
            main = self.specialised.get(f"{tensors[0].shape[0]}x{tensors[0].shape[1]}", main)
        out = main(*map(self._tensor, tensors))
        leaves = [out] if hasattr(out, "numpy") else list(out)
        return [torch.from_dlpack(leaf) for leaf in leaves]

    def _tensor(self, t: torch.Tensor):
        """Shared with torch where TVM takes it as it is (compact strides, which an empty tensor lacks; data
        aligned to 64 bytes, which a view may not be), copied otherwise."""
        t = t.detach().cpu().contiguous()
        compact = [math.prod(t.shape[i + 1 :]) for i in range(t.dim())]
        if t.numel() and list(t.stride()) == compact and t.data_ptr() % 64 == 0:
            return self._tvm.runtime.from_dlpack(t)
        return self._tvm.runtime.tensor(t.numpy())


class TvmDecoder:
    """A TVM decode-step library written by graphpress (its cache layout is in the sidecar JSON)."""

    def __init__(self, path: str | Path, blas_threads: int | None = None):
        self.module = TvmModule(path, blas_threads)
        if self.module.meta.get("cache_layout") is None:
            raise ValueError(f"{path}: not a graphpress decode graph (no cache layout in {path}.json)")
        self.layout = CacheLayout.from_json(self.module.meta["cache_layout"])

    def step(self, input_ids, attention_mask, position_ids, cache):
        """A prompt runs OpenBLAS on the module's threads, a step of a few tokens on the sidecar's
        ``step_blas_threads`` (null: the module's too)."""
        threads = self.module.meta.get("step_blas_threads") if input_ids.numel() <= STEP_TOKENS else None
        logits, *present = self.module(input_ids, attention_mask, position_ids, *cache, blas_threads=threads)
        return logits, present


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def positions(batch: int, position: int) -> torch.Tensor:
    """Position ids (batch, 1) of one decode step at ``position``."""
    return torch.full((batch, 1), position, dtype=torch.long)


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of every slot of ``attention_mask`` (B, T): counted from each row's first
    real token; pads get 1 (they are masked, any position does)."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


@torch.no_grad()
def prefill(
    decoder: Decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits (B, L, V) of the prompt ``input_ids`` (B, L) and the cache after it: one call,
    or one per token where the step graph takes one token."""
    batch = input_ids.shape[0]
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    pos = positions_of(mask)
    if decoder.layout.step_tokens is None:
        return decoder.step(input_ids, mask, pos, decoder.layout.empty(batch))
    return _token_by_token(decoder, input_ids, mask, pos)


def _token_by_token(decoder: Decoder, input_ids, mask, pos) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of ``input_ids`` fed one token per step from an empty cache, and the cache after them."""
    cache = decoder.layout.empty(input_ids.shape[0])
    logits = []
    for t in range(input_ids.shape[1]):
        step_logits, cache = decoder.step(input_ids[:, t : t + 1], mask[:, : t + 1], pos[:, t : t + 1], cache)
        logits.append(step_logits)
    return torch.cat(logits, dim=1), cache


@torch.no_grad()
def teacher_forced_logits(decoder: Decoder, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, L, V) of feeding ``input_ids`` (B, L) one token per step: what every generated
    token sees (a quantized cache read back at each step), where :func:`prefill` would attend
    the prompt's own keys and values as computed."""
    return stepped_logits(decoder, input_ids)


def stepped_logits(decoder: Decoder, input_ids: torch.Tensor) -> torch.Tensor:
    """:func:`teacher_forced_logits` where autograd may run through the steps (a decoder that trains)."""
    slots = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    return _token_by_token(decoder, input_ids, torch.ones_like(input_ids), slots)[0]


@torch.no_grad()
def greedy_generate(
    decoder: Decoder, prompt: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``prompt`` (B, P) followed by ``max_new_tokens`` argmax tokens: (B, P + max_new_tokens).

    The prompt goes in one call (:func:`prefill`); ``attention_mask`` marks left padding."""
    batch, length = prompt.shape
    if length < 1:
        raise ValueError("greedy_generate needs a prompt of at least one token")
    mask = torch.ones_like(prompt) if attention_mask is None else attention_mask.long()
    logits, cache = prefill(decoder, prompt, mask)
    tokens = prompt
    position = positions_of(mask)[:, -1:]
    for _ in range(max_new_tokens):
        token = logits[:, -1:].argmax(-1).to(prompt.dtype)
        tokens = torch.cat([tokens, token], dim=1)
        if tokens.shape[1] == length + max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        position = position + 1
        logits, cache = decoder.step(token, mask, position, cache)
    return tokens
