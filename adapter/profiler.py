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

from adapter._profile_capture import CAPTURE as _CAPTURE
from adapter._profile_capture import Capture as _Capture
from adapter._profile_capture import Kernel as _Kernel
from adapter.errors import AdapterError

DEFAULT_BATCH_SIZES = (1, 4, 16)
ROOT_MODULE = "(root)"
"""Module label of nodes that belong to the top-level module itself (pooling, masks)."""
UNMAPPED = "(unmapped)"
"""Module label of backend nodes that could not be traced to any ONNX node."""
_PRECISION_PEAK = {"int8-dynamic": "int8", "int4-weight": "int8", "auto": "fp32"}


# ----------------------------------------------------------------------------- mapping and costs


VIEW_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}
"""ONNX ops whose output is their input seen with another shape: ONNX Runtime and OpenVINO
alias it, so no bytes are charged for them (OpenVINO's Reshape kernels and the Convert that
gap filling handed the shape subgraph read up to 87x the memory bandwidth when they were)."""


class _Graph:
    """The artifact's ONNX graph: nodes by name, producers, topological positions, costs."""

    def __init__(self, model, sizes: dict[str, int]) -> None:
        self.model = model
        self.sizes = sizes
        self.nodes = list(model.graph.all_nodes())
        self.by_name = {n.name: n for n in self.nodes if n.name}
        self.position = {n.name: i for i, n in enumerate(self.nodes)}
        self.producer = {v.name: n for n in self.nodes for v in n.outputs if v is not None}

    def cost(self, names: list[str]) -> tuple[int | None, int | None]:
        """Summed FLOPs and boundary bytes of a set of ONNX nodes (None when unknown)."""
        from adapter.op_library import node_cost
        from adapter.op_library._schema import tensor_of

        every = [self.by_name[n] for n in names if n in self.by_name]
        if not every:
            return None, None
        nodes = [n for n in every if n.op_type not in VIEW_OPS]
        if not nodes:  # only views: the engines alias them, nothing is computed or moved
            return 0, 0
        flops, known, summed_bytes = 0, len(nodes) < len(every), 0  # views: known, 0 FLOPs
        for node in nodes:
            try:
                cost = node_cost(node, self.sizes)
            except KeyError:
                continue
            known = True
            flops += cost.flops or 0
            summed_bytes += cost.bytes or 0
        inside = {id(n) for n in nodes}
        crossing: dict[str, Any] = {}
        for node in nodes:
            for value in node.inputs:
                if value is not None and (value.producer() is None or id(value.producer()) not in inside):
                    crossing[value.name] = value
            for value in node.outputs:
                if value is None:
                    continue
                outside = any(id(use[0]) not in inside for use in value.uses()) or value.is_graph_output()
                if outside:
                    crossing[value.name] = value
        tensors = [tensor_of(v, self.sizes) for v in crossing.values()]
        boundary = sum(t.nbytes for t in tensors if t is not None) if all(t is not None for t in tensors) else None
        if len(nodes) == 1 or boundary is None:
            boundary = summed_bytes if known else boundary
        return (flops if known else None), boundary

    def module(self, names: list[str]) -> str | None:
        """The module most of the covered work belongs to (by FLOPs, then bytes, then count)."""
        from adapter.backends.base import module_of

        weight: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
        for name in names:
            node = self.by_name.get(name)
            if node is None:
                continue
            flops, nbytes = self.cost([name])
            entry = weight[module_of(node) or ROOT_MODULE]
            entry[0] += flops or 0
            entry[1] += nbytes or 0
            entry[2] += 1
        if not weight:
            return None
        return max(weight.items(), key=lambda kv: kv[1])[0]


