"""distill: recover what the lossy passes lost by knowledge distillation from the original (Hinton et al. 2015).

The papers graphpress follows fine-tune after their rewrite (TransMLA, ShiftAddViT, SliceGPT);
this pass does it against the original graph as teacher, on the calibration data:

    L = T^2 KL(softmax(z_teacher / T) || softmax(z_student / T)),  averaged over tokens   (Hinton et al., eq. 2)

minimised by AdamW with a linear warm-up and a cosine decay. The student is the compressed
graph itself, run with every compressed-format op replaced by its reference (plain, differentiable
aten arithmetic), so gradients reach a format's float tensors through the op that uses them.
A decode graph is fed each sample one token per step (teacher forcing through its cache).

Invariant (tested): every format stays intact. Only float tensors train; codes, indices and
positions are integer tensors and never change, so a LUT keeps its indices (its codebook
trains), an N:M weight its positions (its kept values train), a shift or integer weight its
codes (its scales train). Tensors outside ``train``'s groups and ``targets`` are byte-identical.
A graph already within ``min_kl`` of the original (an exact rewrite) is left as it is.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PassPreconditionError
from ..ir import Graph, matches
from ..ir.decode import CacheLayout
from ..metrics import logits_of
from ..progress import track
from ..runtime import stepped_logits
from ..schema import DistillConfig
from .base import LayerReport, Pass, PassReport
from .context import PassContext
from .registry import register

CURVE_POINTS = 100  # the loss curve the report keeps: at most this many points, each a mean over its steps


@register
class Distill(Pass):
    name = "distill"
    Config = DistillConfig

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        where = ctx.spec_path
        if graph.lazy:
            raise PassPreconditionError(f"{where}: distill needs the weights in memory; set execution.stream false")
        if ctx.reference is None:
            raise PassPreconditionError(f"{where}: distill needs the original graph as its teacher (ctx.reference)")
        if not self.trainable(graph, ctx.reference):
            raise PassPreconditionError(
                f"{where}.train: no float tensor of the groups {self.config.train} under targets "
                f"{self.config.targets!r}; an earlier lossy pass makes 'compressed' tensors"
            )

    def trainable(self, graph: Graph, reference: Graph) -> list[str]:
        """Names of the float tensors that train: in ``train``'s groups, under ``targets`` and not ``exclude``."""
        cfg, original = self.config, reference.tensors()
        names = []
        for name, tensor in graph.program.state_dict.items():
            path = name.rpartition(".")[0]
            if not tensor.is_floating_point() or not matches(path, cfg.targets) or matches(path, cfg.exclude):
                continue
            if _group(tensor, original.get(name)) in cfg.train:
                names.append(name)
        return names

    def apply(self, graph: Graph, ctx: PassContext) -> PassReport:
        cfg: DistillConfig = self.config
        report = self.new_report()
        names = self.trainable(graph, ctx.reference)
        module, tensors = trainable_module(graph, names)
        student, teacher = Runner(module, graph.cache), Runner(ctx.reference.module(), ctx.reference.cache)
        samples = ctx.calibration_inputs
        before = mean_kl(student, teacher, samples, cfg.temperature)
        report.details = {"kl_before": before, "kl_after": before, "steps": 0, "tensors_trained": len(names)}
        if before < cfg.min_kl:
            report.warnings.append(f"{ctx.spec_path}: KL {before:.3g} < min_kl {cfg.min_kl:g}: nothing to recover")
            return report
        optimizer = torch.optim.AdamW(tensors.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(cfg, step))
        losses = []
        with deterministic():
            for args in track(batches(samples, cfg, ctx.spec_path), f"{ctx.spec_path} distill: steps", cfg.steps):
                with torch.no_grad():
                    target = teacher(args)
                loss = kl(student(args), target, cfg.temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
        after = mean_kl(student, teacher, samples, cfg.temperature)
        for path, members in _by_module(names).items():
            change = sum((tensors[n].detach() - graph.stored(n)).square().sum().item() for n in members)
            norm = sum(graph.stored(n).double().square().sum().item() for n in members)
            params = sum(graph.stored(n).numel() for n in members)
            details = {"tensors": [n.rpartition(".")[2] for n in members], "relative_change": math.sqrt(change / norm)}
            report.layers.append(LayerReport(path, "trained", params, params, details))
        for name in names:
            graph.set_weight(name, tensors[name].detach().clone())
        report.details.update(
            kl_after=after,
            steps=cfg.steps,
            params_trained=sum(graph.stored(n).numel() for n in names),
            loss_curve=curve(losses),
        )
        return report


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Same seed, same bytes: the backward of a gather (a LUT's codebook) accumulates in parallel, in any order,
    unless torch is asked for its deterministic kernels."""
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _group(tensor: torch.Tensor, original: torch.Tensor | None) -> str:
    """'compressed' for a tensor a pass created or rebound, else 'norms' (1-D) or 'dense'."""
    if original is not tensor:
        return "compressed"
    return "norms" if tensor.dim() == 1 else "dense"


def trainable_module(graph: Graph, names: list[str]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The graph as a module autograd runs through, and the fresh copies of ``names`` it trains.

    Format ops are replaced by their references (differentiable aten arithmetic), ``sign`` by its
    straight-through form. Every other tensor is a detached view: no gradient, and nothing
    written, reaches the graph's tensors (which may be the user's model's own).
    """
    from ..ir.ops import decompositions

    references = {**decompositions(), torch.ops.aten.sign.default: straight_through_sign}
    module = graph.program.module()
    for node in module.graph.nodes:
        if node.op == "call_function" and node.target in references:
            node.target = references[node.target]
    module.recompile()
    trained, chosen = {}, set(names)
    for name in graph.program.state_dict:
        owner, _, leaf = name.rpartition(".")
        holder = module.get_submodule(owner)
        store = holder._parameters if leaf in holder._parameters else holder._buffers
        value = store[leaf].detach()
        value = value.clone().requires_grad_(True) if name in chosen else value
        store[leaf] = nn.Parameter(value, value.requires_grad) if store is holder._parameters else value
        if value.requires_grad:
            trained[name] = store[leaf]
    return module, trained


def straight_through_sign(x: torch.Tensor) -> torch.Tensor:
    """sign(x) forward, the identity backward (the straight-through estimator, Bengio et al. 2013): binarized
    queries and keys (shift_add's attention) pass gradients to what feeds them."""
    return x + (torch.sign(x) - x).detach()


def kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(teacher || student) of the softened distributions, averaged over tokens."""
    s = F.log_softmax(student.float() / temperature, -1).flatten(0, -2)
    t = F.log_softmax(teacher.float() / temperature, -1).flatten(0, -2)
    return temperature**2 * F.kl_div(s, t, log_target=True, reduction="batchmean")


@dataclass(frozen=True)
class Runner:
    """A graph's module called on one sample: a forward graph's logits, or a decode graph's with the sample's ids
    fed one token per step through its cache (teacher forcing: what every generated token sees)."""

    module: nn.Module
    layout: CacheLayout | None

    def __call__(self, args: tuple) -> torch.Tensor:
        if self.layout is None:
            return logits_of(self.module(*args))
        return stepped_logits(self, args[0])

    def step(self, input_ids, attention_mask, position_ids, cache):
        logits, present = self.module(input_ids, attention_mask, position_ids, list(cache))
        return logits, list(present)


@torch.no_grad()
def mean_kl(student: Runner, teacher: Runner, samples: list[tuple], temperature: float) -> float:
    values = [kl(student(args), teacher(args), temperature).item() for args in samples]
    return sum(values) / len(values)


def batches(samples: list[tuple], cfg: DistillConfig, where: str) -> Iterator[tuple]:
    """``cfg.steps`` batches of ``batch_size`` samples, concatenated on the batch axis, in a seeded order that
    visits every sample once before any twice."""
    generator = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    for _ in range(cfg.steps):
        picked = []
        while len(picked) < min(cfg.batch_size, len(samples)):
            if not order:
                order = torch.randperm(len(samples), generator=generator).tolist()
            picked.append(order.pop())
        yield _concatenated([samples[i] for i in picked], where)


def _concatenated(samples: list[tuple], where: str) -> tuple:
    parts = []
    for values in zip(*samples):
        if not isinstance(values[0], torch.Tensor):
            parts.append(values[0])
            continue
        if len({v.shape[1:] for v in values}) > 1:
            raise PassPreconditionError(
                f"{where}.batch_size: calibration samples of shapes {sorted({tuple(v.shape) for v in values})} "
                "cannot be batched; use batch_size 1 or samples of one length"
            )
        parts.append(torch.cat(values))
    return tuple(parts)


def learning_rate_factor(cfg: DistillConfig, step: int) -> float:
    """Linear warm-up to 1, then constant or a cosine decay to 0 at the last step."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))


def curve(losses: list[float]) -> list[float]:
    """At most CURVE_POINTS means of consecutive steps."""
    width = math.ceil(len(losses) / CURVE_POINTS)
    return [sum(chunk) / len(chunk) for chunk in (losses[i : i + width] for i in range(0, len(losses), width))]


def _by_module(names: list[str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for name in names:
        grouped.setdefault(name.rpartition(".")[0], []).append(name)
    return grouped
