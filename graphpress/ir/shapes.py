"""The shapes a captured graph takes: a check that names the dimension a call gets wrong (instead of
torch.export's ``Guard failed``), and a second shape inside the captured ranges, so that backends
validate each artifact beyond the calibration shapes (a graph that refuses batch 2 fails there).

Both read the same facts: each user input's dimensions as capture recorded them, a fixed size, a
symbol with its range, or an expression of symbols (a decode step's mask: past + new tokens).
"""

from __future__ import annotations

import sympy
import torch
from torch.utils._sympy.numbers import int_oo

from ..errors import ShapeError


def _dims(graph) -> list[tuple[str, list]]:
    """(input name, [int | sympy expression per dimension]) for each tensor user input, in call order."""
    found = []
    for node in graph.user_inputs():
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            found.append((node.name, [s.node.expr if isinstance(s, torch.SymInt) else int(s) for s in value.shape]))
    return found


def _range(graph, symbol) -> tuple[int, int | None]:
    bounds = graph.program.range_constraints.get(symbol)
    if bounds is None:
        return 0, None
    return int(bounds.lower), None if bounds.upper == int_oo else int(bounds.upper)


def shape_problems(graph, tensors: list[torch.Tensor]) -> list[str]:
    """One line per dimension of ``tensors`` (the call's tensor inputs, flattened) that the graph cannot take."""
    dims = _dims(graph)
    if len(tensors) != len(dims):
        return [f"the graph takes {len(dims)} tensor inputs ({', '.join(n for n, _ in dims)}), got {len(tensors)}"]
    problems, seen = [], {}
    for (name, wanted), tensor in zip(dims, tensors):
        if tensor.dim() != len(wanted):
            problems.append(f"{name} has {tensor.dim()} dimensions, the graph was captured with {len(wanted)}")
            continue
        for d, (want, size) in enumerate(zip(wanted, tensor.shape)):
            if isinstance(want, int):
                if size != want:
                    problems.append(
                        f"{name} dimension {d} is {size}; the graph was captured for exactly {want} "
                        "(capture.dynamic false, or the model fixes it): capture with example inputs of this size"
                    )
            elif isinstance(want, sympy.Symbol):
                low, high = _range(graph, want)
                if size < low or (high is not None and size > high):
                    problems.append(
                        f"{name} dimension {d} is {size}; capture allows {low}..{'' if high is None else high}"
                    )
                elif want in seen and seen[want][1] != size:
                    other, first = seen[want]
                    problems.append(f"{name} dimension {d} is {size} but {other} is {first}; they must be equal")
                seen.setdefault(want, (f"{name} dimension {d}", size))
    return problems


def check_shapes(graph, tensors: list[torch.Tensor]) -> None:
    problems = shape_problems(graph, tensors)
    if problems:
        raise ShapeError("inputs of a shape the compressed graph does not take:\n  " + "\n  ".join(problems))


def other_shape(graph, tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """``tensors`` resized to a second shape the capture promises, or None when every dimension is fixed.

    The batch (a symbol first seen at dimension 0) grows by one, every other symbol halves, each kept in its
    captured range; a dimension given by an expression follows its symbols. Values are the given ones wrapped
    around (token ids stay token ids, a mask stays a mask)."""
    dims = _dims(graph)
    if len(tensors) != len(dims) or shape_problems(graph, tensors):
        return None
    now, new = {}, {}
    for (_, wanted), tensor in zip(dims, tensors):
        for d, want in enumerate(wanted):
            if isinstance(want, sympy.Symbol) and want not in now:
                now[want] = size = int(tensor.shape[d])
                low, high = _range(graph, want)
                choice = size + 1 if d == 0 else size // 2
                if choice < max(low, 1) or (high is not None and choice > high):
                    choice = size - 1 if d == 0 else size + 1
                if choice >= max(low, 1) and (high is None or choice <= high):
                    new[want] = choice
    if not new:
        return None
    values = {symbol: sympy.Integer(new.get(symbol, size)) for symbol, size in now.items()}
    resized = []
    for (_, wanted), tensor in zip(dims, tensors):
        for d, want in enumerate(wanted):
            if isinstance(want, int):
                continue
            size = int(want.xreplace(values)) if want.free_symbols <= set(values) else int(tensor.shape[d])
            if size != tensor.shape[d]:
                tensor = tensor.index_select(d, torch.arange(size) % tensor.shape[d])
        resized.append(tensor)
    return resized
