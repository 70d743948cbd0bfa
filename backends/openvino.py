"""OpenVINO backend (Intel and AMD x86 CPUs): the passes' ONNX compiled by OpenVINO.

Precision is a compile hint (``INFERENCE_PRECISION_HINT``): ``f32`` unless the
precision plan asks for ``bf16`` (AMX / AVX512-BF16) or ``f16``; it is always set
explicitly, because OpenVINO would otherwise pick BF16 on its own on AMX machines.
Threads and streams come from the target profile; the compiled-blob cache lives inside
the artifact (``ov_cache/``), so loading an artifact skips recompilation.
"""

from __future__ import annotations

__all__ = ["NAME", "PASSES", "Options", "version", "require", "supports", "compile", "Engine"]

import functools
import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from adapter.backends import _openvino_decoder
from adapter.backends.base import EngineBase, Support, profile_options, require_module, threads_for
from adapter.backends.profiling import Capture, Kernel, blocks
from adapter.core import safety as _safety
from adapter.core.artifact import MANIFEST, cache_root
from adapter.core.errors import AdapterError, BackendFailedError
from adapter.core.onnx_io import save_model
from adapter.core.specs import TensorSpec, check_inputs

NAME = "openvino"
MODEL_FILE = "model.onnx"
PASSES = ("fusion-standard",)
"""Fusion pipeline run on this backend's copy of the canonical graph: standard-domain fusions only: OpenVINO fuses attention itself."""
PRECISIONS = frozenset({"fp32", "bf16", "fp16", "int8"})
"""Precision modes it builds (the contract: ``adapter.backends.base.Backend``)."""
EMULATES = frozenset()
AUTO_KINDS = frozenset({"cpu", "gpu"})
FIXED_SHAPES = False
BUILD_OPTIONS = frozenset({"precision"})
DEVICE = "cpu"
STAND_IN = False
EXTRA = ""
CACHE_DIR = "ov_cache"
_PRECISIONS = {"fp32": "f32", "f32": "f32", "bf16": "bf16", "fp16": "f16", "f16": "f16"}


@dataclass(frozen=True)
class Options:
    """Compile settings; defaults come from the target profile's ``[backends.openvino]``."""

    device: str = "CPU"
    """OpenVINO device name."""
    precision: str = "f32"
    """Inference precision hint: f32, bf16 or f16 (set from the precision plan)."""
    threads: int = 0
    """Inference threads; 0 means the profile's count, capped at the cores available."""
    streams: int = 1
    """Parallel inference streams (1 for latency)."""
    performance_hint: str = "LATENCY"
    """OpenVINO performance hint: LATENCY or THROUGHPUT."""

    @classmethod
    def from_profile(cls, profile: Any, overrides: dict[str, Any] | None = None) -> Options:
        # the precision plan, not the profile, decides the inference precision
        return profile_options(cls, NAME, profile, overrides, ignore=("inference_precision_hint",))


def require() -> None:
    """Raise a clear error when OpenVINO is missing."""
    require_module("openvino", NAME, "pip install 'adapter[openvino]' (openvino==2026.4.1)")


def version() -> str:
    return metadata.version("openvino")


PROBE_TIMEOUT_S = 600
"""How long OpenVINO's frontend may take to read a model in the probe process."""


def _framework_nodes(path: str) -> frozenset[str]:
    """Nodes OpenVINO's ONNX frontend cannot convert, asked in a child process.

    Raises:
        BackendFailedError: The frontend rejected the file, crashed on it or hung.
    """
    import signal
    import subprocess
    import sys

    # The probe file runs as a script (-P: its folder, which holds a module named openvino,
    # stays off sys.path), so the child imports OpenVINO only, not adapter and torch (~3 s).
    command = [sys.executable, "-P", str(Path(__file__).with_name("_openvino_probe.py")), path]
    what = f"OpenVINO {version()}'s ONNX frontend"
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BackendFailedError(
            f"{what} did not finish reading the model within {PROBE_TIMEOUT_S} s.",
            "Choose another backend with --backend.",
        ) from exc
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        raise BackendFailedError(
            f"{what} crashed ({name}) while reading the model, in a separate process, so nothing else was "
            "affected; the model is probably malformed (onnx.checker.check_model(path, full_check=True) tells how).",
            "Repair or re-export the model, or choose another backend with --backend.",
        )
    lines = done.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if done.returncode == 0 and lines else None
    except json.JSONDecodeError:
        answer = None
    if answer is None:
        tail = " ".join(done.stderr.split())[-400:]
        raise BackendFailedError(f"{what} probe failed (exit {done.returncode}): {tail}")
    if "error" in answer:
        raise BackendFailedError(
            f"{what} cannot read the model: {answer['error']}",
            "Repair or re-export the model, or choose another backend with --backend.",
        )
    return frozenset(answer["framework_nodes"])


