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
from adapter.backends import _tensorrt_scripts as scripts
from adapter.backends._recipe import (
    check_onnx,
    constant_of,
    cpu_stand_in,
    documented_support,
    prepare_graph,
    standard_domain_problems,
    write_atomic,
)
from adapter.backends.base import EngineBase, Support, module_of, profile_options, unsupported_nodes
from adapter.backends.documented import TENSORRT

from adapter.core.errors import AdapterError, UnsupportedOp, UnsupportedOpsError
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
PROFILES_FILE = "profiles.json"
BUILD_FILE = "build.py"
SHELL_FILE = "build.sh"
README_FILE = "README.md"
PLAN_FILE = scripts.PLAN_FILE
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


_constant = constant_of


def _quantized_type(node: ir.Node) -> str:
    """The quantized data type of a Q (its output) or DQ (its input), as an ONNX type name."""
    if node.op_type == "DequantizeLinear":
        source = node.inputs[0]
        dtype = source.dtype if source is not None else None
        if dtype is None and len(node.inputs) > 2 and node.inputs[2] is not None:
            dtype = node.inputs[2].dtype  # the zero-point has the quantized type
        if dtype is None and source is not None and source.producer() is not None:
            producer = source.producer()
            if producer.op_type == "QuantizeLinear":
                return _quantized_type(producer)
    else:
        zero = node.inputs[2] if len(node.inputs) > 2 else None
        dtype = zero.dtype if zero is not None else None
        if dtype is None:
            attr = node.attributes.get("output_dtype")
            dtype = ir.DataType(attr.value) if attr is not None and attr.value else ir.DataType.UINT8
    return dtype.name if dtype is not None else "unknown"


def _weight_consumers(node: ir.Node) -> list[tuple[ir.Node, int]]:
    """(consumer, input index) of the dequantized weight a Q/DQ node belongs to."""
    out = node.outputs[0]
    if node.op_type == "QuantizeLinear":  # weight kept as float: Q -> DQ -> op
        return [use for dq, _ in out.uses() if dq.op_type == "DequantizeLinear" for use in dq.outputs[0].uses()]
    return list(out.uses())


def _is_weight(node: ir.Node) -> bool:
    source = node.inputs[0]
    if _constant(source) is not None:
        return True
    producer = source.producer() if source is not None else None
    return (
        node.op_type == "DequantizeLinear"
        and producer is not None
        and producer.op_type == "QuantizeLinear"
        and _constant(producer.inputs[0]) is not None
    )


def _output_channel_axis(consumer: ir.Node, index: int, rank: int) -> int | None:
    """The output-channel axis of a weight feeding ``consumer`` at ``index`` (None: not a known weight slot)."""
    if index != 1:
        return None
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "MatMul":
        return rank - 1
    if consumer.op_type == "Gemm":
        trans_b = consumer.attributes.get("transB")
        return 0 if trans_b is not None and trans_b.value else 1
    return None


