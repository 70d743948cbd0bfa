"""ONNX Runtime backend (CPU execution provider here).

Compiling writes the passes' ONNX, lets ONNX Runtime apply its portable (extended)
graph optimisations once and saves that optimised model in the artifact; loading
runs the saved model with the full optimisation level (layout transforms that depend
on the machine are applied at load). Threads come from the target profile.
"""

from __future__ import annotations

__all__ = [
    "NAME", "PASSES", "DISABLED_OPTIMIZERS", "Options", "version", "require", "supports", "session_options",
    "open_session", "compile", "Engine",
]  # fmt: skip

import functools
import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from adapter.backends import _ort_decoder
from adapter.backends.base import EngineBase, Support, profile_options, require_module, threads_for
from adapter.backends.profiling import Capture, Kernel, blocks
from adapter.core import safety as _safety
from adapter.core.errors import AdapterError
from adapter.core.onnx_io import save_model
from adapter.core.specs import TensorSpec

NAME = "onnxruntime"
PROVIDER = "CPUExecutionProvider"
MODEL_FILE = "model.onnx"
PASSES = ("fusion-ort",)
"""Fusion pipeline run on this backend's copy of the canonical graph: ONNX Runtime's com.microsoft fused ops (Attention, BiasGelu, ...)."""
PRECISIONS = frozenset({"fp32", "fp16", "int8", "int8-dynamic", "fp8", "int4-weight"})
"""Precision modes it builds (the contract: ``adapter.backends.base.Backend``)."""
EMULATES = frozenset({"fp16"})
"""FP16 runs through Casts where the CPU has no FP16 arithmetic."""
AUTO_KINDS = frozenset({"cpu", "gpu"})
FIXED_SHAPES = False
BUILD_OPTIONS = frozenset()
DEVICE = "cpu"
STAND_IN = False
EXTRA = ""
OPTIMIZED_FILE = "model.ort-optimized.onnx"

DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
"""ONNX Runtime graph optimisers left off at compile and load: its own Add +
LayerNormalization -> SkipLayerNormalization fusion, whose CPU kernel is the slower one
(see ``adapter.passes.fusion.normalization.ORT_STAGES``)."""

_GRAPH_LEVEL_OPS = frozenset({"Constant"})
"""Ops ONNX Runtime resolves while loading the graph, with no kernel of their own."""

_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


@dataclass(frozen=True)
class Options:
    """Session settings; defaults come from the target profile."""

    threads: int = 0
    """Intra-op threads; 0 means the profile's thread count, capped at the cores available."""
    optimization: str = "all"
    """Graph optimisation level at load: disable, basic, extended or all."""
    save_optimized: bool = True
    """Save ONNX Runtime's portable optimised model in the artifact and load that."""
    mapped: bool = False
    """Weights in an external-data file that the session maps, never copied: no prepacked
    copies of the matrices (``session.disable_prepacking``) and no saved optimised model. A
    rank of a sharded decoder then holds its shard once (its mapped pages) instead of twice
    while loading; decode (one token: matrix-vector products) barely uses prepacking."""

    @classmethod
    def from_profile(cls, profile: Any, overrides: dict[str, Any] | None = None) -> Options:
        return profile_options(cls, NAME, profile, overrides)


def require() -> None:
    """Raise a clear error when onnxruntime is missing."""
    require_module("onnxruntime", NAME, "pip install onnxruntime==1.32.0")


def version() -> str:
    from importlib import metadata

    return metadata.version("onnxruntime")


@functools.cache
def _kernels() -> dict[tuple[str, str], list[tuple[int, int]]]:
    from onnxruntime.capi import _pybind_state as C

    table: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for kernel in C.get_all_opkernel_def():
        if kernel.provider == PROVIDER:
            domain = "" if kernel.domain == "ai.onnx" else kernel.domain
            table.setdefault((domain, kernel.op_name), []).append(tuple(kernel.version_range))
    return table


