"""Precision switching: FP16 / BF16 / FP8 / INT8 / INT4 per node, from a precision plan.

A :class:`PrecisionPlan` says which nodes run in the plan's low precision and which stay
FP32 (with the reason: keep-list op, FP16 overflow measured in calibration, or
sensitivity under an accuracy budget). :func:`apply_plan` realises a plan with the
maintained tools: adapter's FP16 conversion pass (:mod:`adapter.passes.float16`), ONNX Runtime's
quantization tool (INT8 static QDQ with per-channel weights, INT8 dynamic, FP8 E4M3 QDQ)
and its ``MatMulNBits`` quantizer (INT4 weight-only). BF16 is a compile hint for
backends that run it (OpenVINO); the graph stays FP32.

The model stays an ``onnx_ir`` model: :class:`ApplyPrecisionPlan` is the in-place pass
that realises a plan (:func:`apply_plan` runs it on a clone, for the plan search). The
graph rewrites before quantization (Attention unpacking, smoothing) are over onnx-ir;
the model is serialized only at ONNX Runtime's quantization tools, which take a
ModelProto (or a file) and give one back, and their result becomes the pass's graph.
"""

from __future__ import annotations

__all__ = [
    "MODES",
    "KEEP_FP32_OPS",
    "PrecisionPlan",
    "ApplyPrecisionPlan",
    "candidate_nodes",
    "fp16_overflow_overrides",
    "default_plan",
    "apply_plan",
    "model_size",
    "fit_weight_widths",
]

import contextlib
import io
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from adapter.core.errors import AdapterError, SourceError
from adapter.core.specs import TensorSpec
from adapter.core.verify import random_inputs
from adapter.passes import unpack_attention
from adapter.passes.base import CountedPass
from adapter.passes.float16 import ConvertFloat
from adapter.passes.saturation import matmul_errors, narrower
from adapter.passes.smoothing import smooth

MODES = ("fp32", "fp16", "bf16", "fp8", "int8", "int8-dynamic", "int4-weight", "auto")
KEEP_FP32_OPS = (
    "LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization",
    "InstanceNormalization", "GroupNormalization", "Softmax", "LogSoftmax",
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSumExp", "ReduceSumSquare", "Pow", "Sqrt", "Reciprocal", "Exp", "Log", "Erf", "CumSum", "Range",
)  # fmt: skip
"""Ops an FP16 conversion leaves in FP32 by default: norms, softmax, reductions, and the
elementwise pieces of decomposed norms (RMSNorm's Pow/ReduceMean/Sqrt)."""

_WEIGHT_OPS = {"MatMul": 1, "Gemm": 1, "Conv": 1}
"""Ops quantized with a constant weight, and which input holds the weight."""
LOW_PRECISION = {"fp16": "fp16", "bf16": "bf16", "fp8": "fp8", "int8": "int8", "int8-dynamic": "int8", "int4-weight": "int4", "fp32": "fp32"}


