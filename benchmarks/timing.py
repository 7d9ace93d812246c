"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def interleaved_median(models: dict[str, Callable[[Any], Any]], x: Any, repeats: int) -> dict[str, float]:
    """Median seconds per call of each model on ``x``; calls alternate between the models,
    so machine noise (other jobs, frequency changes) hits all of them alike."""
    samples: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        model(x)  # warm-up
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(x)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}
