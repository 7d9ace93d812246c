"""kv_cache_quant: KIVI-style quantization of a decode graph's cache, at the graph boundary.

Each targeted cache entry E (a tensor (..., T, C), tokens on the second-to-last axis)
becomes four (three when symmetric):

    E.packed    uint8 codes, 8 // bits per byte            (..., Tq, C * bits / 8)
    E.scale     per group                                 (..., Tq / G, C) or (..., Tq, C / G)
    E.zero      per group (asymmetric only)               same as scale
    E.residual  the newest tokens in full precision       (..., Tr, C),  R <= Tr < R + block

Each step attends over ``cat(dequantize(packed), residual, new)`` (what E used to hold)
and then flushes the oldest whole blocks of ``recent = residual + new`` beyond its R newest
tokens into the packed part, none while ``recent`` holds fewer than R + block: a decode step
flushes 0 or one block, a prompt as many as it fills (KIVI: the prompt attends its own
keys and values in full precision, then they are quantized). ``block`` is the group size for
per-channel quantization (a scale covers G tokens, so tokens leave in groups of G) and 1
per-token. The count is shape arithmetic alone (:func:`flushed`), so the step stays one
graph with no data-dependent control flow.

With ``rotate: "hadamard"`` the codes hold x H (H orthonormal, symmetric), spreading
outlier channels before the min/max; the dequantized tokens are multiplied by H again.

Invariants (tested): 8-bit keeps the example LM's perplexity within 1%; the ONNX file's
cache inputs are the packed uint8 codes; onnxruntime's greedy decode matches eager's.
"""

from __future__ import annotations

import operator

import torch

from ..errors import PassPostconditionError, PassPreconditionError
from ..ir import Graph, SubgraphBuilder, matches
from ..ir.decode import CacheEntry
from ..ir.ops.kv_quant import EPS, codes_per_byte
from ..progress import track
from ..schema import KvCacheQuantConfig, KvQuantSide
from .base import LayerReport, Pass, PassReport
from .context import PassContext
from .registry import register

aten = torch.ops.aten
gp = torch.ops.graphpress
QUANTIZABLE = ("key", "value", "latent", "k_rope")
END = 2**63 - 1


@register
class KvCacheQuant(Pass):
    name = "kv_cache_quant"
    Config = KvCacheQuantConfig
    after = ("gqa_to_mla",)

    def side(self, entry: CacheEntry) -> tuple[str, KvQuantSide]:
        cfg: KvCacheQuantConfig = self.config
        if entry.kind == "value":
            return "value", cfg.value
        if entry.kind == "latent" and cfg.latent is not None:
            return "latent", cfg.latent
        return "key", cfg.key

    def selected(self, graph: Graph) -> list[CacheEntry]:
        cfg: KvCacheQuantConfig = self.config
        return [
            e
            for e in graph.cache or ()
            if e.kind in QUANTIZABLE
            and matches(e.name, cfg.targets)
            and not (cfg.exclude and matches(e.name, cfg.exclude))
        ]

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        if graph.cache is None:
            raise PassPreconditionError(
                f"{ctx.spec_path}: kv_cache_quant rewrites the KV cache of a decode graph; set capture.mode to 'decode'"
            )
        entries = self.selected(graph)
        if not entries:
            names = ", ".join(e.name for e in graph.cache) or "none"
            raise PassPreconditionError(
                f"{ctx.spec_path}.targets: {self.config.targets!r} matches no unquantized cache entry; entries: {names}"
            )
        for entry in entries:
            field, side = self.side(entry)
            channels = entry.shape[-1]
            if entry.seq_axis != len(entry.shape) - 2 or channels is None:
                raise PassPreconditionError(f"{ctx.spec_path}: cache entry {entry.name} is not (..., tokens, channels)")
            if channels % codes_per_byte(side.bits):
                raise PassPreconditionError(
                    f"{ctx.spec_path}.{field}.bits: {side.bits}-bit codes pack {codes_per_byte(side.bits)} per byte, "
                    f"which does not divide the {channels} channels of cache entry {entry.name}"
                )
            if side.rotate == "hadamard" and channels & (channels - 1):
                raise PassPreconditionError(
                    f"{ctx.spec_path}.{field}.rotate: a Hadamard rotation needs a power-of-two channel count; "
                    f"cache entry {entry.name} has {channels}"
                )
            if side.axis == "token" and channels % side.group_size:
                raise PassPreconditionError(
                    f"{ctx.spec_path}.{field}.group_size: {side.group_size} does not divide the {channels} channels "
                    f"of cache entry {entry.name} (axis 'token' groups channels)"
                )
            try:
                graph.cache_append(entry.name)
            except ValueError as exc:
                raise PassPreconditionError(f"{ctx.spec_path}: {exc}") from None

    def ensures(self, graph: Graph, ctx: PassContext) -> None:
        left = [e.name for e in self.selected(graph)]
        if left:
            raise PassPostconditionError(f"{ctx.spec_path}: cache entries still in floating point: {', '.join(left)}")

    def apply(self, graph: Graph, ctx: PassContext) -> PassReport:
        cfg: KvCacheQuantConfig = self.config
        report = self.new_report()
        before = graph.cache.bytes_per_token
        first_packed = 0  # the first token a cache entry holds packed: before it, nothing is saved
        static = cfg.scales == "static"
        entries = self.selected(graph)
        scales = static_scales(graph, entries, [self.side(e)[1].bits for e in entries], ctx) if static else {}
        for entry in entries:
            _, side = self.side(entry)
            if static:
                quantized = quantize_entry_static(graph, entry, side.bits, scales[entry.name])
                settings = {"bits": side.bits, "axis": "channel", "scales": "static", "symmetric": True}
            else:
                first_packed = max(first_packed, cfg.residual + (side.group_size if side.axis == "channel" else 1))
                quantized = quantize_entry(graph, entry, side, cfg.residual)
                settings = {
                    "bits": side.bits,
                    "axis": side.axis,
                    "group_size": side.group_size,
                    "symmetric": side.symmetric,
                    "rotate": side.rotate,
                }
            bytes_per_token = (entry.bytes_per_token, sum(e.bytes_per_token for e in quantized))
            report.layers.append(
                LayerReport(entry.name, "quantized", 0, 0, {**settings, "bytes_per_token": bytes_per_token})
            )
        report.details = {
            "residual": cfg.residual,
            "packed_from_token": first_packed,
            "kv_cache_bytes_per_token": [before, graph.cache.bytes_per_token],
            "window_bytes": graph.cache.window_bytes,
        }
        return report


