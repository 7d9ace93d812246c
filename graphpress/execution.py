"""Where per-layer work runs: in this process, or as Ray tasks (``execution.engine``).

A pass hands an engine pure jobs (a function of tensors and a config: one group of
linears' factorization) and applies their results to the graph itself, in order. The
engine decides where a job runs; the pass does not know. With Ray, the job's tensors go
through Ray's object store and the job runs in a worker process, while this process goes
on sweeping the calibration data to the next layer: calibration and factorization overlap.

Results are the same bytes either way: a job runs the same torch ops on the same inputs
with the same number of threads (:func:`run_job` sets it in the worker).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .errors import SpecError

JOB_RESULTS: list[type] = []
"""The classes a job returns (besides tensors and plain containers): what a journal may read back."""


def job_result(*classes: type) -> None:
    """Declare classes a job returns, so a :class:`~graphpress.journal.Journal` reads them back (``torch.load`` with
    ``weights_only``: nothing else in a journal file can run code)."""
    JOB_RESULTS.extend(c for c in classes if c not in JOB_RESULTS)


def run_job(function: Callable, threads: int, *args) -> Any:
    """``function(*args)`` with torch using ``threads`` threads, as the submitting process does (what a Ray
    worker runs: its own default is one thread per CPU it was given, and thread count can change a reduction's
    rounding)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            return function(*args)
    finally:
        torch.set_num_threads(previous)


class InProcess:
    """Runs each job when it is submitted."""

    name = "local"
    in_flight = 0

    def submit(self, function: Callable, *args) -> Any:
        return function(*args)

    def result(self, job: Any) -> Any:
        return job


class RayEngine:
    """Runs jobs as Ray tasks; at most ``in_flight`` wait while the pass goes on to the next layer."""

    name = "ray"

    def __init__(self, ray, in_flight: int):
        self.ray = ray
        self.in_flight = in_flight
        self._task = ray.remote(run_job)

    def submit(self, function: Callable, *args) -> Any:
        return self._task.remote(function, torch.get_num_threads(), *args)

    def result(self, job: Any) -> Any:
        return self.ray.get(job)


@contextlib.contextmanager
def engine(config) -> Iterator[InProcess | RayEngine]:
    """The engine ``config`` (an ExecutionConfig) names, started for the run and stopped after it (a Ray
    runtime this run started is shut down; one it connected to is left running)."""
    if config.engine == "local":
        yield InProcess()
        return
    try:
        import ray
    except ImportError:
        raise SpecError([("execution.engine", "'ray' needs Ray installed: pip install 'graphpress[ray]'")]) from None
    started = not ray.is_initialized()
    if started:
        address = None if config.address == "local" else config.address
        options = {"num_cpus": config.num_cpus} if address is None and config.num_cpus else {}
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, **options)
        except Exception as exc:  # ConnectionError, ValueError, RuntimeError, ...: all mean no cluster
            raise SpecError([("execution.address", f"cannot start or reach Ray at {config.address!r}: {exc}")]) from exc
    try:
        yield RayEngine(ray, in_flight=max(1, int(ray.cluster_resources().get("CPU", 1))))
    finally:
        if started:
            ray.shutdown()
