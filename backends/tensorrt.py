"""TensorRT backend: a TensorRT-ready ONNX graph plus its build recipe, and the engine where a GPU is.

Compiling always writes ``model.onnx`` (standard domain only, opset ≤ 20, initializers
inline below protobuf's limit), ``profiles.json`` (min/opt/max per input from the specs'
dynamic ranges), ``build.py`` (TensorRT Python API) and ``build.sh`` (the same build with
trtexec) plus a ``README.md``. Where ``tensorrt`` imports and a CUDA GPU is visible (asked
through ``torch.cuda``), compile also runs ``build.py`` in a subprocess (a parser crash on a
malformed graph cannot take adapter down) and the engine runs ``model.plan`` with device
buffers from ``torch.cuda`` (torch is already a dependency; no cuda-python needed).

Elsewhere the engine has ``runs_here = False`` and ``stand_in()`` gives ONNX Runtime's CPU
provider over the same ``model.onnx``, so verification checks exactly the graph TensorRT
would build. No fusion passes run: TensorRT fuses itself, and ONNX Runtime's com.microsoft
ops are not parsable by TensorRT's ONNX parser.

Explicit quantization: a Q/DQ graph must follow TensorRT's rules (:func:`check_qdq`);
ONNX Runtime's quantizer writes biases as INT32 DequantizeLinear, which TensorRT does not
take, so :func:`fold_bias_dequantize` turns them back into float initializers (the same
values the DequantizeLinear computes).
"""

from __future__ import annotations

__all__ = [
    "NAME",
    "PASSES",
    "Options",
    "version",
    "require",
    "supports",
    "compile",
    "Engine",
    "check_qdq",
    "qdq_problem",
    "fold_bias_dequantize",
    "optimization_profiles",
]

import functools
import importlib.util
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from adapter.backends import _tensorrt_decoder
from adapter.backends import _tensorrt_scripts as scripts
from adapter.backends._kernels import attach_kernels
from adapter.backends._recipe import (
    check_onnx,
    cpu_stand_in,
    documented_support,
    prepare_graph,
    standard_domain_problems,
    write_atomic,
)
from adapter.backends._tensorrt_qdq import check_qdq, fold_bias_dequantize, qdq_problem, quantized_type
from adapter.backends.base import EngineBase, Support, profile_options, unsupported_nodes
from adapter.backends.documented import TENSORRT
from adapter.core.errors import AdapterError, UnsupportedOpsError
from adapter.core.onnx_io import save_model
from adapter.core.specs import Dim, TensorSpec

NAME = "tensorrt"
PASSES = ()
"""No fusion pipeline: TensorRT fuses on its own, and fusion-ort's com.microsoft ops would not parse."""
PRECISIONS = frozenset({"fp32", "fp16", "bf16", "int8", "fp8"})
"""Precision modes it builds (the contract: ``adapter.backends.base.Backend``)."""
EMULATES = frozenset()
AUTO_KINDS = frozenset({"cpu", "gpu"})
FIXED_SHAPES = False
BUILD_OPTIONS = frozenset({"precision", "opt_dims"})
DEVICE = "gpu"
STAND_IN = True
EXTRA = "tensorrt"
MODEL_FILE = "model.onnx"
PROFILES_FILE, BUILD_FILE, SHELL_FILE, README_FILE = (
    scripts.PROFILES_FILE, scripts.BUILD_FILE, scripts.SHELL_FILE, scripts.README_FILE
)  # fmt: skip
PLAN_FILE = scripts.PLAN_FILE
PLUGINS_FILE = "plugins.json"
"""The recipe's ahead-of-time plugins: the Triton kernels bundled under ``kernels/``."""
TIMING_CACHE_FILE = scripts.TIMING_CACHE_FILE

_FLAGS = ("TF32", "FP16", "BF16", "INT8", "FP8")
_PRECISION_FLAG = {"fp16": "FP16", "bf16": "BF16", "int8": "INT8", "fp8": "FP8"}
_QUANTIZED_FLAG = {"INT8": "INT8", "FLOAT8E4M3FN": "FP8", "INT4": "INT8"}


