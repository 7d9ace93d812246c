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

A checkpoint can also be opened *lazily* (``lazy=True``): the model is built with fake
parameters (shapes and dtypes from the safetensors headers, no data), so capture reads no
weight; :func:`stored_weights` tells capture where each one's bytes are
(:mod:`graphpress.ir.store`). Buffers the model computes itself (RoPE tables) are real.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from .errors import CaptureError, first_line
from .ir.store import Safetensors, Stored


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
    weights: Safetensors | None = None
    """A lazily opened checkpoint's files: ``model`` has fake parameters, read from here when needed."""
    checkpoint_keys: dict[str, str] | None = None
    """Lazily opened: each parameter name of ``model`` (tied aliases included) -> its key in ``weights``."""


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


def is_checkpoint(source) -> bool:
    path = Path(source) if isinstance(source, (str, Path)) else None
    return (
        path is not None and path.is_dir() and not (path / "__init__.py").exists() and (path / "config.json").exists()
    )


def load_source(source: str | Path, lazy: bool = False, dtype: torch.dtype | None = None) -> ModelSource:
    """A ModelSource from a model directory path or a 'module:factory' reference (``lazy``: a checkpoint
    folder is opened without reading its weights, its floating-point tensors read as ``dtype`` if given)."""
    path = Path(source)
    factory = "load_model"
    if is_checkpoint(path):
        return load_checkpoint(path, lazy, dtype)
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


def load_checkpoint(path: Path, lazy: bool = False, dtype: torch.dtype | None = None) -> ModelSource:
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
    vocab = getattr(config.get_text_config(), "vocab_size", None) or 2
    example = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    source = ModelSource(None, (example,), name=path.resolve().name, tokenize=_tokenizer(path), directory=path)
    if lazy:
        source.weights = _safetensors(path)
        source.model, source.checkpoint_keys = _fake_model(path, config, classes, source.weights, dtype)
        return source
    failures = []
    for cls in filter(None, classes):
        try:
            source.model = cls.from_pretrained(path, local_files_only=True, dtype="auto").eval()
            return source
        except Exception as exc:
            failures.append(f"{cls.__name__}: {first_line(exc)}")
    raise CaptureError(f"--model {path}: no transformers class could load it ({'; '.join(failures)})")


def _safetensors(path: Path) -> Safetensors:
    try:
        return Safetensors(path)
    except (OSError, ValueError, KeyError) as exc:
        raise CaptureError(f"--model {path}: its weights cannot be opened lazily: {first_line(exc)}") from exc


def _fake_model(
    path: Path, config, classes, weights: Safetensors, dtype: torch.dtype | None
) -> tuple[nn.Module, dict[str, str]]:
    """The checkpoint's model with fake parameters of the stored shapes and dtypes (floating ones in ``dtype``
    if given, buffers too, as ``model.to(dtype)`` would have them), and where each one is.

    Built with parameters on the meta device (no allocation, no initialisation), then each
    parameter becomes a FakeTensor on the CPU: capture traces through it as through a real
    one, and, unlike a meta tensor, it does not bake ``device="meta"`` into the graph.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    failures = []
    for cls in filter(None, classes):
        build = cls.from_config if cls.__name__.startswith("Auto") else cls
        try:
            with _parameters_on_meta(), _default_dtype(config, weights):
                model = build(config).eval()
            break
        except Exception as exc:
            failures.append(f"{cls.__name__}: {first_line(exc)}")
    else:
        raise CaptureError(f"--model {path}: no transformers class could build it ({'; '.join(failures)})")
    keys = _checkpoint_keys(path, model, weights)
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    fakes: dict[str, nn.Parameter] = {}  # by checkpoint key: tied parameters stay one parameter
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            key = keys[f"{module_name}.{name}" if module_name else name]
            if key not in fakes:
                stored = weights.entries[key]
                kind = dtype if dtype is not None and stored.dtype.is_floating_point else stored.dtype
                with mode:
                    fake = torch.empty(stored.shape, dtype=kind)
                fakes[key] = nn.Parameter(fake, requires_grad=param.requires_grad)
            module._parameters[name] = fakes[key]
    if dtype is not None:
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.is_floating_point():
                    module._buffers[name] = buffer.to(dtype)
    return model, keys


def _checkpoint_keys(path: Path, model: nn.Module, weights: Safetensors) -> dict[str, str]:
    """Each parameter name -> the checkpoint key holding it: itself, or for a tied parameter (the same object,
    or a pair in the model's ``all_tied_weights_keys``) the alias that is stored."""
    aliases: dict[str, set[str]] = {}

    def tie(a: str, b: str) -> None:
        aliases.setdefault(a, {a}).add(b)
        aliases.setdefault(b, {b}).add(a)

    first_name: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tie(name, first_name.setdefault(id(param), name))
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        tie(target, source)
    keys = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        stored = sorted(n for n in aliases[name] if n in weights.entries)
        if not stored:
            raise CaptureError(
                f"--model {path}: parameter {name!r} is not in its safetensors files (renamed keys of an older "
                "format cannot be opened lazily: load the model, or re-save it with save_pretrained)"
            )
        if weights.entries[stored[0]].shape != tuple(param.shape):
            raise CaptureError(
                f"--model {path}: {stored[0]} is stored with shape {weights.entries[stored[0]].shape}, "
                f"the config gives {tuple(param.shape)}"
            )
        keys[name] = stored[0]
    return keys


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered while inside is moved to the meta device (its buffers stay real)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@contextlib.contextmanager
def _default_dtype(config, weights: Safetensors) -> Iterator[None]:
    """Build in the dtype the weights are stored in, as ``from_pretrained(dtype="auto")`` does."""
    floats = [s.dtype for s in weights.entries.values() if s.dtype.is_floating_point]
    dtype = max(set(floats), key=floats.count) if floats else torch.get_default_dtype()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def stored_weights(source: ModelSource) -> dict[str, Stored] | None:
    """A lazily opened checkpoint's parameters by name -> their bytes on disk (what ``capture(stored=)`` takes)."""
    if source.weights is None:
        return None
    return {name: source.weights.entries[key] for name, key in source.checkpoint_keys.items()}


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