def qdq_problem(node: ir.Node, model: ir.Model) -> str | None:
    """Why a QuantizeLinear/DequantizeLinear breaks TensorRT's explicit-quantization rules (None: it follows them).

    The rules: standard-domain Q/DQ at opset ≥ 13 (FP8 at ≥ 19); signed INT8 or FP8 E4M3
    (INT4 for weights only); constant positive scales; zero-points constant 0 (symmetric);
    activations per tensor; weights per tensor or per channel along the consumer's output
    channel (Conv 0, ConvTranspose 1, MatMul last, Gemm 0 with transB else 1).
    """
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return (
            f"{op} in domain '{node.domain}': TensorRT reads only the standard-domain QuantizeLinear/DequantizeLinear"
        )
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if opset < 13:
        return f"opset {opset}: TensorRT's explicit quantization needs QuantizeLinear/DequantizeLinear from opset 13"
    qtype = _quantized_type(node)
    weight = _is_weight(node)
    if qtype == "FLOAT8E4M3FN" and opset < 19:
        return f"FP8 {op} at opset {opset}: FP8 Q/DQ needs opset 19 (float8e4m3fn zero-points)"
    if qtype == "INT32":
        return (
            f"{op} of an INT32 tensor (a quantized bias): TensorRT dequantizes INT8/FP8 only; keep biases in float "
            "(fold_bias_dequantize does this)"
        )
    if qtype == "UINT8":
        return f"UINT8 {op}: TensorRT's explicit quantization is signed and symmetric (INT8 with zero-point 0)"
    if qtype not in ("INT8", "FLOAT8E4M3FN") and not (qtype == "INT4" and weight):
        return f"{qtype} {op}: TensorRT quantizes to INT8 or FP8 E4M3 (INT4 for weights only)"
    block = node.attributes.get("block_size")
    if block is not None and block.value and qtype != "INT4":
        return (
            f"block-wise {qtype} {op} (block_size {block.value}): "
            "TensorRT takes block quantization for INT4 weights only"
        )
    scale = _constant(node.inputs[1])
    if scale is None:
        return f"{op}'s scale '{node.inputs[1].name}' is computed at run time: TensorRT needs a constant scale"
    if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        return f"{op}'s scale '{node.inputs[1].name}' has non-positive or non-finite values"
    zero_value = node.inputs[2] if len(node.inputs) > 2 else None
    if zero_value is not None:
        zero = _constant(zero_value)
        if zero is None:
            return f"{op}'s zero-point '{zero_value.name}' is not a constant: TensorRT needs zero-point 0"
        if np.any(zero.astype(np.float32) != 0):
            return f"{op}'s zero-point '{zero_value.name}' is not 0: TensorRT's quantization is symmetric"
    if scale.size == 1:
        return None
    if not weight:
        return (
            f"per-channel {op} on activation '{node.inputs[0].name}' ({scale.size} scales): "
            "TensorRT quantizes activations per tensor"
        )
    if qtype == "INT4":
        return None  # block-quantized INT4 weights carry a scale tensor, not a per-channel vector
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    axis_attr = node.attributes.get("axis")
    axis = axis_attr.value if axis_attr is not None else 1
    if rank is not None and axis < 0:
        axis += rank
    for consumer, index in _weight_consumers(node):
        expected = _output_channel_axis(consumer, index, rank or 0)
        if expected is not None and rank is not None and axis != expected:
            return (
                f"per-channel {op} on weight '{node.inputs[0].name}' uses axis {axis}, but {consumer.op_type} "
                f"'{consumer.name}' has its output channels on axis {expected}"
            )
    return None


def check_qdq(model: ir.Model) -> list[UnsupportedOp]:
    """Every Q/DQ node of ``model`` that breaks TensorRT's explicit-quantization rules, with the reason."""
    problems = []
    for node in model.graph.all_nodes():
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            problem = qdq_problem(node, model)
            if problem:
                problems.append(UnsupportedOp(node.name or "", node.op_type, node.domain, module_of(node), problem))
    return problems


def fold_bias_dequantize(model: ir.Model) -> int:
    """Replace each constant INT32 DequantizeLinear (ONNX Runtime's quantized biases) by the float
    initializer it computes, ``(x - zero_point) * scale`` in FP32; returns how many were folded."""
    graph = model.graph
    folded = 0
    for node in list(graph):
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        source, scale = node.inputs[0], _constant(node.inputs[1])
        data = _constant(source)
        if data is None or scale is None or data.dtype != np.int32 or node.outputs[0].is_graph_output():
            continue
        zero = _constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        values = data.astype(np.float32) - (zero.astype(np.float32) if zero is not None else np.float32(0))
        if scale.size > 1:
            axis = node.attributes.get("axis")
            axis = (axis.value if axis is not None else 1) % data.ndim
            shape = [1] * data.ndim
            shape[axis] = scale.size
            scale = scale.reshape(shape)
        values = (values * scale.astype(np.float32)).astype(np.float32)
        out = node.outputs[0]
        name = f"{out.name}_float"
        replacement = ir.Value(name=name, shape=ir.Shape(values.shape), type=ir.TensorType(ir.DataType.FLOAT))
        replacement.const_value = ir.tensor(values, name=name)
        graph.register_initializer(replacement)
        ir.convenience.replace_all_uses_with(out, replacement)
        graph.remove(node, safe=True)
        folded += 1
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]
    return folded


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
            flag = _QUANTIZED_FLAG.get(_quantized_type(node))
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
    write_atomic(workdir / PROFILES_FILE, json.dumps(profiles, indent=2) + "\n")
    write_atomic(workdir / BUILD_FILE, scripts.build_script(settings))
    write_atomic(workdir / SHELL_FILE, scripts.shell_script(settings))
    (workdir / SHELL_FILE).chmod(0o755)
    write_atomic(workdir / README_FILE, scripts.readme(settings, note))
    files += [PROFILES_FILE, BUILD_FILE, SHELL_FILE, README_FILE]
    config: dict[str, Any] = {
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
