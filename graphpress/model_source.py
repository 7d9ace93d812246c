"""Where a model comes from: an nn.Module, a model directory, or 'package.module:factory'.

A *model directory* is a Python package (a folder with ``__init__.py``) that provides
``load_model()`` and ``example_inputs()``, and optionally
``calibration_batches(samples, seq_len, seed)``. ``examples/tiny_llama`` is one.
'package.module:factory' names an importable module with the same functions, the
model coming from ``factory()`` instead of ``load_model()``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from .errors import CaptureError


@dataclass
class ModelSource:
    model: torch.nn.Module
    example_inputs: tuple | None = None
    calibration_batches: Callable[[int, int, int], list[tuple]] | None = None
    name: str = "model"


def load_source(source: str | Path) -> ModelSource:
    """A ModelSource from a model directory path or a 'module:factory' reference."""
    path = Path(source)
    factory = "load_model"
    if path.is_dir():
        module, name = _import_directory(path), path.resolve().name
    elif ":" in str(source):
        module_name, _, factory = str(source).partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise CaptureError(f"--model {source}: cannot import {module_name!r}: {exc}") from exc
        name = factory
    else:
        raise CaptureError(f"--model {source}: not a model directory (a package folder) nor 'module:factory'")
    for required in (factory, "example_inputs"):
        if not callable(getattr(module, required, None)):
            raise CaptureError(
                f"--model {source}: {module.__name__} must define {required}() (see examples/tiny_llama)"
            )
    return ModelSource(
        model=_as_module(getattr(module, factory)(), source),
        example_inputs=_as_tuple(module.example_inputs()),
        calibration_batches=getattr(module, "calibration_batches", None),
        name=name,
    )


def _import_directory(path: Path) -> ModuleType:
    init = path / "__init__.py"
    if not init.exists():
        raise CaptureError(f"--model {path}: a model directory needs an __init__.py (see examples/tiny_llama)")
    name = "graphpress_model_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
    return module


def _as_module(obj, source) -> torch.nn.Module:
    if not isinstance(obj, torch.nn.Module):
        raise CaptureError(f"--model {source}: expected an nn.Module, got {type(obj).__name__}")
    return obj


def _as_tuple(inputs) -> tuple:
    return inputs if isinstance(inputs, tuple) else (inputs,)