def supports(node: ir.Node, model: ir.Model, profile: Any = None) -> Support:
    """Whether OpenVINO's ONNX frontend converts the node (checked once per model)."""
    import tempfile

    global _checked
    # keyed by the model object itself (held here), not id(): a freed model's id is reused
    if _checked is None or _checked[0] is not model:
        with tempfile.TemporaryDirectory(prefix="adapter-ov-check-") as tmp:
            path = Path(tmp) / "model.onnx"
            save_model(model, path)
            _checked = (model, _framework_nodes(str(path)))
    cached = _checked[1]
    if node.name in cached or any(value.name in cached for value in node.outputs if value is not None):
        return Support(False, f"OpenVINO {version()}'s ONNX frontend has no conversion for this op")
    return Support(True)


_checked: tuple[ir.Model, frozenset[str]] | None = None
"""The last model asked about and the nodes OpenVINO's frontend left unconverted in it."""


def _cache_dir(folder: Path) -> Path:
    """Where OpenVINO keeps compiled blobs for this artifact.

    While an artifact is built, its own ``ov_cache/``; afterwards a per-user folder
    seeded from it, so loading never writes into (and so never invalidates) the artifact.
    """
    import shutil

    own = folder / CACHE_DIR
    if not (folder / MANIFEST).is_file():
        own.mkdir(exist_ok=True)
        return own
    import hashlib

    target = cache_root() / "openvino" / hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24]
    target.mkdir(parents=True, exist_ok=True)
    if own.is_dir():
        for blob in own.iterdir():
            if blob.is_file() and not (target / blob.name).exists():
                shutil.copy2(blob, target / blob.name)
    return target


def _compile(folder: Path, config: dict[str, Any]):
    import openvino as ov

    path = folder / MODEL_FILE
    _safety.check_onnx_file(path)
    core = ov.Core()
    properties = {
        "INFERENCE_PRECISION_HINT": config["precision"],
        "PERFORMANCE_HINT": config["performance_hint"],
        "INFERENCE_NUM_THREADS": int(config["threads"]),
        "NUM_STREAMS": int(config["streams"]),
        "CACHE_DIR": str(_cache_dir(folder)),
    }
    try:
        return core.compile_model(str(path), config["device"], properties)
    except Exception as exc:
        raise AdapterError(f"OpenVINO could not compile '{path}': {str(exc).strip().splitlines()[0][:400]}") from exc


def compile(
    model: ir.Model, profile: Any, options: Options, specs: tuple[list[TensorSpec], list[TensorSpec]], workdir: Path
) -> Engine:
    """Write the model into ``workdir`` and compile it for the profile's CPU."""
    precision = _PRECISIONS.get(options.precision)
    if precision is None:
        raise AdapterError(f"OpenVINO cannot run precision '{options.precision}'.", "Use fp32, bf16 or fp16.")
    workdir.mkdir(parents=True, exist_ok=True)
    files = save_model(model, workdir / MODEL_FILE)
    config = {
        **asdict(options),
        "precision": precision,
        "threads": threads_for(options.threads, profile),
        "files": files + [CACHE_DIR],
    }
    engine = Engine(workdir, specs[0], specs[1], config)
    engine.config["executed_precision"] = engine.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    engine.config["kernel_precisions"], engine.config["layer_precisions"] = kernel_precisions(
        engine.compiled, _product_names(model)
    )
    return engine


_COMPUTE_LAYERS = ("FullyConnected", "MatMul", "Convolution", "Deconvolution", "Subgraph", "ScaledDotProductAttention")
"""Execution-graph layer types that do the arithmetic (a Subgraph is a fused attention or
elementwise chain: OpenVINO's snippets)."""


def _product_names(model: ir.Model) -> dict[str, str]:
    """Names the execution graph may give an ONNX matrix product (MatMul, Gemm, Conv): its
    own, or the bias ``Add`` after it (a FullyConnected with bias carries the Add's name)."""
    names: dict[str, str] = {}
    for node in model.graph.all_nodes():
        if node.op_type in ("MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulInteger", "ConvInteger"):
            names[node.name] = node.name
            for use in node.outputs[0].uses() if node.outputs and node.outputs[0] is not None else ():
                if use.node.op_type == "Add":
                    names.setdefault(use.node.name, node.name)
    return names


