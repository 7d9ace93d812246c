"""Resuming an interrupted streamed run: finished per-layer jobs kept on disk.

A streamed run of a big model is long (hours for an 8B model on a laptop-class CPU), and
most of that is per-layer jobs (low_rank's factorizations). Jobs are pure and a run is
deterministic, so the n-th job of a run is the n-th job of any run with the same spec,
model, calibration data and versions. :class:`Journal` writes each finished job's result
to ``OUT/.graphpress-store/jobs/`` as it comes back; a run that finds a journal of an
identical run there takes the results from it instead of running those jobs again, and
goes on from the first job the interrupted run did not finish. The run's other work
(capture, calibration sweeps, the graph's rewrite) is done again: it is cheap next to the
jobs, and doing it again keeps the result byte for byte the uninterrupted run's.

A journal of another run (any difference in identity) is discarded. A successful run
removes its journal; a failed or killed one leaves it for the next.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

IDENTITY = "run.json"


class Journal:
    """Job results of one run identity under ``folder``; :meth:`get` finds one a previous run finished."""

    def __init__(self, folder: Path, identity: dict):
        self.folder = Path(folder)
        self.resumed = 0
        record = self.folder / IDENTITY
        text = json.dumps(identity, sort_keys=True)
        if not (record.exists() and record.read_text() == text):
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
            _atomic_write(record, text.encode())

    def get(self, key: str) -> Any | None:
        path = self.folder / f"{key}.pt"
        if not path.exists():
            return None
        from .execution import JOB_RESULTS

        with torch.serialization.safe_globals(JOB_RESULTS):  # our result classes and tensors; no other code
            result = torch.load(path, weights_only=True)
        self.resumed += 1
        return result

    def put(self, key: str, result: Any) -> None:
        staged = self.folder / f".{key}.partial"
        torch.save(result, staged)
        os.replace(staged, self.folder / f"{key}.pt")

    def close(self) -> None:
        """The run finished: nothing to resume."""
        shutil.rmtree(self.folder, ignore_errors=True)


class Journaled:
    """An engine whose jobs' results are journaled: a job an identical earlier run finished is not run again."""

    def __init__(self, engine, journal: Journal):
        self.engine, self.journal = engine, journal
        self.name, self.in_flight = engine.name, engine.in_flight
        self.submitted = 0

    def submit(self, function: Callable, *args) -> tuple[str, Any, bool]:
        key = f"{self.submitted:06d}-{function.__name__}"
        self.submitted += 1
        found = self.journal.get(key)
        if found is not None:
            return key, found, True
        return key, self.engine.submit(function, *args), False

    def result(self, job: tuple[str, Any, bool]) -> Any:
        key, value, done = job
        if done:
            return value
        result = self.engine.result(value)
        self.journal.put(key, result)
        return result


def run_identity(spec, model, calibration: list) -> dict:
    """What makes two runs' n-th jobs the same job: the spec (where jobs run aside), the checkpoint's files (name,
    size, modification time), the calibration inputs' bytes, and the versions of graphpress and torch."""
    from . import __version__

    settings = spec.model_dump(mode="json", by_alias=True)
    settings.pop("execution", None)
    folder = Path(model)
    files = [
        [p.name, p.stat().st_size, p.stat().st_mtime_ns]
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix in (".safetensors", ".json")
    ]
    digest = hashlib.sha256()
    for args in calibration:
        for leaf in torch.utils._pytree.tree_leaves(args):
            if isinstance(leaf, torch.Tensor):
                digest.update(str((leaf.dtype, tuple(leaf.shape))).encode())
                digest.update(leaf.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {
        "spec": settings,
        "checkpoint": files,
        "calibration": digest.hexdigest(),
        "graphpress": __version__,
        "torch": torch.__version__,
    }


def _atomic_write(path: Path, data: bytes) -> None:
    staged = path.with_name(f".{path.name}.partial")
    staged.write_bytes(data)
    os.replace(staged, path)