def _map_tensors(capture: _Capture, graph: _Graph) -> None:
    """ONNX Runtime: a node kept by name is itself; a fused one covers the ONNX nodes between
    its output tensors and the tensors that still exist in the graph ONNX Runtime ran."""
    structure, boundary = capture.structure, capture.boundary
    taken: set[str] = set()
    for kernel in capture.kernels:
        if kernel.name in graph.by_name:
            kernel.claims = [kernel.name]
            taken.add(kernel.name)
    for kernel in capture.kernels:
        if kernel.name in graph.by_name:
            continue
        _, outputs = structure.get(kernel.name, ([], []))
        todo = [graph.producer[t] for t in outputs if t in graph.producer]
        claims: list[str] = []
        while todo:
            node = todo.pop()
            if node.name in taken:
                continue
            taken.add(node.name)
            claims.append(node.name)
            for value in node.inputs:
                if value is None or value.name in boundary:
                    continue
                producer = graph.producer.get(value.name)
                if producer is not None:
                    todo.append(producer)
        kernel.claims = claims


_MATMUL_KERNELS = {"FullyConnected"}
"""OpenVINO node types built around a MatMul/Gemm of the ONNX graph."""
_MOVEMENT_KERNELS = {"Convert", "Reorder", "Reshape", "Transpose", "Concatenation", "Broadcast"}
"""OpenVINO node types that only move or convert data: never charged FLOPs by gap filling."""
_COMPUTE_KERNELS = {"FullyConnected", "MatMul", "Subgraph", "Convolution", "Gemm"}
"""OpenVINO node types that do matrix products (Subgraph: its fused attention kernels)."""


def _claim_matmuls(capture: _Capture, graph: _Graph) -> None:
    """Give a MatMul-based backend node the MatMul it fused when its name list lost it.

    OpenVINO's FullyConnected for ``MatMul → Add(bias) → Gelu`` lists only the Add and
    the Gelu in ``originalLayersNames``; the MatMul left over would otherwise be handed to
    a neighbouring node (a Convert then "did" 151 MFLOP at 400x the machine's peak).
    """
    claimed = {n for k in capture.kernels for n in k.claims}
    for kernel in capture.kernels:
        if kernel.op_type not in _MATMUL_KERNELS:
            continue
        nodes = [graph.by_name[n] for n in kernel.claims if n in graph.by_name]
        if any(n.op_type in ("MatMul", "Gemm") for n in nodes):
            continue
        for node in sorted(nodes, key=lambda n: graph.position[n.name]):
            producers = [v.producer() for v in node.inputs if v is not None and v.producer() is not None]
            found = [p for p in producers if p.op_type in ("MatMul", "Gemm") and p.name and p.name not in claimed]
            if found:
                kernel.claims = [found[0].name, *kernel.claims]
                claimed.add(found[0].name)
                break
    # Matrix products still unclaimed (attention's Q·Kᵀ inside a Subgraph that names only
    # some of its nodes) go to a compute kernel of the same module, not to whatever
    # backend node happens to sit in the gap around them; so do the transposes of Q and K
    # the Subgraph fused (given to a Convert, 1.5 MB each made it read 119x the bandwidth).
    from adapter.backends.base import module_of

    by_module: dict[str, _Kernel] = {}
    for kernel in capture.kernels:
        if kernel.op_type in _COMPUTE_KERNELS:
            for name in kernel.claims:
                if name in graph.by_name:
                    by_module.setdefault(module_of(graph.by_name[name]), kernel)
    for node in graph.nodes:
        if node.op_type in ("MatMul", "Gemm", "Transpose") and node.name and node.name not in claimed:
            host = by_module.get(module_of(node))
            if host is not None:
                host.claims = [*host.claims, node.name]
                claimed.add(node.name)


