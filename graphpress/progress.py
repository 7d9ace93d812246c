"""Progress bars for the long steps of a run: calibration sweeps, per-layer work, export, validation.

Reporting progress is ambient, like logging: ``compress`` activates a :class:`Progress`
for the run and the code doing long work calls :func:`track` or :func:`step`, so pass
and backend signatures stay about compression. Outside an active run (tests, library
calls of a pass) both are free no-ops. Bars go to stderr through ``tqdm`` and only when
asked for or when stderr is a terminal, so logs and pipes stay clean.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import IO, TypeVar

T = TypeVar("T")

_active: ContextVar[Progress | None] = ContextVar("graphpress_progress", default=None)


class Progress:
    """Where progress goes in one run. ``enabled=None`` means: when ``stream`` is a terminal."""

    def __init__(self, enabled: bool | None = None, stream: IO[str] | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _is_terminal(self.stream) if enabled is None else enabled

    @contextlib.contextmanager
    def activate(self) -> Iterator[Progress]:
        token = _active.set(self)
        try:
            yield self
        finally:
            _active.reset(token)

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        if total is None and hasattr(items, "__len__"):
            total = len(items)
        if not self.enabled or total == 0:
            yield from items
            return
        from tqdm import tqdm

        with tqdm(items, desc=description, total=total, file=self.stream, leave=False, dynamic_ncols=True) as bar:
            yield from bar
        self._done(description, bar.format_dict["elapsed"])

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        """One long step with no natural count (an export, a compile): a line when it starts and ends."""
        if not self.enabled:
            yield
            return
        print(f"{description} ...", file=self.stream, flush=True)
        start = time.perf_counter()
        yield
        self._done(description, time.perf_counter() - start)

    def _done(self, description: str, seconds: float) -> None:
        print(f"{description}: done in {seconds:.1f} s", file=self.stream, flush=True)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterable[T]:
    """``items``, with a bar named ``description`` when a run's progress is on."""
    progress = _active.get()
    return items if progress is None or not progress.enabled else progress.track(items, description, total)


def step(description: str) -> contextlib.AbstractContextManager[None]:
    progress = _active.get()
    return contextlib.nullcontext() if progress is None else progress.step(description)


def note(message: str) -> None:
    """One line of news from inside a long step (a tuner's best so far), when a run's progress is on."""
    progress = _active.get()
    if progress is not None and progress.enabled:
        print(message, file=progress.stream, flush=True)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
