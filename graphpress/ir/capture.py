"""Capture a PyTorch model into a Graph with ``torch.export`` (non-strict).

Every input dimension is kept symbolic by default (``Dim.AUTO``), with size-1
dimensions not specialised, so a model captured on a (1, 64) batch still runs on
(8, 256). The captured graph owns copies of the model's tensors: nothing a pass
or a user does to the result can reach the original model.

A model whose forward takes ``use_cache`` (every transformers causal LM, whose
default config has ``use_cache=True`` and returns a cache object) is captured
through :class:`ForwardOutputs`, which calls it with ``use_cache=False``: the forward
graph returns logits / hidden states, never the cache, and the user's model and its
config stay as they are.

``stored`` (a lazily opened checkpoint, parameters fake) makes the graph's tensors lazy
stand-ins for their bytes on disk (:mod:`graphpress.ir.store`): capture reads no weight.

``mode="decode"`` captures one decoding step with the KV cache as explicit inputs
and outputs instead (see :mod:`graphpress.ir.decode`), taking any number of new tokens.
Where the model's attention pins that number under export (an eager kernel that branches
on the query length), the capture is checked on a one-token prompt and, if the graph
refuses it, redone on one token (``CacheLayout.step_tokens == 1``; ``step_tokens=1``
asks for that form).

When export fails, the error names the innermost module that was running
(tracked with forward hooks) and the op torch.export complained about.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.export import Dim

from ..errors import CaptureError, first_line
from .canonical import canonicalize
from .decode import CacheLayout, DecodeStep, any_length_attention, decode_example
from .graph import Graph
from .store import Stored, lazy

MODES = ("forward", "decode")


def capture(
    model: torch.nn.Module,
    example_inputs: tuple,
    mode: str = "forward",
    example_kwargs: dict[str, Any] | None = None,
    dynamic: bool = True,
    step_tokens: int | None = None,
    stored: dict[str, Stored] | None = None,
) -> Graph:
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise CaptureError(f"capture mode {mode!r} is not supported; expected one of {MODES}")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    kwargs = example_kwargs or {}
    layout = None
    if mode == "decode":
        traced = DecodeStep(model)
        batch = _batch_size(example_inputs)
        tokens = step_tokens if step_tokens is not None else (None if dynamic else 1)
        program = _export(model, traced, *_decode_inputs(traced.layout, batch, tokens, dynamic), dynamic)
        if tokens is None and not _takes_one_token(program, traced.layout):
            tokens = 1
            program = _export(model, traced, *_decode_inputs(traced.layout, batch, tokens, dynamic), dynamic)
        layout = CacheLayout(traced.layout.entries, tokens)
    else:
        bound = _bind(model, example_inputs, kwargs)
        traced = model
        if ForwardOutputs.applies(model, bound):
            traced = ForwardOutputs(model, list(bound))
            example_inputs, kwargs = tuple(bound.values()), {}
        dynamic_shapes = _auto_dynamic(bound) if dynamic else None
        program = _export(model, traced, example_inputs, kwargs, dynamic_shapes, dynamic)

    for name, tensor in list(program.state_dict.items()):
        copy = tensor.detach().clone()
        program.state_dict[name] = (
            torch.nn.Parameter(copy, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else copy
        )
    for name, value in list(program.constants.items()):
        if isinstance(value, torch.Tensor):
            program.constants[name] = value.detach().clone()
    if traced is not model:
        _strip_prefix(program, "model.")
    if stored is not None:
        _attach(program, stored)
    return canonicalize(Graph(program, cache=layout))


def _attach(program, stored: dict[str, Stored]) -> None:
    """A model with fake parameters: each becomes a lazy stand-in for its bytes on disk (read when a pass, or
    canonicalisation, asks). Buffers the model computed itself stay as captured."""
    for name, tensor in list(program.state_dict.items()):
        if name in stored:
            parameter = isinstance(tensor, torch.nn.Parameter)
            program.state_dict[name] = lazy(stored[name], parameter, dtype=tensor.dtype)
        elif isinstance(tensor, FakeTensor):
            raise CaptureError(f"the model's tensor {name!r} has no data: nothing on disk stands for it")


def _export(model, traced, example_inputs, kwargs, dynamic_shapes, dynamic: bool):
    tracker = _ModuleTracker(model)
    try:
        with tracker, _eval_mode(model), any_length_attention(model), fx_config.patch(backed_size_oblivious=dynamic):
            return torch.export.export(traced, example_inputs, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # torch.export raises many types; all become one clear error
        where = f" in module '{tracker.failed_in}'" if tracker.failed_in is not None else ""
        op = _failing_op(exc)
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}{where}"
            f"{f' at op {op}' if op else ''}: {type(exc).__name__}: {first_line(exc, '(no message)')}. {_hint(exc, dynamic)}"
        ) from exc


def _decode_inputs(layout: CacheLayout, batch: int, tokens: int | None, dynamic: bool) -> tuple:
    """(example inputs, kwargs, dynamic shapes) of a decode step taking ``tokens`` (None: any number)."""
    example = decode_example(layout, batch, new_tokens=tokens or 2)
    if not dynamic:
        return example, {}, None
    new = {0: Dim.AUTO} if tokens is not None else {0: Dim.AUTO, 1: Dim.AUTO}
    shapes = {
        "input_ids": new,
        "attention_mask": {0: Dim.AUTO, 1: Dim.AUTO},
        "position_ids": new,
        "cache": [{0: Dim.AUTO, e.seq_axis: Dim.AUTO} for e in layout],
    }
    return example, {}, shapes


def _takes_one_token(program, layout: CacheLayout) -> bool:
    """Whether the captured step runs a one-token prompt (the shape an eager kernel's guards refuse)."""
    ids, mask, positions, cache = decode_example(layout, 1, past_len=0, new_tokens=1)
    try:
        with torch.no_grad():
            program.module()(ids, mask, positions, cache)
    except AssertionError as exc:  # the exported module checks its shape guards with assertions
        if "Guard failed" in str(exc):
            return False
        raise
    return True


class ForwardOutputs(nn.Module):
    """Calls a model that would return its KV cache with ``use_cache=False``.

    The example inputs, bound to the names of the model's forward, become positional
    inputs in that order: the captured graph is called like the model. Without a cache
    and a mask, transformers compares the batch with ``position_ids``' (1, S) and the
    capture would pin the batch size; an all-ones ``attention_mask`` (what a tokenizer
    gives for unpadded text) keeps it free.
    """

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.names = names
        self.add_mask = "input_ids" in names and "attention_mask" not in names and _takes(model, "attention_mask")

        def forward(*args):
            return self._call(*args)

        # The graph's inputs are named after the model's parameters (input_ids, not args_0).
        forward.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
        )
        self.forward = forward

    @staticmethod
    def applies(model: nn.Module, bound: dict[str, Any]) -> bool:
        return _takes(model, "use_cache") and "use_cache" not in bound

    def _call(self, *args):
        inputs = dict(zip(self.names, args))
        if self.add_mask:
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        return self.model(**inputs, use_cache=False)


