"""When a run streams a checkpoint's weights instead of loading the model, and where its tensors go.

A streamed run (``execution.stream``) captures a checkpoint folder lazily
(:mod:`graphpress.ir.store`), calibrates and verifies with sweeps that read each weight
once (:mod:`graphpress.ir.stream`), and writes every tensor the passes make to a spill
store, ``OUT/.graphpress-store/``, as it is made. The store outlives the run: the returned
``result.model`` reads its tensors from there. A run that fails removes it.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import BackendError, SpecError
from .fileio import on_termination
from .ir import Graph
from .ir.store import Safetensors, SpillStore, is_lazy, materialize
from .model_source import is_checkpoint
from .passes.context import available_memory
from .schema import Spec

STORE_DIR = ".graphpress-store"
JOBS_DIR = "jobs"
AUTO_SHARE = 0.25  # 'auto' streams weights larger than this share of the available memory
IN_MEMORY_SHARE = 0.5  # a backend that needs the whole model in memory gets at most this share


def streams(spec: Spec, model) -> bool:
    """Whether this run streams (``execution.stream``); an explicit ``true`` that cannot is a SpecError."""
    setting = spec.execution.stream
    if setting is False:
        return False
    why_not = _why_not(spec, model)
    if setting is True:
        if why_not:
            raise SpecError([("execution.stream", why_not)])
        return True
    if why_not:
        return False
    available = available_memory()
    try:
        size = Safetensors(Path(model)).nbytes
    except (OSError, ValueError, KeyError):
        return False  # loading it the usual way says what is wrong
    return available is not None and size > AUTO_SHARE * available


def _why_not(spec: Spec, model) -> str | None:
    if not is_checkpoint(model):
        return (
            "streaming reads the weights of a checkpoint folder (config.json + safetensors, as save_pretrained "
            f"writes it); got {type(model).__name__ if not isinstance(model, (str, Path)) else repr(str(model))}"
        )
    if spec.capture.mode != "forward":
        return "decode capture is not streamed yet; use capture.mode 'forward' or set execution.stream to false"
    if spec.evaluate is not None:
        return "evaluate is not streamed yet; drop it or set execution.stream to false"
    return None


@contextlib.contextmanager
def spill_store(out: Path, stream: bool) -> Iterator[SpillStore | None]:
    """The run's spill store under ``out`` (None when not streaming), replacing an earlier run's; removed if the
    run fails. The journal of finished jobs (``JOBS_DIR``) stays either way: the run that finds it decides
    whether it can resume from it (:mod:`graphpress.journal`)."""
    if not stream:
        yield None
        return
    folder = out / STORE_DIR
    _clear(folder)
    try:
        with on_termination(lambda: _clear(folder)):
            yield SpillStore(folder)
    except BaseException:
        _clear(folder)
        raise


def _clear(folder: Path) -> None:
    """Everything in the store but the journal; the folder itself too if nothing else is left."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name != JOBS_DIR:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()


def in_memory(graph: Graph, what: str) -> Graph:
    """A copy of a streamed graph with every tensor read into memory, for ``what`` (backends that build from
    the whole model); refused, naming the limit, when it would not fit."""
    need = graph.summary().bytes
    available = available_memory()
    if available is not None and need > IN_MEMORY_SHARE * available:
        raise BackendError(
            f"{what}: the compressed model holds {need / 2**30:.1f} GiB of tensors, more than half of the "
            f"{available / 2**30:.1f} GiB available, and this backend builds from the whole model in memory (the "
            f"ONNX backend streams a forward graph's tensors instead). The compressed tensors are in the run's "
            f"{STORE_DIR} folder"
        )
    copy = graph.clone()
    copy.spill = None
    program = copy.program
    for store in (program.state_dict, program.constants):
        for name, tensor in list(store.items()):
            if is_lazy(tensor):
                store[name] = materialize(tensor)
    return copy
