"""PassManager: run passes in spec order, check ordering and requires, verify after each pass.

Verification compares the graph after every pass with the *original* graph on the
calibration inputs (metric and threshold from the spec's ``verify``), so the error
reported for pass k is the error of the whole pipeline up to k.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from ..errors import PassPreconditionError, VerificationError
from ..ir import Graph
from ..ir.stream import Sweep, give_back_freed_memory
from ..metrics import compare_outputs
from ..progress import track
from ..schema import VerifyConfig
from .base import Pass, PassReport, PassResult
from .context import PassContext, run_calibration_sample


class Verifier:
    """Runs a graph on the calibration inputs and measures its drift from reference outputs."""

    def __init__(self, config: VerifyConfig, reference: Graph, inputs: list[tuple]):
        self.config = config
        self.inputs = inputs
        self.reference_outputs = self.outputs(reference)

    @torch.no_grad()
    def outputs(self, graph: Graph, where: str = "original") -> list:
        """Outputs per calibration sample; decode graphs are scored token by token (their logits)."""
        if graph.lazy and graph.cache is None:  # a streamed graph: every input in one sweep, each weight read once
            outputs = Sweep(graph, self.inputs).finish(f"{where}: verifying (streamed)")
            give_back_freed_memory()
            return outputs
        return [run_calibration_sample(graph, args) for args in track(self.inputs, f"{where}: verifying")]

    def check(self, graph: Graph, where: str) -> dict:
        errors = compare_outputs(self.outputs(graph, where), self.reference_outputs)
        value = errors[self.config.metric]
        passed = value <= self.config.max
        record = {**errors, "metric": self.config.metric, "max": self.config.max, "passed": passed}
        if not passed:
            message = (
                f"{where}: {self.config.metric} = {value:.4g} vs the original exceeds verify.max = {self.config.max:g}"
            )
            if self.config.on_fail == "error":
                raise VerificationError(
                    message + " (loosen verify.max, set verify.on_fail to 'warn', or compress less)"
                )
            message += " (verify.on_fail is 'warn': the artifacts were written)"
            warnings.warn(message, stacklevel=2)
            record["warning"] = message
        return record


class PassManager:
    """A pipeline of passes; itself runs like a pass (``run(graph, ctx) -> PassResult``), so pipelines nest."""

    name = "pipeline"

    def __init__(self, passes: Sequence[Pass | PassManager], verifier: Verifier | None = None):
        self.passes = list(passes)
        self.verifier = verifier
        self.check_order()

    def check_order(self) -> None:
        names = [p.name for p in self.passes]
        for i, p in enumerate(self.passes):
            for later in range(i + 1, len(names)):
                if names[later] in getattr(p, "after", ()):
                    raise PassPreconditionError(
                        f"passes[{i}] ({p.name}) must run after {names[later]} (passes[{later}]); reorder the spec"
                    )

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        reports: list[PassReport] = []
        prefix = ctx.spec_path if ctx.spec_path != "passes" else "passes"
        modified = False
        for i, p in enumerate(self.passes):
            ctx.spec_path = f"{prefix}[{i}]"
            result = p.run(graph, ctx)
            if self.verifier is not None:
                result.report.verification = self.verifier.check(result.graph, f"{ctx.spec_path} ({p.name})")
                if "warning" in result.report.verification:
                    result.report.warnings.append(result.report.verification["warning"])
            reports.append(result.report)
            graph, modified = result.graph, modified or result.modified
        ctx.spec_path = prefix
        summary = PassReport(self.name, {"passes": [r.name for r in reports]}, children=reports)
        return PassResult(graph, summary, modified)
