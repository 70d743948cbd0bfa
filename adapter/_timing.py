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


def paired_median_ms(
    fns: dict[str, Callable[[], object]], warmup: int = 3, repeats: int = 15, budget_s: float = 10.0
) -> dict[str, float]:
    """Median latency of each function, measured in alternation.

    Interleaving the calls exposes every function to the same background load, so their
    ratio holds on a busy machine where back-to-back medians would not.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    spent = time.perf_counter()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
        if len(samples[next(iter(fns))]) >= 3 and time.perf_counter() - spent > budget_s:
            break
    return {name: statistics.median(values) for name, values in samples.items()}