@dataclass
class PrecisionPlan:
    """Which nodes run in low precision, which stay FP32, and why.

    Attributes:
        mode: The precision mode (``fp16``, ``int8-dynamic``, ...).
        nodes: The nodes the mode applies to (its candidates), by name.
        overrides: Candidates kept in FP32: node name to ``{"reason", "module", ...}``.
        modules: Node name to its ``nn.Module`` path, for reports.
        options: Mode options (calibration method, per-channel, INT4 block size).
        sensitivity: Per group (module), the budget score when only it is lowered.
        budget: The accuracy budget the plan was searched under, if any.
        calibration: Source and digest of the calibration data used.
        measured: Figures measured for this plan (accuracy per output, latency).
    """

    mode: str
    nodes: list[str] = field(default_factory=list)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    sensitivity: dict[str, float] = field(default_factory=dict)
    budget: str | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)

    @property
    def lowered(self) -> list[str]:
        """Candidate nodes that run in the low precision."""
        return [n for n in self.nodes if n not in self.overrides]

    def with_kept(self, groups: list[str], reason: str) -> PrecisionPlan:
        """A copy with every candidate node of the given module groups kept in FP32."""
        overrides = dict(self.overrides)
        for node in self.nodes:
            group = self.modules.get(node) or node
            if group in groups and node not in overrides:
                overrides[node] = {"reason": reason, "module": self.modules.get(node, "")}
        return PrecisionPlan(**{**asdict(self), "overrides": overrides, "measured": {}})

    def to_json(self) -> dict[str, Any]:
        return {"format": 1, **asdict(self)}

    def save(self, path: Path) -> None:
        tmp = Path(path).with_name(f".{Path(path).name}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> PrecisionPlan:
        """Read a plan file (``--precision-plan``).

        Raises:
            SourceError: Missing file, bad JSON, or not a plan.
        """
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise SourceError(f"Precision plan '{path}' does not exist.") from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise SourceError(f"Precision plan '{path}' is not valid JSON ({exc}).") from exc
        if not isinstance(data, dict) or data.get("format") != 1 or data.get("mode") not in MODES:
            raise SourceError(f"'{path}' is not an adapter precision plan (format 1).", "Use the plan.json of an artifact.")
        data.pop("format")
        try:
            return cls(**data)
        except TypeError as exc:
            raise SourceError(f"Precision plan '{path}' has unexpected fields ({exc}).") from exc


def _module(node: ir.Node) -> str:
    return node.metadata_props.get("adapter.module", "")


def _constant_weight(node: ir.Node) -> bool:
    """Whether input 1 of ``node`` is an initializer."""
    return len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].is_initializer()


def candidate_nodes(model: ir.Model, mode: str) -> tuple[list[str], dict[str, str]]:
    """The nodes a mode lowers, and each one's module path.

    Weight-quantizing modes take MatMul/Gemm (and Conv for INT8/FP8) nodes whose weight is
    a constant; FP16 takes every node outside the keep-list.
    """
    names, modules = [], {}
    for node in model.graph:
        if mode == "fp16":
            take = node.domain in ("", "ai.onnx") and node.op_type not in KEEP_FP32_OPS
        elif mode in ("int8", "fp8", "int8-dynamic", "int4-weight"):
            # ONNX Runtime's dynamic quantizer and MatMulNBits take MatMul only (not Gemm);
            # the dynamic quantizer also takes the fused com.microsoft Attention (QAttention),
            # whose packed QKV weight is input 1 -- but only without inputs past index 4:
            # QAttention has no attention_bias, and ORT 1.32's quantizer silently drops it,
            # which loses the padding mask (seen: MiniLM cosine 0.57 on padded inputs). An
            # Attention with attention_bias is unpacked before quantizing instead
            # (passes/unpack_attention.py), so its QKV MatMul is quantized.
            ops = {"MatMul"} if mode in ("int4-weight", "int8-dynamic") else set(_WEIGHT_OPS)
            standard = node.domain in ("", "ai.onnx") and node.op_type in ops
            fused = (
                mode == "int8-dynamic" and node.domain == "com.microsoft" and node.op_type == "Attention"
                and (all(v is None for v in node.inputs[5:]) or unpack_attention.unpackable(node))
            )  # fmt: skip
            take = (standard or fused) and _constant_weight(node)
        else:
            take = False
        if take:
            names.append(node.name)
            modules[node.name] = _module(node)
    return names, modules


def fp16_overflow_overrides(model: ir.Model, ranges: dict, underflow_share: float = 0.01) -> dict[str, dict[str, Any]]:
    """Nodes that must stay out of FP16: producers and consumers of a tensor whose
    calibrated magnitude exceeds 65504, or with more than ``underflow_share`` of its
    non-zero values below FP16's smallest subnormal."""
    flagged: dict[str, str] = {}
    for name, stats in ranges.items():
        if stats.overflows_fp16:
            flagged[name] = f"FP16 overflow: |{name}| reaches {stats.absmax:.3g} > 65504"
        elif stats.underflow_share > underflow_share:
            flagged[name] = f"FP16 underflow: {stats.underflow_share:.1%} of {name} would round to zero"
    overrides: dict[str, dict[str, Any]] = {}
    for node in model.graph:
        for value in list(node.outputs) + list(node.inputs):
            tensor = value.name if value is not None else None
            if tensor in flagged and node.name not in overrides:
                overrides[node.name] = {"reason": flagged[tensor], "module": _module(node), "tensor": tensor}
    return overrides


