"""Wall-clock timing: medians for reports, rotating blocks (with the machine guard) for
races and benchmarks (the comparisons themselves live in benchmarks/ and adapter.bench)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from adapter.core import machine_probe as _machine_probe

__all__ = ["STATISTICS", "block_samples", "median_ms", "paired_median_ms", "settle", "time_cases"]

STATISTICS = {"median": 50.0, "p25": 25.0, "p10": 10.0, "min": 0.0}
"""What one sample is, per block of iterations: a percentile of the block's call times."""


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


def time_cases(
    runs: dict[str, Callable[[], object]],
    repeats: int,
    iterations: int,
    warmup: int,
    progress: Callable[[str], None] | None = None,
    settle_s: float = 0.0,
    settled: dict[str, dict[str, object]] | None = None,
    guard_s: float = 0.0,
    guarded: dict[str, Any] | None = None,
) -> dict[str, list[list[float]]]:
    """Call times (ms) per case: ``repeats`` blocks of ``iterations`` calls each.

    The scheme of ``adapter.core.timing.paired_median_ms`` — every case runs as one block
    (``warmup`` calls, then the timed ones) per repeat, the order rotating between repeats
    — but every call time is kept, so a sample can be a low percentile of its block.
    First, with ``settle_s``, each case runs until its speed is steady (at most that long;
    ``adapter.core.timing.settle``), and what it took goes into ``settled``.

    With ``guard_s``, the machine probe (:mod:`adapter.core.machine_probe`) is timed before the
    first block and after every block; a block with a probe on either side above the
    machine's clean level is timed again, until ``guard_s`` seconds have gone into such
    blocks (after that, blocks are kept as they come and counted as unclean). What the
    guard did goes into ``guarded``: the probe, its level, seconds spent, and per case the
    probe after each kept block and the counts of re-timed and unclean blocks.
    """
    names = list(runs)
    blocks: dict[str, list[list[float]]] = {name: [] for name in names}
    for name in names if settle_s > 0 else []:
        if progress:
            progress(f"settling: {name}")
        outcome = settle(runs[name], settle_s)
        if settled is not None:
            settled[name] = outcome
    probe = None
    if guard_s > 0:
        probe = _machine_probe.MachineProbe()
        probe.calibrate()
        before = probe.sample()
        guard: dict[str, Any] = {"probe": _machine_probe.KIND, "tolerance": probe.tolerance, "budget_s": guard_s}
        guard["cases"] = {name: {"probe_ms": [], "retimed_blocks": 0, "unclean_blocks": 0} for name in names}
        spent = 0.0
    for repeat in range(repeats):
        if progress:
            progress(f"timing: repeat {repeat + 1}/{repeats}")
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            run = runs[name]
            while True:
                started = time.perf_counter()
                for _ in range(warmup):
                    run()
                times = []
                for _ in range(iterations):
                    start = time.perf_counter()
                    run()
                    times.append((time.perf_counter() - start) * 1e3)
                if probe is None:
                    break
                after = probe.sample()
                record = guard["cases"][name]
                clean, before = probe.clean(before, after), after
                if clean or spent >= guard_s:
                    record["probe_ms"].append(round(after, 4))
                    record["unclean_blocks"] += not clean
                    break
                record["retimed_blocks"] += 1
                spent += time.perf_counter() - started
            blocks[name].append(times)
    if probe is not None and guarded is not None:
        guarded.update(guard, level_ms=round(probe.level_ms, 4), spent_s=round(spent, 3))
    return blocks


def block_samples(blocks: list[list[float]], statistic: str = "min") -> list[float]:
    """One sample per block: the block's ``statistic`` (see ``STATISTICS``)."""
    return [float(np.percentile(times, STATISTICS[statistic])) for times in blocks]