def _fill_gaps(capture: _Capture, graph: _Graph, idle: Iterable[str] = ()) -> None:
    """Give ONNX nodes no backend node claims to the unmapped backend nodes that ran between
    the neighbours' ONNX nodes (OpenVINO's MVN for a LayerNormalization, and the like)."""
    claimed = {n for k in capture.kernels for n in k.claims if n in graph.position} | set(idle)
    kernels = capture.kernels
    for kernel in kernels:
        kernel.claims = [n for n in kernel.claims if n in graph.position]
    index = 0
    while index < len(kernels):
        if kernels[index].claims:
            index += 1
            continue
        end = index
        while end < len(kernels) and not kernels[end].claims:
            end += 1
        low = max((graph.position[n] for n in kernels[index - 1].claims), default=-1) if index else -1
        high = (
            min((graph.position[n] for n in kernels[end].claims), default=len(graph.nodes))
            if end < len(kernels)
            else len(graph.nodes)
        )
        free = [n.name for n in graph.nodes[low + 1 : high] if n.name and n.name not in claimed]
        gap = kernels[index:end]
        if not any(k.op_type in _COMPUTE_KERNELS for k in gap):
            # matrix products left over go to the nearest compute kernel, not to a Convert
            heavy = [n for n in free if graph.by_name[n].op_type in ("MatMul", "Gemm")]
            near = [k for k in (kernels[index - 1] if index else None, kernels[end] if end < len(kernels) else None)]
            host = next((k for k in near if k is not None and k.op_type in _COMPUTE_KERNELS), None)
            if heavy and host is not None:
                host.claims = [*host.claims, *heavy]
                claimed.update(heavy)
                free = [n for n in free if n not in heavy]
        for i, kernel in enumerate(gap):  # split the free nodes in order over the gap's kernels
            share = free[i * len(free) // len(gap) : (i + 1) * len(free) // len(gap)]
            if kernel.op_type in _MOVEMENT_KERNELS:  # a Convert or Reorder does no arithmetic
                share = [n for n in share if not graph.cost([n])[0]]
            kernel.claims = share
            claimed.update(share)
        index = end


def _tvm_cost(kernel: _Kernel) -> tuple[int | None, int | None]:
    shapes = kernel.arg_shapes
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int8": 1, "uint8": 1, "bool": 1}
    nbytes = sum(math.prod(s) * itemsize.get(d, 4) for s, d in shapes)
    flops = None
    if ("matmul" in kernel.op_type or "dense" in kernel.op_type) and len(shapes) >= 2 and shapes[0][0]:
        k = shapes[0][0][-1]
        flops = 2 * math.prod(shapes[-1][0]) * k
    return flops, nbytes


# ----------------------------------------------------------------------------- report rows


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
    from adapter.specs import Dim

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


def _rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _memory(graph: _Graph) -> dict[str, Any]:
    """Weights (initializer bytes) and the peak of live activations walking the graph in order."""
    from adapter.op_library._schema import tensor_of

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


def _precision(manifest: dict[str, Any], profile) -> str:
    mode = (manifest.get("precision") or {}).get("mode", "fp32")
    executed = manifest["backend"]["config"].get("executed_precision") or manifest["backend"]["config"].get("precision")
    if manifest["backend"]["name"] == "openvino" and executed in ("bf16", "f16"):
        mode = {"bf16": "bf16", "f16": "fp16"}[executed]
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
    import onnx_ir as ir

    from adapter import artifact
    from adapter.api import load
    from adapter.profiles import Profile

    path = Path(path)
    metrics = set(metrics)
    manifest = artifact.validate(path)
    backend = manifest["backend"]["name"]
    if backend not in _CAPTURE:
        raise AdapterError(
            f"Profiling '{backend}' engines is not supported (artifact '{path}').",
            f"Profile an engine built with one of: {', '.join(_CAPTURE)}.",
        )
    profile = Profile.from_dict(manifest["target"]["profile"], origin=f"{path}/manifest.json")
    precision = _precision(manifest, profile)
    roof = _Roof(profile.peak(precision), profile.memory_bandwidth)
    rss_before = _rss_bytes()
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
                rss_after = _rss_bytes()
                memory = {"rss_delta_bytes": (rss_after - rss_before) if rss_before and rss_after else None}
            folder = Path(tmp) / f"run{pid}"
            folder.mkdir()
            capture = _CAPTURE[backend](engine, feed, warmup, runs_here, folder, between)
            end_to_end = statistics.median(samples)
            graph = _Graph(model, sizes)
            if backend == "onnxruntime":
                _map_tensors(capture, graph)
                _fill_gaps(capture, graph)
            elif backend == "openvino":
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
            from adapter._precision import PrecisionOptions
            from adapter.api import ConvertOptions, convert, default_output
            from adapter.artifact import cache_root

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