def supports(node: ir.Node, model: ir.Model, profile: Any = None) -> Support:
    """Whether the CPU provider has a kernel for the node's op at the model's opset."""
    if (node.domain, node.op_type, node.overload) in model.functions:
        return Support(True)
    if node.domain == "" and node.op_type in _GRAPH_LEVEL_OPS:
        return Support(True)
    ranges = _kernels().get((node.domain, node.op_type))
    if not ranges:
        where = f"domain '{node.domain}'" if node.domain else "the standard domain"
        return Support(False, f"ONNX Runtime {version()} has no CPU kernel for this op in {where}")
    opset = model.opset_imports.get(node.domain, model.opset_imports.get("ai.onnx"))
    if opset is not None and not any(lo <= opset <= hi for lo, hi in ranges):
        return Support(False, f"no CPU kernel at opset {opset} (kernels cover {sorted(ranges)})")
    return Support(True)


def session_options(level: str, threads: int):
    """The engine's session settings: optimisation level, threads, sequential execution."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return opts


def open_session(path: Path | str, opts):
    """A CPU-provider session over ``path`` with the engine's graph optimisers (``DISABLED_OPTIMIZERS`` off)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), opts, providers=[PROVIDER], disabled_optimizers=list(DISABLED_OPTIMIZERS))


def _session(path: Path, level: str, threads: int, optimized_out: Path | None = None, mapped: bool = False):
    opts = session_options(level, threads)
    if mapped:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if optimized_out is not None:
        opts.optimized_model_filepath = str(optimized_out)
    _safety.check_onnx_file(path)
    try:
        return open_session(path, opts)
    except Exception as exc:
        raise AdapterError(
            f"ONNX Runtime could not create a session for '{path}': {str(exc).splitlines()[0][:400]}",
            "Run `adapter check` on the source to see which nodes the backend refuses.",
        ) from exc


def compile(
    model: ir.Model, profile: Any, options: Options, specs: tuple[list[TensorSpec], list[TensorSpec]], workdir: Path
) -> Engine:
    """Write the model into ``workdir`` and build a session for the profile."""
    if options.optimization not in _LEVELS:
        raise AdapterError(
            f"Unknown ONNX Runtime optimisation level '{options.optimization}'.", f"Use one of {', '.join(_LEVELS)}."
        )
    workdir.mkdir(parents=True, exist_ok=True)
    files = save_model(model, workdir / MODEL_FILE, external=options.mapped)
    threads = threads_for(options.threads, profile)
    config: dict[str, Any] = {
        **asdict(options),
        "threads": threads,
        "provider": PROVIDER,
        "files": files,
        "ort_version": version(),
    }
    if options.save_optimized and not options.mapped:
        _session(workdir / MODEL_FILE, "extended", threads, workdir / OPTIMIZED_FILE)
        config["optimized_file"] = OPTIMIZED_FILE
        config["files"] = files + [OPTIMIZED_FILE]
    if any(n.op_type in _QUANTIZED_OPS for n in model.graph.all_nodes()):
        config["kernel_precisions"], config["layer_precisions"] = kernel_precisions(model, workdir, options, threads)
    return Engine(workdir, specs[0], specs[1], config)


_QUANTIZED_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulNBits", "MatMulInteger"}
)
"""A graph with one of these gets its kernels read back (a plain FP32 graph is not worth a
second session)."""
_KERNEL_PRECISION = {
    "QLinearMatMul": "i8", "MatMulInteger": "i8", "MatMulIntegerToFloat": "i8", "DynamicQuantizeMatMul": "i8",
    "QGemm": "i8", "QLinearConv": "i8", "ConvInteger": "i8", "QAttention": "i8", "MatMulNBits": "i4",
    "MatMul": "f32", "FusedMatMul": "f32", "Gemm": "f32", "Conv": "f32", "FusedConv": "f32", "FusedGemm": "f32",
    "Attention": "f32", "MultiHeadAttention": "f32",
}  # fmt: skip
"""The arithmetic of ONNX Runtime's CPU kernels for matrix products (float graphs: FP32)."""


