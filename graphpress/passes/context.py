"""What every pass can read: calibration inputs, the seed, and activations collected on demand."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..ir import Graph, Linear


@dataclass
class PassContext:
    """Shared by all passes of one run.

    ``calibration_inputs`` are positional-argument tuples for the model. Activations
    are collected once per (graph, node) and reused by later requests.
    """

    calibration_inputs: list[tuple]
    seed: int = 0
    max_rows: int = 4096
    spec_path: str = "passes"
    _inputs_cache: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict, repr=False)

    def linear_inputs(self, graph: Graph, linears: Sequence[Linear]) -> dict[str, torch.Tensor]:
        """Rows of each linear's input on the calibration data, (rows, in_features), at most max_rows.

        Rows beyond ``max_rows`` are dropped by a seeded random choice, so the sample is
        the same run after run.
        """
        missing = [lin for lin in linears if (graph.revision, lin.node.name) not in self._inputs_cache]
        if missing:
            rows: dict[str, list[torch.Tensor]] = {lin.node.name: [] for lin in missing}
            taps = {}
            for lin in missing:
                taps[lin.node.args[0].name] = taps.get(lin.node.args[0].name, [])
                taps[lin.node.args[0].name].append(lin.node.name)

            def make_tap(consumers):
                def tap(value):
                    flat = value.detach().reshape(-1, value.shape[-1]).float()
                    for name in consumers:
                        rows[name].append(flat)

                return tap

            callbacks = {producer: make_tap(consumers) for producer, consumers in taps.items()}
            for args in self.calibration_inputs:
                graph.run_with_taps(args, callbacks)
            gen = torch.Generator().manual_seed(self.seed)
            for name, chunks in rows.items():
                x = torch.cat(chunks)
                if len(x) > self.max_rows:
                    x = x[torch.randperm(len(x), generator=gen)[: self.max_rows].sort().values]
                self._inputs_cache[(graph.revision, name)] = x
        return {lin.node.name: self._inputs_cache[(graph.revision, lin.node.name)] for lin in linears}
