"""Where a model comes from: an nn.Module, a model directory, a checkpoint, or 'package.module:factory'.

A *model directory* is a Python package (a folder with ``__init__.py``) that provides
``load_model()`` and ``example_inputs()``, and optionally
``calibration_batches(samples, seq_len, seed)`` and ``tokenize(text) -> list[int]``.
``examples/tiny_llama`` is one. 'package.module:factory' names an importable module
with the same functions, the model coming from ``factory()`` instead of ``load_model()``.

A *checkpoint* is a ``save_pretrained`` folder (``config.json`` + safetensors, optionally
a tokenizer). It is loaded by transformers with ``local_files_only=True`` (never the
hub), in the dtype it was stored in, through the class its config names (its
``architectures``), else the causal-LM auto class, else the base auto class.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from .errors import CaptureError, first_line


@dataclass
class ModelSource:
    model: torch.nn.Module
    example_inputs: tuple | None = None
    calibration_batches: Callable[[int, int, int], list[tuple]] | None = None
    name: str = "model"
    tokenize: Callable[[str], list[int]] | None = None
    """Text to token ids, for calibration text named in the spec."""
    directory: Path | None = None
    """A checkpoint's folder (its tokenizer files travel with artifacts that need them)."""


def _import_from_cwd(name: str):
    """Import ``name`` as ``python -m`` would: the current directory first (the installed ``graphpress`` script
    starts with its own bin directory on the path instead, so ``examples.tiny_llama`` was not found)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    finally:
        if added:
            sys.path.remove(cwd)


def load_source(source: str | Path) -> ModelSource:
    """A ModelSource from a model directory path or a 'module:factory' reference."""
    path = Path(source)
    factory = "load_model"
    if path.is_dir() and not (path / "__init__.py").exists() and (path / "config.json").exists():
        return load_checkpoint(path)
    if path.is_dir():
        module, name = _import_directory(path), path.resolve().name
    elif ":" in str(source):
        module_name, _, factory = str(source).partition(":")
        try:
            module = _import_from_cwd(module_name)
        except ImportError as exc:
            raise CaptureError(f"--model {source}: cannot import {module_name!r}: {exc}") from exc
        name = factory
    else:
        raise CaptureError(
            f"--model {source}: not a model directory (a package folder), a checkpoint folder (config.json) "
            "nor 'module:factory'"
        )
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
        tokenize=getattr(module, "tokenize", None),
    )


def load_checkpoint(path: Path) -> ModelSource:
    """A transformers checkpoint folder, loaded offline; example inputs are 16 token ids."""
    try:
        import transformers
    except ImportError as exc:
        raise CaptureError(
            f"--model {path}: a checkpoint folder needs transformers (pip install 'graphpress[hf]')"
        ) from exc
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise CaptureError(f"--model {path}: config.json is not a transformers config: {first_line(exc)}") from exc
    classes = [getattr(transformers, a, None) for a in config.architectures or []]
    classes += [transformers.AutoModelForCausalLM, transformers.AutoModel]
    failures = []
    for cls in filter(None, classes):
        try:
            model = cls.from_pretrained(path, local_files_only=True, dtype="auto")
            break
        except Exception as exc:
            failures.append(f"{cls.__name__}: {first_line(exc)}")
    else:
        raise CaptureError(f"--model {path}: no transformers class could load it ({'; '.join(failures)})")
    vocab = getattr(config.get_text_config(), "vocab_size", None) or 2
    example = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    return ModelSource(model.eval(), (example,), name=path.resolve().name, tokenize=_tokenizer(path), directory=path)


def _tokenizer(path: Path) -> Callable[[str], list[int]] | None:
    """The checkpoint's own tokenizer, if it ships one (no download, no special tokens)."""
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # no tokenizer files, or ones transformers cannot read: calibration says what to do
        return None
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


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