def kernel_precisions(
    model: ir.Model, workdir: Path, options: Options, threads: int
) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
    """What ONNX Runtime runs after its graph optimisers: per matrix-product kernel type, how
    many at each precision (a QDQ MatMul it did not fuse stays ``DequantizeLinear`` +
    FP32 ``MatMul``), and per kernel node name (and the product name a quantizer's
    ``_quant`` suffix was added to) its precision."""
    import onnx

    runtime = workdir / ".runtime-graph.onnx"
    try:
        _session(workdir / MODEL_FILE, options.optimization, threads, runtime)
        graph = onnx.load(str(runtime), load_external_data=False).graph
    finally:
        for leftover in workdir.glob(".runtime-graph.onnx*"):
            leftover.unlink()
    counts: dict[str, dict[str, int]] = {}
    layers: dict[str, str] = {}
    for node in graph.node:
        precision = _KERNEL_PRECISION.get(node.op_type)
        if precision is None:
            continue
        counts.setdefault(node.op_type, {}).setdefault(precision, 0)
        counts[node.op_type][precision] += 1
        layers[node.name] = precision
        stem, _, suffix = node.name.rpartition("_")
        if stem and not suffix.isdigit():  # the quantizer's "<MatMul>_quant": the product it came from
            layers.setdefault(stem, precision)
    return counts, layers


class Engine(EngineBase):
    """An ONNX Runtime session over the artifact's model."""

    backend = NAME

    def __init__(
        self, folder: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], config: dict[str, Any]
    ) -> None:
        super().__init__(folder, inputs, outputs, config)
        optimized = config.get("optimized_file")
        use_optimized = optimized and config.get("ort_version") == version() and (self.folder / optimized).is_file()
        self.path = path = self.folder / (optimized if use_optimized else MODEL_FILE)
        self.session = _session(
            path, config.get("optimization", "all"), threads_for(config.get("threads", 0), None),
            mapped=bool(config.get("mapped")),
        )  # fmt: skip
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._infer(self.session, feed)

    def streams(self, count: int = 0) -> list[Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]]:
        """One session opened again and run from ``count`` threads at once (0: as many as the
        engine's threads; ONNX Runtime has no throughput hint): a session's runs are
        thread-safe and share its weights. With one thread per stream each run computes in its
        caller's thread; with fewer streams, the concurrent runs share the session's pool of
        threads // count. MiniLM FP32 on 2 cores: 2 x 1 thread answered 5-10% more requests
        than 1 x 2 threads."""
        threads = threads_for(self.config.get("threads", 0), None)
        count = min(count or threads, threads)
        if count == 1:
            return [self.run]
        self.session = _session(self.path, self.config.get("optimization", "all"), max(1, threads // count),
                                mapped=bool(self.config.get("mapped")))  # fmt: skip
        return [self.run] * count

    def _infer(self, session, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = session.run(self.output_names, feed)
        except Exception as exc:
            raise AdapterError(
                f"ONNX Runtime failed while running the engine: {str(exc).splitlines()[0][:400]}"
            ) from exc
        return dict(zip(self.output_names, results))


# --------------------------------------------------------------------------- profiler hook


def capture(engine, feed, warmup: int, repeats: int, tmp: Path, between: Callable[[], None]) -> Capture:
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
        for block in blocks(repeats, between):
            for _ in range(block):
                session.run(None, feed)
        trace = Path(session.end_profiling())
    except Exception as exc:
        raise AdapterError(
            f"ONNX Runtime's profiler failed on '{model_path}': {str(exc).splitlines()[0][:300]}",
            "Check that the artifact runs with `adapter run`.",
        ) from exc
    events = json.loads(trace.read_text())
    windows = sorted(  # each profiled run's (start, end) in the trace
        (e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"
    )[warmup:]
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
    return Capture(ordered, totals, structure=structure, boundary=boundary, mapping="tensors")


CAPTURE = capture
DECODER = _ort_decoder
"""The profiler hook: per-node timings from the backend's own profiler."""