def quantize_entry(graph: Graph, entry: CacheEntry, side: KvQuantSide, residual: int) -> list[CacheEntry]:
    """Replace ``entry`` by its packed codes, scales (zeros) and full-precision residual window."""
    per_channel = side.axis == "channel"
    block = side.group_size if per_channel else 1
    channels = entry.shape[-1]
    lead = entry.shape[:-1]
    stats = (*lead, channels) if per_channel else (*lead, channels // side.group_size)
    new_entries = [
        CacheEntry(
            f"{entry.name}.packed",
            f"{entry.kind}.packed",
            (*lead, channels // codes_per_byte(side.bits)),
            entry.seq_axis,
            "uint8",
        ),
        CacheEntry(f"{entry.name}.scale", f"{entry.kind}.scale", stats, entry.seq_axis, "float32", block),
    ]
    if not side.symmetric:
        new_entries.append(
            CacheEntry(f"{entry.name}.zero", f"{entry.kind}.zero", stats, entry.seq_axis, "float32", block)
        )
    new_entries.append(
        CacheEntry(
            f"{entry.name}.residual",
            f"{entry.kind}.residual",
            entry.shape,
            entry.seq_axis,
            entry.dtype,
            max_len=residual + block - 1,
        )
    )
    grown, new = graph.cache_append(entry.name)
    axis = entry.seq_axis
    rotation = None
    if side.rotate == "hadamard":
        with graph.fx.inserting_before(grown):
            rotation = graph.add_buffer(f"kv_cache_quant.{entry.name}.hadamard", hadamard(channels))

    def build(inputs):
        packed, scale, *zero, window = inputs
        zero = zero[0] if zero else None
        b = SubgraphBuilder(graph, "", grown)
        with graph.fx.inserting_before(grown):
            past = b.call(gp.kv_dequantize.default, packed, scale, zero, side.bits, side.group_size, per_channel)
            if rotation is not None:  # H is symmetric and orthonormal: its own inverse
                past = b.call(aten.matmul.default, past, rotation)
            if entry.dtype != "float32":
                past = b.call(aten._to_copy.default, past, dtype=getattr(torch, entry.dtype))
            recent = b.call(aten.cat.default, [window, new], axis)
            full = b.call(aten.cat.default, [past, recent], axis)
            flush = flushed(b, b.call(aten.sym_size.int, recent, axis), residual, block)
            leaving = b.call(aten.slice.Tensor, recent, axis, 0, flush)
            staying = b.call(aten.slice.Tensor, recent, axis, flush, END)
            if rotation is not None:
                leaving = b.call(aten.matmul.default, leaving, rotation)
            q = b.call(gp.kv_quantize.default, leaving, side.bits, side.group_size, per_channel, side.symmetric)
            codes, scales, zeros = (b.call(operator.getitem, q, i) for i in range(3))
            outputs = [b.call(aten.cat.default, [packed, codes], axis), b.call(aten.cat.default, [scale, scales], axis)]
            if zero is not None:
                outputs.append(b.call(aten.cat.default, [zero, zeros], axis))
            outputs.append(staying)
        grown.replace_all_uses_with(full, delete_user_cb=lambda user: user.op != "output")
        return outputs

    def past_length(b: SubgraphBuilder, inputs):
        """Tokens held: quantized ones plus the window's."""
        return b.call(
            operator.add, b.call(aten.sym_size.int, inputs[0], axis), b.call(aten.sym_size.int, inputs[-1], axis)
        )

    graph.replace_cache_entries([entry.name], new_entries, build, same_length=False, past_length=past_length)
    return new_entries


def static_scales(
    graph: Graph, entries: list[CacheEntry], bits: list[int], ctx: PassContext
) -> dict[str, torch.Tensor]:
    """Per entry, absmax / (2^(bits-1) - 1) of each channel of each head over the calibration data (every token the
    step appends, the prompt's included): onnxruntime's static per-channel cache scale, shaped to broadcast over
    the entry (1 on its batch and sequence axes)."""
    from .context import run_calibration_sample

    appended = {graph.cache_append(e.name)[1].name: e for e in entries}
    peaks: dict[str, torch.Tensor] = {}

    def tap(entry: CacheEntry):
        axes = (0, entry.seq_axis)

        def record(value):
            peak = value.detach().float().abs().amax(dim=axes, keepdim=True)
            peaks[entry.name] = torch.maximum(peaks[entry.name], peak) if entry.name in peaks else peak

        return record

    for args in track(ctx.calibration_inputs, f"{ctx.spec_path}: calibrating cache scales"):
        run_calibration_sample(graph, args, {node: tap(entry) for node, entry in appended.items()})
    return {e.name: (peaks[e.name] / (2 ** (b - 1) - 1)).clamp_min(EPS) for e, b in zip(entries, bits)}


def quantize_entry_static(graph: Graph, entry: CacheEntry, bits: int, scale: torch.Tensor) -> list[CacheEntry]:
    """Replace ``entry`` by its codes under a fixed per-channel ``scale``: ``E.codes`` (int8, or two 4-bit codes
    per uint8), one slot per token. The step quantizes its new tokens, appends them, and attends over the
    dequantized whole, as onnxruntime's GroupQueryAttention does with ``kv_cache_bit_width``."""
    channels = entry.shape[-1] if bits == 8 else entry.shape[-1] // 2
    codes_entry = CacheEntry(
        f"{entry.name}.codes",
        f"{entry.kind}.codes",
        (*entry.shape[:-1], channels),
        entry.seq_axis,
        "int8" if bits == 8 else "uint8",
    )
    grown, new = graph.cache_append(entry.name)
    with graph.fx.inserting_before(grown):
        scale_node = graph.add_buffer(f"kv_cache_quant.{entry.name}.scale", scale)

    def build(inputs):
        b = SubgraphBuilder(graph, "", grown)
        with graph.fx.inserting_before(grown):
            codes = b.call(gp.kv_quantize_static.default, new, scale_node, bits)
            present = b.call(aten.cat.default, [inputs[0], codes], entry.seq_axis)
            full = b.call(gp.kv_dequantize_static.default, present, scale_node, bits)
            if entry.dtype != "float32":
                full = b.call(aten._to_copy.default, full, dtype=getattr(torch, entry.dtype))
        grown.replace_all_uses_with(full, delete_user_cb=lambda user: user.op != "output")
        return [present]

    graph.replace_cache_entries([entry.name], [codes_entry], build)
    return [codes_entry]


NO_LENGTH = 2**40  # above any cache length


def flushed(b: SubgraphBuilder, n, residual: int, block: int):
    """``block * ((n - R) // block)`` if ``n >= R + block`` else 0, in operations on sizes every
    backend lowers (+, *, //; no max or select): ``(n + N) // (N + R + block)`` is 1 exactly
    when ``n >= R + block`` (for n < N + R + block), and it gates the count."""
    full = b.call(operator.floordiv, b.call(operator.add, n, NO_LENGTH), NO_LENGTH + residual + block)
    blocks = b.call(operator.floordiv, b.call(operator.sub, n, residual), block)
    return b.call(operator.mul, b.call(operator.mul, full, blocks), block)


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order n (a power of two): symmetric, H H = I."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5
