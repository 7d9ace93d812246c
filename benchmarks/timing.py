"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def interleaved_median(
    models: dict[str, Callable[[Any], Any]], x: Any, repeats: int, block: int = 1, settle: float = 0.0
) -> dict[str, float]:
    """Median seconds per call of each model on ``x``; calls alternate between the models,
    so machine noise (other jobs, frequency changes) hits all of them alike.

    ``block`` > 1: the models take turns in blocks of that many timed calls, each block after ``settle``
    seconds of sleep and one untimed call. Runtimes with thread pools (onnxruntime, OpenBLAS) keep their
    threads spinning for a while after a call; alternating call by call, one runtime's spinning threads take
    the cores from the next one's (measured on 2 cores: TVM's 256-token prompt 28 ms alone, 55 ms right after
    onnxruntime's). Blocks measure each as a loop of its own calls runs it."""
    samples: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        model(x)  # warm-up
    for _ in range(max(1, repeats // block)):
        for name, model in models.items():
            if block > 1:
                time.sleep(settle)
                model(x)
            for _ in range(block):
                start = time.perf_counter()
                model(x)
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}
