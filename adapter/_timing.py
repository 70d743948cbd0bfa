"""Median wall-clock latency, for reports (benchmarks live in benchmarks/)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_ms(fn: Callable[[], object], warmup: int = 3, repeats: int = 15, budget_s: float = 5.0) -> float:
    """Median latency of ``fn`` in milliseconds after ``warmup`` calls.

    Stops early once ``budget_s`` seconds have been spent (at least 3 samples).
    """
    for _ in range(warmup):
        fn()
    samples = []
    spent = time.perf_counter()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
        if len(samples) >= 3 and time.perf_counter() - spent > budget_s:
            break
    return statistics.median(samples)