@dataclass(frozen=True)
class Options:
    """Builder settings; defaults come from the profile's ``[backends.tensorrt]`` table."""

    precision: str = "fp32"
    """Precision hint: fp32, fp16, bf16, int8 or fp8 (Q/DQ and FP16 tensors in the graph add their flags too)."""
    flags: tuple[str, ...] = _FLAGS
    """Builder flags the target allows (the profile lists what its GPU has)."""
    tf32: bool = True
    """Let FP32 matmuls and convolutions use TF32 tensor cores (when the target allows TF32)."""
    builder_optimization_level: int = 3
    """TensorRT's builder optimization level, 0-5 (higher: longer build, faster engine)."""
    workspace_mib: int = 4096
    """Workspace memory-pool limit in MiB (0: TensorRT's default)."""
    timing_cache: bool = True
    """Keep a timing cache file in the artifact, loaded before and saved after each build."""
    opt_dims: tuple[tuple[str, int], ...] = ()
    """Size per dynamic dim to optimise for, e.g. (("batch", 8),); default: the example inputs' sizes."""
    build: str = "auto"
    """auto: build the engine where TensorRT and a GPU are present; never: write the recipe only."""
    build_timeout_s: int = 7200
    """Seconds a build may take before it is stopped."""
    device: int = 0
    """CUDA device the engine runs on."""

    @classmethod
    def from_profile(cls, profile: Any, overrides: dict[str, Any] | None = None) -> Options:
        options = profile_options(cls, NAME, profile, overrides)
        dims = options.opt_dims.items() if isinstance(options.opt_dims, dict) else options.opt_dims
        return cls(**{**asdict(options), "flags": tuple(options.flags), "opt_dims": tuple(tuple(d) for d in dims)})


def require() -> None:
    """Nothing to require: the recipe needs no TensorRT; only building the plan does."""


def version() -> str:
    """Installed TensorRT's version, or ``not installed``."""
    if importlib.util.find_spec("tensorrt") is None:
        return "not installed"
    from importlib import metadata

    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception:  # an installed but broken wheel (missing CUDA libraries)
        return "not importable"


@functools.cache
def _unavailable() -> str | None:
    """Why no engine can be built or run here (None when TensorRT imports and a CUDA GPU is visible)."""
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed"
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:
        return f"tensorrt does not import ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU here (torch.cuda sees none)"
    return None


def _doc() -> str:
    return f"{TENSORRT.version}, {TENSORRT.source}"


def supports(node: ir.Node, model: ir.Model, profile: Any = None) -> Support:
    """Whether TensorRT's ONNX parser takes the node, per the onnx-tensorrt operator matrix."""
    answer = documented_support(
        node,
        TENSORRT,
        f"TensorRT's ONNX parser reads the standard domain only; '{node.domain}' ops would need a TensorRT "
        "plugin of the same name, and the operator matrix lists none",
    )
    if not answer:
        return answer
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        problem = qdq_problem(node, model)
        if problem:
            return Support(False, problem)
    return Support(True)


# ---------------------------------------------------------------- explicit quantization




# ---------------------------------------------------------------- profiles and flags


def optimization_profiles(inputs: list[TensorSpec], opt_dims: dict[str, int]) -> dict[str, Any]:
    """``profiles.json``: per input min/opt/max shapes; a dynamic dim's opt is ``opt_dims[name]``
    (the example inputs' size) when given, else its range maximum."""
    entry: dict[str, Any] = {}
    dims: dict[str, dict[str, Any]] = {}
    for spec in inputs:
        lo, opt, hi, names = [], [], [], []
        for dim in spec.shape:
            if isinstance(dim, Dim):
                wanted = opt_dims.get(dim.name)
                chosen = min(max(int(wanted), dim.min), dim.max) if wanted is not None else dim.max
                dims[dim.name] = {
                    "min": dim.min, "opt": chosen, "max": dim.max,
                    "opt_from": "example inputs" if wanted is not None else "range maximum (no example size given)",
                }  # fmt: skip
                lo.append(dim.min), opt.append(chosen), hi.append(dim.max), names.append(dim.name)
            else:
                lo.append(dim), opt.append(dim), hi.append(dim), names.append(None)
        entry[spec.name] = {
            "dtype": spec.dtype, "dynamic": any(names), "dims": names, "min": lo, "opt": opt, "max": hi,
        }  # fmt: skip
    return {"profiles": [{"inputs": entry}], "dims": dims}


def _graph_flags(model: ir.Model) -> set[str]:
    """Builder flags the graph itself needs: its Q/DQ types, and FP16/BF16 tensors."""
    needed: set[str] = set()
    for node in model.graph.all_nodes():
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            flag = _QUANTIZED_FLAG.get(quantized_type(node))
            if flag:
                needed.add(flag)
        for value in node.outputs:
            if value.dtype == ir.DataType.FLOAT16:
                needed.add("FP16")
            elif value.dtype == ir.DataType.BFLOAT16:
                needed.add("BF16")
    return needed


