"""Per-node timings from each backend's own profiler, for ``adapter.profile.profiler``.

ONNX Runtime's profiling session, OpenVINO's performance counters and TVM's VM
instrumentation each give a :class:`Capture`: per backend node its times in every
profiled run and the ONNX nodes it claims (see ``adapter/profiler.py`` for how they are
mapped, costed and placed on the roofline).
"""

from __future__ import annotations

__all__ = ["CAPTURE", "Capture", "Kernel"]

import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from adapter.backends.base import threads_for
from adapter.backends.onnxruntime import open_session, session_options
from adapter.core.errors import AdapterError


@dataclass
class Kernel:
    """One backend node: its timings in each profiled run and the ONNX nodes it covers."""

    name: str
    op_type: str
    durations_us: list[float] = field(default_factory=list)
    starts_us: list[float] = field(default_factory=list)
    claims: list[str] = field(default_factory=list)
    arg_shapes: list[tuple[tuple[int, ...], str]] = field(default_factory=list)
    summary_us: float | None = None
    """The node's figure when the backend's own counters give a better one than the
    median of ``durations_us`` (OpenVINO: the mean, exact from its running totals)."""


@dataclass
class Capture:
    kernels: list[Kernel]
    totals_ms: list[float]
    mapped: bool = True
    note: str = ""
    structure: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)
    """ONNX Runtime: the graph it ran, node name to (input, output) tensor names."""
    boundary: set[str] = field(default_factory=set)
    """ONNX Runtime: every tensor name that still exists in the graph it ran."""
    idle: list[str] = field(default_factory=list)
    """OpenVINO: ONNX nodes folded into runtime nodes that did not execute (reshapes, constants)."""