_OWN_LAYERS = ("FullyConnected", "MatMul", "Convolution", "Deconvolution")
"""Layer types a matrix product (with its bias) becomes; other compute layers (a Subgraph)
may also swallow a product's bias Add, which says nothing of the product's precision."""


def _known_prefix(name: str, products: dict[str, str]) -> str:
    """``name``, or the longest ``/``-prefix of it that names a product (the plugin appends
    ``/DequantizationMultiply`` and the like; exporters' own names may hold ``/`` too)."""
    while name and name not in products and "/" in name:
        name = name.rsplit("/", 1)[0]
    return name


def kernel_precisions(compiled, products: dict[str, str]) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
    """What the CPU plugin actually runs, from the compiled model's execution graph: per
    compute layer type, how many layers run at each precision (``FullyConnected: {bf16: 30,
    i8: 6}``), and for each ONNX matrix product (``products``: the names a layer may carry,
    to the product's node name) the precision of the layer it ended up in."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    layers: dict[str, str] = {}
    named: set[str] = set()  # products a layer carries by their own name (not a bias Add's)
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str) if "layerType" in info else ""
        if not kind.startswith(_COMPUTE_LAYERS):
            continue
        precision = info["runtimePrecision"].astype(str).lower() if "runtimePrecision" in info else "?"
        counts[kind][precision] += 1
        names = info["originalLayersNames"].astype(str).split(",") if "originalLayersNames" in info else ()
        for name in (_known_prefix(n, products) for n in names):  # "<MatMul>/DequantizationMultiply"
            product = products.get(name)
            if product is None or product in named:
                continue
            if name == product:
                layers[product] = precision
                named.add(product)
            elif kind.startswith(_OWN_LAYERS):
                layers[product] = precision
    return {k: dict(v) for k, v in counts.items()}, layers


class Engine(EngineBase):
    """An OpenVINO compiled model with one infer request."""

    backend = NAME

    def __init__(
        self, folder: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], config: dict[str, Any]
    ) -> None:
        require()
        super().__init__(folder, inputs, outputs, config)
        self.output_names = [o.name for o in outputs]

    @functools.cached_property
    def compiled(self):
        """Compiled on first use: a server that asks for streams compiles once."""
        return _compile(self.folder, self.config)

    @functools.cached_property
    def request(self):
        return self.compiled.create_infer_request()

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._infer(self.request, feed)

    def _infer(self, request, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = request.infer(feed)
        except Exception as exc:
            raise AdapterError(
                f"OpenVINO failed while running the engine: {str(exc).strip().splitlines()[0][:400]}"
            ) from exc
        values = list(results.values())
        return {name: np.array(value, copy=True) for name, value in zip(self.output_names, values)}

    def streams(self, count: int = 0) -> list[Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]]:
        """The model compiled again with ``count`` streams (0: the plugin's choice under its
        throughput hint), the engine's threads split between them, one infer request each;
        the plugin's streams share one copy of the weights, and the one-stream model is let go."""
        threads = threads_for(int(self.config["threads"]), None)  # the manifest's, within this machine's cores
        config = {**self.config, "threads": threads, "performance_hint": "THROUGHPUT",
                  "streams": min(count, threads) if count else -1}  # fmt: skip
        if count == 1 or threads == 1:
            return [self.run]
        compiled = _compile(self.folder, config)
        requests = [compiled.create_infer_request() for _ in range(int(compiled.get_property("NUM_STREAMS")))]
        self.compiled, self.request = compiled, requests[0]
        self.config = {**config, "streams": len(requests)}
        return [functools.partial(self._checked, request) for request in requests]

    def _checked(self, request, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._infer(request, check_inputs(self.inputs, inputs))


# --------------------------------------------------------------------------- profiler hook


def capture(engine, feed, warmup: int, repeats: int, tmp: Path, between: Callable[[], None]) -> Capture:
    import openvino as ov  # vendor SDK, imported where used

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
        for _ in (step for block in blocks(repeats, between) for step in range(block)):
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
    return Capture(ordered, totals, note=note, idle=idle, mapping="fused")


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


CAPTURE = capture
DECODER = _openvino_decoder
"""The profiler hook: per-node timings from the backend's own profiler."""