def _precision_flags(model: ir.Model, options: Options, profile: Any) -> tuple[str, ...]:
    if options.precision not in ("fp32", *_PRECISION_FLAG):
        raise AdapterError(
            f"Unknown TensorRT precision '{options.precision}'.", f"Use one of fp32, {', '.join(_PRECISION_FLAG)}."
        )
    wanted = _graph_flags(model)
    if options.precision in _PRECISION_FLAG:
        wanted.add(_PRECISION_FLAG[options.precision])
    allowed = {str(f).upper() for f in options.flags}
    missing = sorted(wanted - allowed)
    if missing:
        name = getattr(profile, "name", "this target")
        raise AdapterError(
            f"The graph needs TensorRT builder flag(s) {', '.join(missing)}, which target '{name}' does not allow "
            f"(its flags: {', '.join(sorted(allowed)) or 'none'}).",
            "Choose a precision the target lists, or a target whose GPU has it.",
        )
    return tuple(f for f in _FLAGS if f in wanted and f != "TF32")


# ---------------------------------------------------------------- compile and engine


def _note(reason: str) -> str:
    return (
        f"No TensorRT engine was built: {reason}. "
        f"Build it on the target with: python {BUILD_FILE} (or the trtexec line in {SHELL_FILE})."
    )


def compile(
    model: ir.Model, profile: Any, options: Options, specs: tuple[list[TensorSpec], list[TensorSpec]], workdir: Path
) -> Engine:
    """Write the TensorRT-ready ONNX and its build recipe; build ``model.plan`` where TensorRT and a GPU are.

    Raises:
        UnsupportedOpsError: Nodes the parser would refuse, or Q/DQ that break TensorRT's rules.
        AdapterError: Bad options, a precision the target does not allow, or a failed build.
    """
    if options.build not in ("auto", "never"):
        raise AdapterError(f"Unknown TensorRT build mode '{options.build}'.", "Use auto or never.")
    if not 0 <= options.builder_optimization_level <= 5:
        raise AdapterError(f"TensorRT's builder optimization level is 0-5, not {options.builder_optimization_level}.")
    graph = prepare_graph(model)
    folded = fold_bias_dequantize(graph)
    refused = standard_domain_problems(graph, "TensorRT's ONNX parser reads the standard domain only")
    refused += [
        p for p in unsupported_nodes(graph, lambda n, m: supports(n, m, profile)) if p.domain in ("", "ai.onnx")
    ]
    if refused:
        raise UnsupportedOpsError(
            NAME, refused, "Fix these nodes (or their Q/DQ) or choose another backend with --backend."
        )
    flags = _precision_flags(graph, options, profile)
    tf32 = bool(options.tf32) and "TF32" in {str(f).upper() for f in options.flags}
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    files = save_model(graph, workdir / MODEL_FILE)
    check_onnx(workdir / MODEL_FILE)
    profiles = optimization_profiles(specs[0], dict(options.opt_dims))
    settings = scripts.BuildSettings(
        MODEL_FILE,
        flags,
        tf32,
        options.builder_optimization_level,
        options.workspace_mib,
        options.timing_cache,
        profiles,
    )
    reason = "building was turned off (build=never)" if options.build == "never" else _unavailable()
    note = _note(reason) if reason else "The TensorRT engine model.plan was built here."
    files += scripts.write_recipe(workdir, settings, note)
    kernels = attach_kernels(graph, profile, dict(options.opt_dims), options.precision, workdir)
    if kernels.get("plugins"):  # the recipe's list of ahead-of-time plugins (cubins under kernels/)
        write_atomic(workdir / PLUGINS_FILE, json.dumps({"tensorrt_plugins": kernels["plugins"]}, indent=2) + "\n")
        files += [PLUGINS_FILE] + [f for k in kernels["triton_kernels"] for f in k["files"]]
    config: dict[str, Any] = {
        **kernels,
        **asdict(options),
        "builder_flags": list(flags),
        "tf32_enabled": tf32,
        "trtexec": scripts.trtexec_args(settings),
        "folded_bias_dequantize": folded,
        "tensorrt_version": version(),
        "engine_built": False,
        "note": note,
        "files": files,
    }
    if reason is None:
        _build_plan(workdir, options.build_timeout_s)
        config["engine_built"] = True
        config["files"] = files + [PLAN_FILE] + ([TIMING_CACHE_FILE] if options.timing_cache else [])
    return Engine(workdir, specs[0], specs[1], config)