def _run_windows(events: list[dict]) -> list[tuple[float, float]]:
    runs = sorted(
        (e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"
    )
    return runs


def _blocks(repeats: int, between: Callable[[], None], rounds: int = 5) -> Iterator[int]:
    """Split ``repeats`` into up to ``rounds`` blocks, calling ``between`` before each (the
    end-to-end timing runs there, so both see the same background load)."""
    rounds = max(1, min(rounds, repeats))
    sizes = [repeats // rounds + (1 if i < repeats % rounds else 0) for i in range(rounds)]
    for size in sizes:
        between()
        yield size


def _ort_capture(engine, feed, warmup: int, repeats: int, tmp: Path, between: Callable[[], None]) -> Capture:
    import onnx

    config = engine.config
    opts = session_options(config.get("optimization", "all"), threads_for(config.get("threads", 0), None))
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp / "ort-profile")
    runtime_graph = tmp / "runtime-graph.onnx"
    opts.optimized_model_filepath = str(runtime_graph)
    model_path = getattr(engine.session, "_model_path", None) or str(engine.folder / "model.onnx")
    try:
        session = open_session(model_path, opts)
        for _ in range(warmup):
            session.run(None, feed)
        for block in _blocks(repeats, between):
            for _ in range(block):
                session.run(None, feed)
        trace = Path(session.end_profiling())
    except Exception as exc:
        raise AdapterError(
            f"ONNX Runtime's profiler failed on '{model_path}': {str(exc).splitlines()[0][:300]}",
            "Check that the artifact runs with `adapter run`.",
        ) from exc
    events = json.loads(trace.read_text())
    windows = _run_windows(events)[warmup:]
    nodes = sorted(
        (e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
        key=lambda e: e["ts"],
    )
    kernels: dict[str, Kernel] = {}
    totals = []
    for start, end in windows:
        totals.append((end - start) / 1e3)
        for event in nodes:
            if start <= event["ts"] <= end:
                name = event["name"].removesuffix("_kernel_time")
                kernel = kernels.setdefault(name, Kernel(name, event.get("args", {}).get("op_name", "?")))
                kernel.durations_us.append(float(event["dur"]))
                kernel.starts_us.append(float(event["ts"] - start))
    graph = onnx.load(str(runtime_graph), load_external_data=False).graph
    structure = {n.name: (list(n.input), list(n.output)) for n in graph.node}
    boundary = {t for ins, outs in structure.values() for t in (*ins, *outs)}
    boundary |= {v.name for v in graph.input} | {t.name for t in graph.initializer}
    ordered = sorted(kernels.values(), key=lambda k: statistics.median(k.starts_us))
    for kernel in ordered:
        kernel.claims = [kernel.name]  # resolved against the ONNX graph in _map_tensors
    return Capture(ordered, totals, structure=structure, boundary=boundary)


def _ov_capture(engine, feed, warmup: int, repeats: int, tmp: Path, between: Callable[[], None]) -> Capture:
    import openvino as ov

    config = engine.config
    properties = {
        "INFERENCE_PRECISION_HINT": config["precision"],
        "PERFORMANCE_HINT": config["performance_hint"],
        "INFERENCE_NUM_THREADS": int(config["threads"]),
        "NUM_STREAMS": int(config["streams"]),
        "PERF_COUNT": True,
    }
    try:
        compiled = ov.Core().compile_model(str(engine.folder / "model.onnx"), config["device"], properties)
        request = compiled.create_infer_request()
        # The CPU plugin's counters are each node's running average (whole µs) over every
        # time it executed since compile, not the last run's time: a node's total is its
        # average × its executions (counted here after every inference, warm-up included:
        # shape subgraphs run only while shapes change), per-run times are differences of
        # totals, and a node's figure is its mean over the profiled runs.
        executions: dict[str, int] = defaultdict(int)
        for _ in range(warmup):
            request.infer(feed)
            _ov_totals(request, executions)
        start = _ov_totals(request, executions, advance=False)
        before = dict(start)
        kernels: dict[str, Kernel] = {}
        totals = []
        for _ in (step for block in _blocks(repeats, between) for step in range(block)):
            started = time.perf_counter()
            request.infer(feed)
            totals.append((time.perf_counter() - started) * 1e3)
            now = _ov_totals(request, executions)
            offset = 0.0
            for name, (node_type, total_us, ran) in now.items():
                if not ran:
                    continue
                micros = max(0.0, total_us - _total_us(before, name))
                kernel = kernels.setdefault(name, Kernel(name, node_type))
                kernel.durations_us.append(micros)
                kernel.starts_us.append(offset)  # OpenVINO gives no start times: laid out in order
                offset += micros
            before.update(now)
        for name, kernel in kernels.items():
            # clamped: whole-µs averages of a node that takes ~1 µs can step down between looks
            kernel.summary_us = max(0.0, _total_us(before, name) - _total_us(start, name)) / len(totals)
        runtime = compiled.get_runtime_model()
    except Exception as exc:
        raise AdapterError(
            f"OpenVINO's performance counters failed: {str(exc).strip().splitlines()[0][:300]}",
            "Check that the artifact runs with `adapter run`.",
        ) from exc
    fused: dict[str, list[str]] = {}
    order: list[str] = []
    for op in runtime.get_ordered_ops():
        info = op.get_rt_info()
        names = info["originalLayersNames"].astype(str) if "originalLayersNames" in info else ""
        fused[op.get_friendly_name()] = [n for n in names.split(",") if n]
        order.append(op.get_friendly_name())
    for kernel in kernels.values():
        kernel.claims = fused.get(kernel.name, [kernel.name])
    position = {name: i for i, name in enumerate(order)}
    ordered = sorted(kernels.values(), key=lambda k: position.get(k.name, len(position)))
    executed = {k.name for k in ordered}
    idle = [n for name, names in fused.items() if name not in executed for n in names]
    note = "OpenVINO reports no start times; the trace lays nodes out in order"
    return Capture(ordered, totals, note=note, idle=idle)


def _total_us(totals: dict[str, tuple[str, float, bool]], name: str) -> float:
    """A node's total µs in an :func:`_ov_totals` look (0 before it first appears)."""
    return totals[name][1] if name in totals else 0.0


def _ov_totals(request, executions: dict[str, int], advance: bool = True) -> dict[str, tuple[str, float, bool]]:
    """Each node's type, total µs since compile and whether it ran in the last inference.

    ``executions`` counts each node's runs; ``advance`` counts this inference in (False
    for a second look at the same inference).
    """
    found = {}
    for info in request.get_profiling_info():
        ran = info.status == info.Status.EXECUTED
        if advance and ran:
            executions[info.node_name] += 1
        total = info.real_time.total_seconds() * 1e6 * executions.get(info.node_name, 0)
        found[info.node_name] = (info.node_type, total, ran)
    return found


def _tvm_capture(engine, feed, warmup: int, repeats: int, tmp: Path, between: Callable[[], None]) -> Capture:
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
        for _ in (step for block in _blocks(repeats, between) for step in range(block)):
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
    return Capture(kernels, [r[0] for r in runs], mapped=False, note=note)


def _no_instrument(*args) -> int:
    return 0


CAPTURE: dict[str, Callable[..., Capture]] = {
    "onnxruntime": _ort_capture,
    "openvino": _ov_capture,
    "tvm": _tvm_capture,
}
