"""Per-layer profiler: each backend's own per-node timings, costed by the op library and
placed on the target profile's roofline.

How each backend is measured:

- **ONNX Runtime**: a second session over the artifact's model with ``enable_profiling``
  (same optimisation level and threads as the engine). Its JSON holds one ``Node`` event
  per kernel per run (``dur`` in µs); runs are told apart by the ``model_run`` events. The
  session also saves the graph it ran (``optimized_model_filepath``), so nodes ONNX Runtime
  fused or renamed are mapped back to the artifact's ONNX nodes through tensor names.
- **OpenVINO**: the model compiled again with ``PERF_COUNT``; ``get_profiling_info()`` after
  each inference gives per executed node its real time, and the runtime model's
  ``originalLayersNames`` says which ONNX nodes each executed node fused.
- **TVM**: the Relax VM's instrumentation hook (``set_instrument``) timestamps every kernel
  call (TVM 0.27 has no ``profile=True`` VM any more). TVM's fused kernels keep no link to
  the ONNX nodes, so their FLOPs come from the argument shapes of matmul kernels only and
  they carry no module.

Every backend node gets the FLOPs and bytes of the ONNX nodes it covers (``node_cost`` with
the dims of the actual inputs; FLOPs summed; bytes are what crosses the covered set's
boundary, so a fused kernel is not charged for intermediates it never writes out), the
achieved FLOP/s and bytes/s, the arithmetic intensity and its roofline ceiling
``min(peak, bandwidth × intensity)`` from the artifact's target profile.
"""

from __future__ import annotations

__all__ = ["ProfileReport", "PerformanceAnalyzer", "profile_artifact", "group_module", "DEFAULT_BATCH_SIZES"]

import json
import math
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from adapter.backends import BACKENDS
from adapter.backends.profiling import Capture as _Capture
from adapter.converter.api import ConvertOptions, convert, default_output, load
from adapter.converter.precision import PrecisionOptions
from adapter.core import artifact
from adapter.core.artifact import cache_root
from adapter.core.errors import AdapterError
from adapter.core.mapped import resident_bytes
from adapter.core.specs import Dim
from adapter.op_library._schema import tensor_of
from adapter.profile.mapping import ROOT_MODULE, _claim_matmuls, _fill_gaps, _Graph, _map_tensors, _tvm_cost
from adapter.profiles import Profile

DEFAULT_BATCH_SIZES = (1, 4, 16)
UNMAPPED = "(unmapped)"
"""Module label of backend nodes that could not be traced to any ONNX node."""
_PRECISION_PEAK = {"int8-dynamic": "int8", "int4-weight": "int8", "auto": "fp32"}


@dataclass(frozen=True)
class _Roof:
    peak: float
    bandwidth: float

    @property
    def ridge(self) -> float:
        return self.peak / self.bandwidth

    def figures(self, ms: float, flops: int | None, nbytes: int | None) -> dict[str, Any]:
        seconds = ms / 1e3
        row: dict[str, Any] = {"flops": flops, "bytes": nbytes}
        intensity = flops / nbytes if flops is not None and nbytes else None
        row["intensity"] = intensity
        row["achieved_flops"] = flops / seconds if flops is not None and seconds > 0 else None
        row["achieved_bytes_per_s"] = nbytes / seconds if nbytes is not None and seconds > 0 else None
        if intensity is None:
            row.update(ceiling_flops=None, efficiency=None, bound=None)
            return row
        ceiling = min(self.peak, self.bandwidth * intensity)
        row["ceiling_flops"] = ceiling
        if ceiling > 0 and row["achieved_flops"] is not None:
            row["efficiency"] = row["achieved_flops"] / ceiling
        elif row["achieved_bytes_per_s"] is not None:  # no arithmetic: judged by bandwidth
            row["efficiency"] = row["achieved_bytes_per_s"] / self.bandwidth
        else:
            row["efficiency"] = None
        row["bound"] = "compute" if intensity >= self.ridge else "memory"
        return row


def group_module(module: str, depth: int | None) -> str:
    """The module path cut to ``depth`` dotted parts; ``None`` cuts one level below the first
    numbered block (``model.encoder.layer.0.attention.self`` → ``model.encoder.layer.0.attention``)."""
    if not module or module.startswith("("):
        return module or ROOT_MODULE
    parts = module.split(".")
    if depth is None:
        numbered = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        depth = numbered + 2 if numbered is not None else 2
    return ".".join(parts[: max(1, depth)])


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


# ----------------------------------------------------------------------------- inputs, memory


