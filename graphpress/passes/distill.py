"""distill: recover what the lossy passes lost by knowledge distillation from the original (Hinton et al. 2015).

The papers graphpress follows fine-tune after their rewrite (TransMLA, ShiftAddViT, SliceGPT);
this pass does it against the original graph as teacher, on the calibration data:

    L = T^2 KL(softmax(z_teacher / T) || softmax(z_student / T))   averaged over tokens   (Hinton et al., eq. 2)
        + hidden * mean_b ||h_b - h_b^teacher||^2 / ||h_b^teacher||^2   over decoder blocks b  (optional)

the second term matching each decoder block's output (the residual stream) as TinyBERT's and
MiniLM's layer-wise losses do, scaled by the teacher's norm so every block counts alike;
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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..calibration import calibration_from_files
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
        student, teacher = self.runners(graph, module, ctx)
        samples = self.samples(ctx)
        before = mean_losses(student, teacher, samples, cfg.temperature)
        report.details = {"kl_before": before[0], "kl_after": before[0], "steps": 0, "tensors_trained": len(names)}
        report.details.update(self.data_details(ctx, samples))
        if cfg.hidden:
            report.details.update(hidden_before=before[1], hidden_after=before[1], blocks=list(teacher.taps))
        if before[0] < cfg.min_kl:
            report.warnings.append(f"{ctx.spec_path}: KL {before[0]:.3g} < min_kl {cfg.min_kl:g}: nothing to recover")
            return report
        optimizer = torch.optim.AdamW(tensors.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(cfg, step))
        losses = []
        with deterministic():
            for args in track(batches(samples, cfg, ctx.spec_path), f"{ctx.spec_path} distill: steps", cfg.steps):
                with torch.no_grad():
                    target = teacher(args)
                loss = kl(student(args), target, cfg.temperature)
                if cfg.hidden:
                    loss = loss + cfg.hidden * hidden_error(student.hidden(), teacher.hidden())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
        after = mean_losses(student, teacher, samples, cfg.temperature)
        for path, members in _by_module(names).items():
            change = sum((tensors[n].detach() - graph.stored(n)).square().sum().item() for n in members)
            norm = sum(graph.stored(n).double().square().sum().item() for n in members)
            params = sum(graph.stored(n).numel() for n in members)
            details = {"tensors": [n.rpartition(".")[2] for n in members], "relative_change": math.sqrt(change / norm)}
            report.layers.append(LayerReport(path, "trained", params, params, details))
        for name in names:
            graph.set_weight(name, tensors[name].detach().clone())
        if cfg.hidden:
            report.details["hidden_after"] = after[1]
        report.details.update(
            kl_after=after[0],
            steps=cfg.steps,
            params_trained=sum(graph.stored(n).numel() for n in names),
            loss_curve=curve(losses),
        )
        return report

    def samples(self, ctx: PassContext) -> list[tuple]:
        """``data``'s windows, or the run's calibration inputs."""
        if self.config.data is None:
            return ctx.calibration_inputs
        batches, _ = calibration_from_files(self.config.data, ctx.tokenize, section=f"{ctx.spec_path}.data")
        return batches

    def data_details(self, ctx: PassContext, samples: list[tuple]) -> dict:
        data = self.config.data
        source = "calibration" if data is None else data.text or data.tokens
        return {"data": source, "samples": len(samples)}

    def runners(self, graph: Graph, module: fx.GraphModule, ctx: PassContext) -> tuple[Runner, Runner]:
        """Student and teacher; with ``hidden``, each taps its decoder blocks' outputs (the teacher's blocks)."""
        reference = ctx.reference
        if not self.config.hidden:
            return Runner(module, graph.cache), Runner(reference.module(), reference.cache)
        teacher_module = reference.program.module()
        blocks = decoder_blocks(teacher_module.graph)
        if not blocks:
            raise PassPreconditionError(
                f"{ctx.spec_path}.hidden: the graph has no decoder blocks (numbered modules such as layers.0) "
                "whose outputs to match; set hidden 0"
            )
        student_taps, teacher_taps = tap(module, blocks), tap(teacher_module, blocks)
        for block in blocks:
            if student_taps[block].count != teacher_taps[block].count:
                raise PassPreconditionError(
                    f"{ctx.spec_path}.hidden: block {block!r} hands {student_taps[block].count} values to the rest "
                    f"of the compressed graph, {teacher_taps[block].count} in the original; set hidden 0"
                )
        return Runner(module, graph.cache, student_taps), Runner(teacher_module, reference.cache, teacher_taps)


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


def _paths(node: fx.Node) -> list[str]:
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def decoder_blocks(graph: fx.Graph) -> list[str]:
    """The outermost numbered modules (a ModuleList's children: ``layers.3``, ``h.0``), in graph order."""
    blocks: list[str] = []
    for node in graph.nodes:
        path = next((p for p in _paths(node) if p.rpartition(".")[2].isdigit()), None)
        if path is not None and path not in blocks:
            blocks.append(path)
    return blocks


def block_outputs(graph: fx.Graph, block: str) -> list[fx.Node]:
    """What ``block`` hands on: float activations computed inside it and used outside it (not by the graph's
    output alone, which is where a decode step's cache goes). For a decoder layer, its residual stream."""
    outputs = []
    for node in graph.nodes:
        value = node.meta.get("val")
        if block not in _paths(node) or not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        if value.dim() >= 3 and any(u.op != "output" and block not in _paths(u) for u in node.users):
            outputs.append(node)
    return outputs


@dataclass
class Tap:
    """The values a block's outputs took in the module's calls since :meth:`clear` (one call per decode step)."""

    count: int
    values: list[torch.Tensor]

    def record(self, value: torch.Tensor) -> torch.Tensor:
        self.values.append(value)
        return value

    def clear(self) -> None:
        self.values.clear()

    def joined(self) -> torch.Tensor:
        """Every value recorded, flattened in recording order (the same order in student and teacher)."""
        return torch.cat([v.float().flatten() for v in self.values])


def tap(module: fx.GraphModule, blocks: list[str]) -> dict[str, Tap]:
    """Make ``module`` record each block's outputs as it runs (a call node after each, returning nothing used)."""
    taps = {}
    for block in blocks:
        nodes = block_outputs(module.graph, block)
        taps[block] = Tap(len(nodes), [])
        for node in nodes:
            with module.graph.inserting_after(node):
                module.graph.call_function(taps[block].record, (node,))
    module.recompile()
    return taps


def hidden_error(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """mean_b ||h_b - t_b||^2 / ||t_b||^2 over the blocks."""
    errors = [(student[b] - t).square().sum() / t.square().sum().clamp_min(1e-30) for b, t in teacher.items()]
    return torch.stack(errors).mean()


@dataclass(frozen=True)
class Runner:
    """A graph's module called on one sample: a forward graph's logits, or a decode graph's with the sample's ids
    fed one token per step through its cache (teacher forcing: what every generated token sees); with ``taps``,
    its decoder blocks' outputs of that call by :meth:`hidden`."""

    module: nn.Module
    layout: CacheLayout | None
    taps: dict[str, Tap] = field(default_factory=dict)

    def __call__(self, args: tuple) -> torch.Tensor:
        for t in self.taps.values():
            t.clear()
        if self.layout is None:
            return logits_of(self.module(*args))
        return stepped_logits(self, args[0])

    def hidden(self) -> dict[str, torch.Tensor]:
        return {block: t.joined() for block, t in self.taps.items()}

    def step(self, input_ids, attention_mask, position_ids, cache):
        logits, present = self.module(input_ids, attention_mask, position_ids, list(cache))
        return logits, list(present)


@torch.no_grad()
def mean_losses(student: Runner, teacher: Runner, samples: list[tuple], temperature: float) -> tuple[float, float]:
    """Mean KL and mean hidden-state error (0 without taps) over ``samples``."""
    kls, hidden = [], []
    for args in samples:
        kls.append(kl(student(args), teacher(args), temperature).item())
        hidden.append(hidden_error(student.hidden(), teacher.hidden()).item() if teacher.taps else 0.0)
    return sum(kls) / len(kls), sum(hidden) / len(hidden)


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
