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
    fns: dict[str, Callable[[], object]], warmup: int = 3, repeats: int = 15, budget_s: float = 10.0, rounds: int = 3
) -> dict[str, float]:
    """Median latency of each function, measured in rotating blocks.

    Each round runs every function as one block (warm-up, then its share of the repeats),
    the order rotating between rounds, so slow drift in background load reaches all of
    them alike. Blocks rather than single alternating calls: runtimes keep their worker
    threads spinning for a while after a call, and on a small machine those spinning
    threads would slow whichever runtime runs next.
    """
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    per_block = max(1, -(-repeats // rounds))
    deadline = time.perf_counter() + budget_s
    for round_index in range(rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            fn = fns[name]
            for _ in range(warmup):
                fn()
            for _ in range(per_block):
                start = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - start) * 1e3)
                if len(samples[name]) >= round_index + 1 and time.perf_counter() > deadline:
                    break
    return {name: statistics.median(values) for name, values in samples.items()}


def settle(fn: Callable[[], object], max_s: float, tolerance: float = 0.03, block: int = 5) -> dict[str, object]:
    """Call ``fn`` in blocks until its speed is steady, for at most ``max_s`` seconds.

    Steady: the fastest call of each of the last three blocks agree within ``tolerance``.
    Measured on the 2-core CI host: right after a test that ran and SIGKILLed twenty
    conversions, the same engine ran up to 30% slower or faster from block to block for
    10-15 s with no other process on the CPU (the VM's memory being handed back, as far
    as could be told), then steadied; a timing started in that window judged the same
    engine changed. Returns the seconds spent, the blocks run and whether it steadied.
    """
    started = time.perf_counter()
    fastest: list[float] = []
    while True:
        times = []
        for _ in range(block):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        fastest.append(min(times))
        last = fastest[-3:]
        steady = len(last) == 3 and max(last) <= min(last) * (1 + tolerance)
        spent = time.perf_counter() - started
        if steady or spent >= max_s:
            return {"seconds": round(spent, 3), "blocks": len(fastest), "steady": steady}