def _make_inputs(specs, batch: int, seq: int, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Inputs from the engine's specs: dims named like a batch take ``batch``, other named dims
    ``seq`` (clamped to their range); token ids are small ints, masks ones, floats normal."""
    rng = np.random.default_rng(seed)
    sizes: dict[str, int] = {}
    feed = {}
    for spec in specs:
        shape = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, Dim):
                wanted = (
                    batch if ("batch" in dim.name.lower() or (axis == 0 and "seq" not in dim.name.lower())) else seq
                )
                size = sizes.setdefault(dim.name, min(max(wanted, dim.min), dim.max))
                shape.append(size)
            else:
                shape.append(int(dim))
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            value = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            value = np.ones(shape, dtype)
        elif "mask" in spec.name.lower():
            value = np.ones(shape, dtype)
        else:
            value = rng.integers(0, 2, size=shape).astype(dtype)
        feed[spec.name] = value
    return feed, sizes


def _memory(graph: _Graph) -> dict[str, Any]:
    """Weights (initializer bytes) and the peak of live activations walking the graph in order."""
    model = graph.model
    weights = 0
    for value in model.graph.initializers.values():
        tensor = tensor_of(value, graph.sizes)
        weights += tensor.nbytes if tensor is not None else 0
    initializers = set(model.graph.initializers)
    remaining: dict[str, int] = {}
    for node in graph.nodes:
        for value in node.inputs:
            if value is not None and value.name not in initializers:
                remaining[value.name] = remaining.get(value.name, 0) + 1
    live: dict[str, int] = {}
    for value in model.graph.inputs:
        tensor = tensor_of(value, graph.sizes)
        live[value.name] = tensor.nbytes if tensor is not None else 0
    peak = sum(live.values())
    outputs = {v.name for v in model.graph.outputs}
    for node in graph.nodes:
        for value in node.outputs:
            if value is not None and value.name not in initializers:
                tensor = tensor_of(value, graph.sizes)
                live[value.name] = tensor.nbytes if tensor is not None else 0
        peak = max(peak, sum(live.values()))
        for value in node.inputs:
            if value is not None and value.name in remaining:
                remaining[value.name] -= 1
                if remaining[value.name] == 0 and value.name not in outputs:
                    live.pop(value.name, None)
    return {"weights_bytes": weights, "activation_peak_bytes_estimate": peak}


# ----------------------------------------------------------------------------- the report


@dataclass
class ProfileReport:
    """What :func:`profile_artifact` measured: ``to_json()`` is the stable data; ``trace()`` the timeline."""

    data: dict[str, Any]
    trace_events: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return self.data

    def trace(self) -> dict[str, Any]:
        """Chrome-trace / Perfetto JSON: one process per (batch, seq), one X event per node."""
        return {"traceEvents": self.trace_events, "displayTimeUnit": "ms"}

    @property
    def runs(self) -> list[dict[str, Any]]:
        return self.data["runs"]

    def coverage(self, run: int = 0) -> float:
        """Per-module sum over end-to-end latency for one run (1.0 = every millisecond attributed)."""
        entry = self.runs[run]
        return entry["sum_of_modules_ms"] / entry["end_to_end_ms"]

    def save(self, path: Path | str) -> None:
        Path(path).write_text(json.dumps(self.data, indent=2))


_EXECUTED = {"bf16": "bf16", "f16": "fp16"}
"""A backend's reported executed precision (element type names) to the mode whose peak applies."""


def _precision(manifest: dict[str, Any], profile) -> str:
    mode = (manifest.get("precision") or {}).get("mode", "fp32")
    # what the engine reported running (OpenVINO's inference precision, e.g. bf16 on AMX or
    # AVX512_BF16 whatever the plan's mode) decides the roofline's peak
    executed = manifest["backend"]["config"].get("executed_precision")
    mode = _EXECUTED.get(executed, mode)
    key = _PRECISION_PEAK.get(mode, mode)
    return key if key in profile.peak_flops else "fp32"


def profile_artifact(
    path: Path | str,
    batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES,
    seq: int = 128,
    group_depth: int | None = None,
    warmup: int = 3,
    repeats: int | None = None,
    metrics: Iterable[str] = ("latency",),
) -> ProfileReport:
    """Profile an engine artifact per node and per module at each batch size.

    Args:
        path: The artifact folder.
        batch_sizes: Batch sizes to run (a fixed-shape engine runs its own shape only).
        seq: Length given to named non-batch dims (sequence inputs).
        group_depth: Module path parts to group by; None groups one level below the first
            numbered block (the layer level).
        warmup: Unprofiled runs before the profiled ones.
        repeats: Profiled runs per batch size (each node's latency is its median over them,
            OpenVINO's its mean); None: enough for about ``PROFILE_SECONDS`` of engine time,
            10 to 100 runs (batch 1 of a small model is noisy over 10).
        metrics: ``latency`` always; ``throughput`` adds samples/s per run, ``memory`` weights,
            an activation peak estimate and the RSS delta of loading and a first run.

    Raises:
        AdapterError: The artifact is damaged, its backend has no profiler here, or running fails.
    """
    path = Path(path)
    metrics = set(metrics)
    manifest = artifact.validate(path)
    backend = manifest["backend"]["name"]
    hook = BACKENDS[backend].CAPTURE if backend in BACKENDS else None
    if hook is None:
        profilable = [name for name, b in BACKENDS.items() if b.CAPTURE is not None]
        raise AdapterError(
            f"Profiling '{backend}' engines is not supported (artifact '{path}').",
            f"Profile an engine built with one of: {', '.join(profilable)}.",
        )
    profile = Profile.from_dict(manifest["target"]["profile"], origin=f"{path}/manifest.json")
    precision = _precision(manifest, profile)
    roof = _Roof(profile.peak(precision), profile.memory_bandwidth)
    rss_before = resident_bytes()
    engine = load(path, check=False)
    model = ir.load(path / "model.onnx")
    fixed = all(not hasattr(d, "name") for s in engine.inputs for d in s.shape)
    shapes = [(None, None)] if fixed else [(b, seq) for b in batch_sizes]
    runs, events, memory = [], [], None
    with tempfile.TemporaryDirectory(prefix="adapter-profile-") as tmp:
        for pid, (batch, length) in enumerate(shapes):
            feed, sizes = _make_inputs(engine.inputs, batch or 1, length or seq)
            if fixed:
                first = next(iter(feed.values()))
                batch, length = (
                    int(first.shape[0]) if first.ndim else 1,
                    (int(first.shape[1]) if first.ndim > 1 else None),
                )
            samples: list[float] = []
            for _ in range(warmup):
                engine.run(feed)
            runs_here = repeats or _repeats_for(lambda feed=feed: engine.run(feed))
            per_block = max(2, runs_here // 5)

            def between(feed=feed, samples=samples, per_block=per_block) -> None:
                engine.run(feed)  # one unmeasured call: the other runtime's threads settle
                for _ in range(per_block):
                    started = time.perf_counter()
                    engine.run(feed)
                    samples.append((time.perf_counter() - started) * 1e3)

            if memory is None and "memory" in metrics:
                rss_after = resident_bytes()
                memory = {"rss_delta_bytes": (rss_after - rss_before) if rss_before and rss_after else None}
            folder = Path(tmp) / f"run{pid}"
            folder.mkdir()
            capture = hook(engine, feed, warmup, runs_here, folder, between)
            end_to_end = statistics.median(samples)
            graph = _Graph(model, sizes)
            if capture.mapping == "tensors":
                _map_tensors(capture, graph)
                _fill_gaps(capture, graph)
            elif capture.mapping == "fused":
                _claim_matmuls(capture, graph)
                _fill_gaps(capture, graph, capture.idle)
            if memory is not None and "weights_bytes" not in memory:
                memory.update(_memory(graph))
                memory["activation_basis"] = (
                    f"op-library shapes at batch {batch}, seq {length}, liveness in graph order"
                )
            entry, run_events = _summarise(capture, graph, roof, group_depth, pid)
            entry = {
                "batch": batch,
                "seq": length,
                "inputs": {k: list(v.shape) for k, v in feed.items()},
                "end_to_end_ms": end_to_end,
                "profiled_runs": runs_here,
                "end_to_end_runs": len(samples),
                **entry,
            }
            if "throughput" in metrics:
                entry["throughput_per_s"] = (batch or 1) / (end_to_end / 1e3)
            runs.append(entry)
            events.append(
                {"name": "process_name", "ph": "M", "pid": pid, "args": {"name": f"batch {batch} seq {length}"}}
            )
            events.extend(run_events)
    data: dict[str, Any] = {
        "artifact": str(path),
        "backend": backend,
        "target": manifest["target"]["name"],
        "precision": precision,
        "ceilings": {"peak_flops": roof.peak, "memory_bandwidth": roof.bandwidth, "ridge_intensity": roof.ridge},
        "runs": runs,
    }
    if memory is not None:
        data["memory"] = memory
    return ProfileReport(data, events)


PROFILE_SECONDS = 1.5
"""Engine time the default number of profiled runs aims at, per batch size."""


def _repeats_for(run: Callable[[], object]) -> int:
    """Profiled runs for about PROFILE_SECONDS of engine time, from one timed run (10-100)."""
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    return int(min(100, max(10, math.ceil(PROFILE_SECONDS / max(seconds, 1e-6)))))


def _summarise(capture: _Capture, graph: _Graph, roof: _Roof, depth: int | None, pid: int):
    rows = []
    previous_module = ROOT_MODULE
    for kernel in capture.kernels:
        ms = (kernel.summary_us if kernel.summary_us is not None else _median(kernel.durations_us)) / 1e3
        if capture.mapped:
            flops, nbytes = graph.cost(kernel.claims)
            module = graph.module(kernel.claims) or previous_module
        else:
            (flops, nbytes), module = _tvm_cost(kernel), UNMAPPED
        previous_module = module
        rows.append(
            {
                "name": kernel.name,
                "op_type": kernel.op_type,
                "module": module,
                "ms": ms,
                "kernel": kernel,
                **roof.figures(ms, flops, nbytes),
            }
        )
    total = sum(r["ms"] for r in rows) or 1.0
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        row["share"] = row["ms"] / total
        groups[group_module(row["module"], depth)].append(row)
    modules = []
    for name, members in groups.items():
        ms = sum(r["ms"] for r in members)
        flops = sum(r["flops"] for r in members if r["flops"] is not None)
        known_flops = any(r["flops"] is not None for r in members)
        nbytes = sum(r["bytes"] for r in members if r["bytes"] is not None)
        modules.append(
            {
                "module": name,
                "ms": ms,
                "share": ms / total,
                **roof.figures(ms, flops if known_flops else None, nbytes or None),
                "nodes": [r["name"] for r in members],
            }
        )
    modules.sort(key=lambda m: -m["ms"])
    events = []
    durations = [
        sum(k.durations_us[i] for k in capture.kernels if i < len(k.durations_us))
        for i in range(len(capture.totals_ms))
    ]
    pick = sorted(range(len(durations)), key=lambda i: durations[i])[len(durations) // 2] if durations else 0
    for row in rows:
        kernel = row.pop("kernel")
        if pick < len(kernel.starts_us):
            events.append(
                {
                    "name": row["name"],
                    "cat": row["op_type"],
                    "ph": "X",
                    "pid": pid,
                    "tid": 0,
                    "ts": kernel.starts_us[pick],
                    "dur": kernel.durations_us[pick],
                    "args": {"op": row["op_type"], "module": row["module"], "flops": row["flops"]},
                }
            )
    ordered = [
        "name",
        "op_type",
        "module",
        "ms",
        "share",
        "flops",
        "bytes",
        "intensity",
        "achieved_flops",
        "achieved_bytes_per_s",
        "ceiling_flops",
        "efficiency",
        "bound",
    ]
    nodes = [{k: r[k] for k in ordered} for r in sorted(rows, key=lambda r: -r["ms"])]
    entry = {
        "profiled_total_ms": _median(capture.totals_ms),
        "sum_of_modules_ms": sum(m["ms"] for m in modules),
        "nodes": nodes,
        "modules": modules,
    }
    if capture.note:
        entry["note"] = capture.note
    return entry, events


# ----------------------------------------------------------------------------- notebook API


class PerformanceAnalyzer:
    """Profile a model for a target from a notebook or script.

    Args:
        model_path: An artifact folder, or a model source (``adapter.zoo:minilm``, a factory,
            an HF folder, ``.pt2``, ``.onnx``) that is converted first.
        target_device: Target profile name or file (used when converting).
        precision: Precision mode (used when converting).
        backend: Backend name (used when converting); None takes the profile's default.

    Example:
        >>> report = PerformanceAnalyzer("adapter.zoo:minilm").analyze(batch_sizes=[1, 4])
        >>> report.to_json()["runs"][0]["modules"][0]["module"]
    """

    def __init__(
        self, model_path: str | Path, target_device: str = "host", precision: str = "fp32", backend: str | None = None
    ) -> None:
        self.source = str(model_path)
        self.target_device = target_device
        self.precision = precision
        self.backend = backend
        self._artifact: Path | None = Path(model_path) if (Path(model_path) / "manifest.json").is_file() else None

    @property
    def artifact(self) -> Path:
        """The artifact folder, converting the source on first use (cached by adapter's engine cache)."""
        if self._artifact is None:
            options = ConvertOptions(
                target=self.target_device, backend=self.backend, precision=PrecisionOptions(mode=self.precision)
            )
            output = cache_root() / "analyzer" / default_output(self.source, self.target_device).name
            self._artifact = convert(self.source, output, options).path
        return self._artifact

    def analyze(
        self,
        metrics: Iterable[str] = ("latency", "throughput", "memory"),
        batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES,
        seq: int = 128,
        group_depth: int | None = None,
        repeats: int | None = None,
    ) -> ProfileReport:
        """Profile at each batch size; see :func:`profile_artifact` for the figures."""
        unknown = set(metrics) - {"latency", "throughput", "memory"}
        if unknown:
            raise AdapterError(f"Unknown metric(s): {', '.join(sorted(unknown))}.", "Use latency, throughput, memory.")
        return profile_artifact(self.artifact, batch_sizes, seq, group_depth, repeats=repeats, metrics=metrics)