def _takes(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _batch_size(example_inputs: tuple) -> int:
    first = example_inputs[0] if example_inputs else None
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() >= 1 else 1


def _strip_prefix(program, prefix: str) -> None:
    """Module paths and tensor names as in the user's model, not under the DecodeStep wrapper."""

    def strip(path: str) -> str:
        return "" if path == prefix.rstrip(".") else path.removeprefix(prefix)

    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {k: (strip(path), cls) for k, (path, cls) in stack.items()}
    renames = {name: name.removeprefix(prefix) for name in [*program.state_dict, *program.constants]}
    for store in (program.state_dict, program.constants):
        for old in [k for k in store if k.startswith(prefix)]:
            store[renames[old]] = store.pop(old)
    for spec in program.graph_signature.input_specs:
        if spec.target is not None and spec.target.startswith(prefix):
            spec.target = renames[spec.target]


def _bind(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Example inputs by forward's parameter names, the form torch.export's dynamic_shapes takes."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise CaptureError(f"example inputs do not fit {type(model).__name__}.forward: {exc}") from None
    return dict(bound.arguments)


def _auto_dynamic(tree: Any) -> Any:
    """Dim.AUTO on every dimension of every tensor, None elsewhere (same pytree structure)."""
    if isinstance(tree, torch.Tensor):
        return {i: Dim.AUTO for i in range(tree.dim())} or None
    if isinstance(tree, tuple):
        return tuple(_auto_dynamic(x) for x in tree)
    if isinstance(tree, list):
        return [_auto_dynamic(x) for x in tree]
    if isinstance(tree, dict):
        return {k: _auto_dynamic(v) for k, v in tree.items()}
    return None


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Capture the inference graph; restore each module's training flag afterwards."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags.items():
            module.training = flag


class _ModuleTracker:
    """Forward hooks that remember the innermost module running when an exception escapes."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.stack: list[str] = []
        self.failed_in: str | None = None
        self.handles: list = []

    def __enter__(self):
        for path, module in self.model.named_modules():
            self.handles.append(module.register_forward_pre_hook(lambda *_, p=path: self.stack.append(p)))
            self.handles.append(module.register_forward_hook(lambda *_, p=path: self._pop(), always_call=True))
        return self

    def _pop(self) -> None:
        if self.stack:
            path = self.stack.pop()
            if self.failed_in is None and _exception_in_flight():
                self.failed_in = path or "<root>"

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        if exc[0] is not None and self.failed_in is None and self.stack:
            self.failed_in = self.stack[-1] or "<root>"
        return False


def _exception_in_flight() -> bool:
    return sys.exc_info()[0] is not None


def _hint(exc: BaseException, dynamic: bool) -> str:
    """What to change, for the failures users meet most."""
    text = f"{type(exc).__name__}: {exc}"
    if "data-dependent" in text or "DataDependent" in text:
        return (
            "The forward branches on tensor values; write the branch with torch.where or torch.cond, "
            "or move it out of the captured module"
        )
    if dynamic and ("Constraints violated" in text or "specializ" in text or "ConstraintViolation" in text):
        return 'The model fixes an input dimension; capture with "capture": {"dynamic": false}'
    return (
        "Make the forward traceable by torch.export (tensor inputs and outputs, no Python side effects "
        "that depend on values), or compress a submodule whose forward is traceable"
    )


def _failing_op(exc: BaseException) -> str | None:
    """The op named in torch's message, if any: 'aten.nonzero.default' or a custom 'ns::op'."""
    text = str(exc)
    match = re.search(r"\b((?:aten|prim)\.\w+(?:\.\w+)?)\b", text) or re.search(r"\b([A-Za-z_]\w*::\w+)\b", text)
    return match.group(1) if match else None