def default_plan(model: ir.Model, mode: str, options: dict[str, Any] | None = None) -> PrecisionPlan:
    """Every candidate node of ``mode`` lowered (no budget, no overflow check yet)."""
    nodes, modules = candidate_nodes(model, mode)
    return PrecisionPlan(mode=mode, nodes=nodes, modules=modules, options=dict(options or {}))


class _Reader:
    """ONNX Runtime CalibrationDataReader over a list of feeds."""

    def __init__(self, samples: list[dict[str, np.ndarray]]) -> None:
        self._iter = iter(samples)

    def get_next(self):
        return next(self._iter, None)

    def rewind(self) -> None:  # pragma: no cover - the tool reads once
        pass


def _calibration_cache(model: onnx.ModelProto, samples, method: str, cache_dir: Path | None) -> str | None:
    """A file for ONNX Runtime's calibration cache, keyed by model, samples and method."""
    if cache_dir is None:
        return None
    import hashlib

    key = hashlib.sha256(model.SerializeToString())
    key.update(method.encode())
    for feed in samples:
        for name in sorted(feed):
            key.update(name.encode() + np.ascontiguousarray(feed[name]).tobytes())
    Path(cache_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    return str(Path(cache_dir) / f"ort-calib-{key.hexdigest()[:24]}.json")


def _quantize_static(model: ir.Model, plan: PrecisionPlan, samples, fp8: bool, cache_dir: Path | None) -> ir.Model:
    """ONNX Runtime's static QDQ quantizer (INT8 or FP8 E4M3); it reads and writes files."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = plan.options.get("calibrate_method", "minmax").lower()
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile, "distribution": CalibrationMethod.Distribution}
    if method not in methods:
        raise SourceError(f"Unknown calibration method '{method}'.", f"Use one of {', '.join(methods)}.")
    qtype = QuantType.QFLOAT8E4M3FN if fp8 else QuantType.QInt8
    proto = ir.serde.serialize_model(model)  # the boundary: the tool takes a file
    with tempfile.TemporaryDirectory(prefix="adapter-quant-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(proto, src)
        quantize_static(
            str(src), str(dst), _Reader(samples), quant_format=QuantFormat.QDQ,
            per_channel=bool(plan.options.get("per_channel", not fp8)), activation_type=qtype, weight_type=qtype,
            nodes_to_quantize=plan.lowered, calibrate_method=CalibrationMethod.Distribution if fp8 else methods[method],
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
            calibration_cache_path=_calibration_cache(proto, samples, "distribution" if fp8 else method, cache_dir),
        )  # fmt: skip
        return ir.serde.deserialize_model(onnx.load(str(dst)))


NNCF_GUARD_FEEDS = 8
"""Random feeds drawn like the calibration samples, added to NNCF's calibration."""


def uses_nncf(model: ir.Model) -> bool:
    """Whether an OpenVINO INT8 static plan of ``model`` goes through NNCF: graphs with
    attention (a Softmax), for its transformer preset. Others keep ONNX Runtime's tool."""
    return any(node.op_type == "Softmax" for node in model.graph.all_nodes())


def _guard_feeds(samples: list[dict[str, np.ndarray]], count: int = NNCF_GUARD_FEEDS) -> list[dict[str, np.ndarray]]:
    """``count`` feeds shaped like the largest sample, values drawn as verification draws
    its random cases (integers within the samples' range, floats by their mean and spread):
    static ranges that also cover them keep an engine sane on inputs unlike the samples.
    MiniLM (every Linear INT8): verification's random-id case 0.895 -> 0.920 cosine to
    FP32; held-out sentences per-token mean 0.9969 -> 0.9971, min 0.9816 -> 0.9820."""
    largest = max(samples, key=lambda feed: sum(value.size for value in feed.values()))
    pooled = {name: np.concatenate([feed[name].ravel() for feed in samples]) for name in largest}
    specs = [TensorSpec(name, value.dtype.name, value.shape) for name, value in largest.items()]
    rng = np.random.default_rng(0)
    return [random_inputs(specs, pooled, rng) for _ in range(count)]


def _quantize_nncf(model: ir.Model, samples, lowered: list[str]) -> ir.Model:
    """NNCF's post-training INT8 quantization of the ONNX graph (QDQ out: activations
    with zero points, unsigned where NNCF picks; per-channel weights) with its transformer preset
    (SmoothQuant before the MatMuls, attention's own products left wider), calibrated on
    the samples and :func:`_guard_feeds`. Every weight op the plan does not lower is in
    NNCF's ignored scope. MiniLM on OpenVINO, every Linear INT8 (Zen 4, 2 cores):
    per-token cosine to FP32 on held-out sentences mean 0.997, min 0.982, at 0.63-0.69x
    OpenVINO BF16's latency; ONNX Runtime's QDQ (signed symmetric activations, no
    smoothing) misses cos 0.995 fully lowered."""
    import nncf

    proto = ir.serde.serialize_model(model)
    ignored = sorted({n.name for n in proto.graph.node if n.op_type in _WEIGHT_OPS} - set(lowered))
    nncf.set_log_level(logging.ERROR)
    feeds = [*samples, *_guard_feeds(samples)]
    with contextlib.redirect_stdout(io.StringIO()):  # its progress bars
        quantized = nncf.quantize(
            proto, nncf.Dataset(feeds), subset_size=len(feeds), model_type=nncf.ModelType.TRANSFORMER,
            ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
        )  # fmt: skip
    return ir.serde.deserialize_model(quantized)


def _quantize_int4(model: ir.Model, plan: PrecisionPlan, lowered: list[str]) -> ir.Model:
    """ONNX Runtime's ``MatMulNBits`` quantizer (INT4 weight-only); it takes a ModelProto."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        ir.serde.serialize_model(model), bits=4, block_size=int(plan.options.get("block_size", 32)), is_symmetric=True,
        accuracy_level=int(plan.options.get("accuracy_level", 4)), nodes_to_include=lowered,
    )  # fmt: skip
    quantizer.process()
    return ir.serde.deserialize_model(quantizer.model.model)


def _take_over(model: ir.Model, result: ir.Model) -> None:
    """Make ``model`` (the object a pass was given) hold ``result``'s graph and fields."""
    if result is model:
        return
    for attr in ("graph", "ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string", "device_configurations"):  # fmt: skip
        setattr(model, attr, getattr(result, attr))
    model.functions.clear()
    model.functions.update(result.functions)
    model.metadata_props.clear()
    model.metadata_props.update(result.metadata_props)


class ApplyPrecisionPlan(CountedPass):
    """Realise a :class:`PrecisionPlan` on an FP32 ``onnx_ir`` model, in place.

    FP16 is adapter's own conversion pass (:class:`~adapter.passes.float16.ConvertFloat`);
    INT8 dynamic first unpacks masked Attention and smooths activations over onnx-ir, then
    calls ONNX Runtime's quantizer; INT8/FP8 static and INT4 call ONNX Runtime's tools.
    Those tools take and give a ModelProto (serialized here, at the call): their result
    replaces the model's graph, so the :class:`onnx_ir.Model` object given is the one
    changed (an in-place pass), while its graph object may be a new one.

    ``samples`` calibrate static quantization (its ranges cached in ``cache_dir``) and
    smoothing. What the tools reported (conversion counters, Attention nodes unpacked,
    tensors smoothed) also goes into ``plan.measured``, as :func:`apply_plan` always did.

    Counters: ``nodes_lowered`` (plan nodes run in the low precision in the graph; 0 for
    FP32 and BF16, whose graph stays FP32), ``kept_fp32`` (the plan's overrides),
    ``weights_7bit`` (INT8 dynamic MatMuls given 7-bit weights), ``smoothed_tensors`` and
    ``attention_unpacked``.

    Raises:
        SourceError: The plan names nodes the model does not have, or an unknown mode.
        AdapterError: A tool failed.
    """

    name = "apply-precision-plan"

    def __init__(
        self, plan: PrecisionPlan, samples: list[dict[str, np.ndarray]] | None = None, cache_dir: Path | None = None
    ) -> None:
        super().__init__()
        self.plan, self.samples, self.cache_dir = plan, samples, cache_dir

    def apply(self, model: ir.Model) -> dict[str, Any]:
        plan = self.plan
        present = {node.name for node in model.graph}
        missing = [n for n in plan.nodes if n not in present]
        if missing:
            raise SourceError(
                f"The precision plan names {len(missing)} node(s) the model does not have (e.g. {', '.join(missing[:3])}).",
                "A plan only fits the model (and adapter version) it was made for.",
            )
        lowered = plan.lowered
        counters = {"nodes_lowered": 0, "kept_fp32": len(plan.overrides), "weights_7bit": 0, "smoothed_tensors": 0, "attention_unpacked": 0}  # fmt: skip
        if plan.mode in ("fp32", "bf16") or not lowered:
            return counters
        with _quiet_root_logger():
            counters.update(_apply(model, plan, lowered, self.samples, self.cache_dir))
        counters["nodes_lowered"] = len(lowered)
        return counters


def apply_plan(
    model: ir.Model, plan: PrecisionPlan, samples: list[dict[str, np.ndarray]] | None = None, cache_dir: Path | None = None
) -> ir.Model:
    """Realise a plan on an FP32 model; returns a new model (the input is not changed).

    :class:`ApplyPrecisionPlan` run on a clone of ``model`` (which shares its tensors):
    the plan search applies many plans to the same FP32 model.

    Raises:
        AdapterError: The plan's nodes are missing from the model, or a tool failed.
    """
    result = model.clone()
    ApplyPrecisionPlan(plan, samples, cache_dir)(result)
    return result


@contextlib.contextmanager
def _quiet_root_logger():
    """ONNX Runtime's quantization tool warns on the root logger at every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _apply(model: ir.Model, plan: PrecisionPlan, lowered: list[str], samples, cache_dir) -> dict[str, int]:
    """Lower ``model`` in place; returns counters of what was done on the way."""
    try:
        if plan.mode == "fp16":
            conversion = ConvertFloat(ir.DataType.FLOAT16, KEEP_FP32_OPS, set(plan.overrides))
            conversion(model)
            ir.passes.common.RemoveUnusedNodesPass()(model)
            plan.measured.setdefault("conversion", conversion.record.counters)
            return {}
        if plan.mode == "int8-dynamic":
            prepared, lowered, renamed, smoothed = _prepare_dynamic(model, plan, lowered, samples)
            narrow = {renamed.get(n, n) for n in plan.options.get("narrow_weights", ())} & set(lowered)
            per_channel = bool(plan.options.get("per_channel", True))
            _take_over(model, _quantize_dynamic(prepared, lowered, per_channel, narrow))
            return {"weights_7bit": len(narrow), "smoothed_tensors": smoothed, "attention_unpacked": len(renamed)}
        if plan.mode in ("int8", "fp8") and not samples:
            raise AdapterError(f"Static {plan.mode} quantization needs calibration samples.")
        if plan.mode == "int8" and plan.options.get("quantizer") == "nncf":
            _take_over(model, _quantize_nncf(model, samples, lowered))
            return {}
        if plan.mode in ("int8", "fp8"):
            _take_over(model, _quantize_static(model, plan, samples, plan.mode == "fp8", cache_dir))
            return {}
        if plan.mode == "int4-weight":
            _take_over(model, _quantize_int4(model, plan, lowered))
            return {}
    except AdapterError:
        raise
    except Exception as exc:
        raise AdapterError(f"ONNX Runtime's {plan.mode} tool failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
    raise SourceError(f"Unknown precision mode '{plan.mode}'.", f"Use one of {', '.join(MODES)}.")


def _prepare_dynamic(model: ir.Model, plan: PrecisionPlan, lowered: list[str], samples):
    """The FP32 model INT8 dynamic quantizes: masked Attention unpacked (in ``model``,
    in place), activations smoothed (a new model when any is).

    Returns the model, the lowered node names in it, the plan's renamed nodes and the
    count of smoothed tensors.
    """
    # Attention nodes with a mask bias: QKV MatMul + MultiHeadAttention, then the MatMul
    # is what gets quantized (and smoothed)
    wanted = set(lowered)
    masked = [
        n.name for n in model.graph
        if n.name in wanted and n.op_type == "Attention" and any(v is not None for v in n.inputs[5:])
    ]  # fmt: skip
    renamed = unpack_attention.unpack(model, masked)
    lowered = [renamed.get(name, name) for name in lowered]
    if renamed:
        plan.measured.setdefault("attention_unpacked", len(renamed))
    alpha = plan.options.get("smooth_alpha")
    smoothed = 0
    if alpha and samples:  # SmoothQuant-style channel balancing (passes/smoothing.py)
        model, smoothed = smooth(model, lowered, samples, float(alpha))
        plan.measured.setdefault("smoothed_tensors", smoothed)
    return model, lowered, renamed, smoothed


def _quantize_dynamic(model: ir.Model, lowered: list[str], per_channel: bool, narrow: set[str]) -> ir.Model:
    """ONNX Runtime's dynamic quantizer over ``lowered``: the ``narrow`` nodes with 7-bit
    weights (its ``reduce_range``, see passes/saturation.py), the others with 8-bit.

    The tool reads and writes files: the model is serialized here and the result read back."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="adapter-quant-") as tmp:
        src = Path(tmp) / "in.onnx"
        onnx.save(ir.serde.serialize_model(model), src)
        for step, reduce_range in enumerate((True, False)):  # the narrow nodes first, then the rest
            nodes = [n for n in lowered if (n in narrow) == reduce_range]
            if not nodes:
                continue
            dst = Path(tmp) / f"out{step}.onnx"
            quantize_dynamic(
                str(src), str(dst), per_channel=per_channel, reduce_range=reduce_range,
                weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
            )  # fmt: skip
            src = dst
        return ir.serde.deserialize_model(onnx.load(str(src)))


def fit_weight_widths(
    model: ir.Model, plan: PrecisionPlan, samples: list[dict[str, np.ndarray]], probe: int = 16
) -> dict[str, Any]:
    """Measure every lowered MatMul of an INT8 dynamic plan with 8-bit and with 7-bit
    weights on this machine's kernels (passes/saturation.py).

    Returns ``{"narrow": [plan node names better with 7 bits], "errors": {node: {"int8":
    e8, "int7": e7}}}``; the caller puts ``narrow`` into ``options["narrow_weights"]``.
    """
    if plan.mode != "int8-dynamic" or not samples:
        return {"narrow": [], "errors": {}}
    with _quiet_root_logger():
        prepared, names, renamed, _ = _prepare_dynamic(model.clone(), plan, plan.lowered, samples)
        per_channel = bool(plan.options.get("per_channel", True))
        feeds = samples[:probe]
        eight = matmul_errors(prepared, _quantize_dynamic(prepared, names, per_channel, set()), names, feeds)
        seven = matmul_errors(prepared, _quantize_dynamic(prepared, names, per_channel, set(names)), names, feeds)
    back = {new: old for old, new in renamed.items()}
    return {
        "narrow": [back.get(n, n) for n in narrower(eight, seven)],
        "errors": {back.get(n, n): {"int8": round(eight[n], 5), "int7": round(seven[n], 5)} for n in eight if n in seven},
    }


def model_size(model: ir.Model) -> int:
    """Bytes of the serialised model (weights included)."""
    return ir.serde.serialize_model(model).ByteSize()
