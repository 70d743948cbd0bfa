"""The TVM backend's profiler hook: each VM kernel call timed through the VM's instrument."""

from __future__ import annotations

__all__ = ["capture"]

import time
from collections.abc import Callable
from pathlib import Path

from adapter.backends.profiling import Capture, Kernel, blocks
from adapter.core.errors import AdapterError


def capture(engine, feed, warmup: int, repeats: int, tmp: Path, between: Callable[[], None]) -> Capture:
    if not engine.runs_here:
        raise AdapterError(
            f"This TVM engine is built for {engine.config['target']}, which is not this machine, so it cannot be profiled here.",
            "Profile it on such a machine, or profile an llvm build for this CPU.",
        )
    args = engine.vm_args(feed)
    vm = engine._vm
    calls: list[tuple[str, float, float, list]] = []
    stack: list[float] = []

    def instrument(func, symbol, before_run, ret_value, *call_args):
        now = time.perf_counter()
        if before_run:
            stack.append(now)
        else:
            shapes = [(tuple(int(d) for d in a.shape), str(a.dtype)) for a in call_args if hasattr(a, "shape")]
            calls.append((str(symbol), stack.pop(), now, shapes))
        return 0  # VMInstrumentReturnKind.NO_OP

    try:
        for _ in range(warmup):
            vm["main"](*args)
        runs = []
        for _ in (step for block in blocks(repeats, between) for step in range(block)):
            vm.set_instrument(instrument)
            calls.clear()
            started = time.perf_counter()
            vm["main"](*args)
            runs.append(((time.perf_counter() - started) * 1e3, started, list(calls)))
            vm.set_instrument(_no_instrument)
    except Exception as exc:
        raise AdapterError(f"TVM failed while profiling the engine: {str(exc).strip().splitlines()[-1][:300]}") from exc
    finally:
        vm.set_instrument(_no_instrument)
    kernels: list[Kernel] = []
    for _total, started, run_calls in runs:
        for index, (symbol, t0, t1, shapes) in enumerate(run_calls):
            if index >= len(kernels):
                kernels.append(Kernel(f"{symbol}#{index}", symbol, arg_shapes=shapes))
            kernels[index].durations_us.append((t1 - t0) * 1e6)
            kernels[index].starts_us.append((t0 - started) * 1e6)
    note = "TVM kernels keep no link to ONNX nodes: FLOPs only for matmul kernels (from their arguments), no modules"
    return Capture(kernels, [r[0] for r in runs], note=note)


def _no_instrument(*args) -> int:
    return 0