def _build_plan(workdir: Path, timeout_s: int) -> None:
    """Run ``build.py`` in a subprocess (TensorRT has crashed on malformed graphs)."""
    try:
        done = subprocess.run(
            [sys.executable, BUILD_FILE], cwd=workdir, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise AdapterError(
            f"The TensorRT build did not finish within {timeout_s} s.",
            "Raise build_timeout_s, or lower builder_optimization_level.",
        ) from exc
    if done.returncode != 0 or not (workdir / PLAN_FILE).is_file():
        tail = " ".join(done.stderr.strip().splitlines()[-3:])[:600] or f"exit status {done.returncode}"
        crashed = " (the builder crashed)" if done.returncode < 0 else ""
        raise AdapterError(
            f"TensorRT could not build the engine{crashed}: {tail}",
            f"Run `python {BUILD_FILE}` in {workdir} to see TensorRT's full log.",
        )


class Engine(EngineBase):
    """The TensorRT plan where it runs; elsewhere the recipe, with ONNX Runtime CPU as stand-in."""

    backend = NAME

    def __init__(
        self, folder: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], config: dict[str, Any]
    ) -> None:
        super().__init__(folder, inputs, outputs, config)
        self._runner: _PlanRunner | None = None
        built = bool(config.get("engine_built")) and (self.folder / PLAN_FILE).is_file()
        self.runs_here = built and _unavailable() is None and config.get("tensorrt_version") == version()

    def why_not_here(self) -> str | None:
        """Why this engine does not run on this machine (None when it does)."""
        if self.runs_here:
            return None
        if not self.config.get("engine_built"):
            return self.config.get("note", _note(_unavailable() or "not built"))
        reason = _unavailable()
        if reason:
            return f"The TensorRT engine was built elsewhere and cannot run here: {reason}."
        return (
            f"The TensorRT engine was built with TensorRT {self.config.get('tensorrt_version')} and this machine has "
            f"{version()}; plans do not move between versions."
        )

    def stand_in(self) -> tuple[EngineBase, str] | None:
        if self.runs_here:
            return None
        return cpu_stand_in(self.folder, self.inputs, self.outputs, MODEL_FILE, "TensorRT would build")

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.runs_here:
            raise AdapterError(
                self.why_not_here() or "This TensorRT engine does not run here.",
                "Run it on the target GPU, or verify with the engine's stand-in "
                "(ONNX Runtime over the same model.onnx).",
            )
        if self._runner is None:
            self._runner = _PlanRunner(self.folder / PLAN_FILE, int(self.config.get("device", 0)))
        return self._runner.run(feed)


class _PlanRunner:
    """Runs a TensorRT plan: one execution context, device buffers from ``torch.cuda``."""

    def __init__(self, plan: Path, device: int) -> None:
        import tensorrt as trt
        import torch

        self.trt, self.torch = trt, torch
        self.device = torch.device("cuda", device)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with torch.cuda.device(self.device):
            self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
            if self.engine is None:
                raise AdapterError(
                    f"TensorRT could not load '{plan}' (built for another GPU or TensorRT version?).",
                    "Rebuild it on this machine: python build.py in the artifact folder.",
                )
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(device=self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]

    def _torch_dtype(self, name: str):
        trt, torch = self.trt, self.torch
        table = {
            trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
            trt.bool: torch.bool, trt.uint8: torch.uint8,
        }  # fmt: skip
        for extra, torch_type in (("bfloat16", "bfloat16"), ("int64", "int64")):
            if hasattr(trt, extra):
                table[getattr(trt, extra)] = getattr(torch, torch_type)
        dtype = self.engine.get_tensor_dtype(name)
        if dtype not in table:
            raise AdapterError(f"The engine's tensor '{name}' has type {dtype}, which adapter cannot hand over.")
        return table[dtype]

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.cuda.device(self.device):
            held = []
            for name in self.input_names:
                tensor = torch.from_numpy(np.ascontiguousarray(feed[name])).to(self.device)
                if not self.context.set_input_shape(name, tuple(tensor.shape)):
                    raise AdapterError(f"TensorRT refused shape {tuple(tensor.shape)} for input '{name}'.")
                self.context.set_tensor_address(name, tensor.data_ptr())
                held.append(tensor)
            outputs = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise AdapterError(
                        f"Output '{name}' has a data-dependent shape {shape}; adapter's TensorRT runner needs "
                        "shapes known from the inputs."
                    )
                outputs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device=self.device)
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # inputs copied on the default stream
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise AdapterError("TensorRT failed while running the engine (see its log).")
            self.stream.synchronize()
        result = {}
        for name, tensor in outputs.items():
            if tensor.dtype == torch.bfloat16:
                tensor = tensor.float()  # numpy has no bfloat16
            result[name] = tensor.cpu().numpy()
        return result


CAPTURE = None
"""The profiler hook (None: this backend's engines cannot be profiled per node)."""
DECODER = _tensorrt_decoder
"""Generation engines: the decoder's TensorRT recipe with KV-cache optimization profiles."""
