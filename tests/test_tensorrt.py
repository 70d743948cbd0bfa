"""TensorRT backend: the TensorRT-ready ONNX, optimization profiles, the build recipe, Q/DQ rules,
and the ONNX Runtime stand-in's numerics. Nothing here needs a GPU; building and running a
plan is not faked."""

from __future__ import annotations

import ast
import json
import logging
import shlex

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from adapter.backends import tensorrt as trt_backend
from adapter.backends.documented import TENSORRT
from adapter.core.errors import AdapterError, UnsupportedOpsError
from adapter.core.specs import Dim, TensorSpec
from adapter.profiles import load_profile

RNG = np.random.default_rng(7)
W = RNG.standard_normal((8, 16)).astype(np.float32)
B = RNG.standard_normal(16).astype(np.float32)
BATCH, SEQ = Dim("batch", 1, 32), Dim("seq", 1, 128)
SPECS = (
    [TensorSpec("x", "float32", (BATCH, SEQ, 8))],
    [TensorSpec("y", "float32", (BATCH, SEQ, 16))],
)


def _proto(nodes=None, opset: int = 20, domains=()) -> onnx.ModelProto:
    """softmax(relu(x @ W + B)) over a dynamic batch and sequence."""
    nodes = nodes or [
        helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "B"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Softmax", ["r"], ["y"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=opsets)


def _model(**kwargs) -> ir.Model:
    return ir.serde.deserialize_model(_proto(**kwargs))


def _compile(tmp_path, target="nvidia-h100", model=None, **overrides):
    profile = load_profile(target)
    overrides.setdefault("build", "never")  # the recipe only, whatever this machine has
    options = trt_backend.Options.from_profile(profile, overrides)
    return trt_backend.compile(model or _model(), profile, options, SPECS, tmp_path)


def _numpy_reference(x: np.ndarray) -> np.ndarray:
    z = np.maximum(x @ W + B, 0.0)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_onnx_is_checker_valid_and_only_uses_listed_ops(tmp_path):
    engine = _compile(tmp_path)
    path = tmp_path / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    written = onnx.load(str(path))
    assert {o.domain for o in written.opset_import} <= {"", "ai.onnx"}
    assert all(n.domain in ("", "ai.onnx") and TENSORRT.supports(n.op_type) for n in written.graph.node)
    assert {"model.onnx", "profiles.json", "build.py", "build.sh", "README.md"} <= set(engine.files())
    assert all((tmp_path / f).is_file() for f in engine.files())


def test_an_op_outside_the_list_is_refused_with_its_name(tmp_path):
    proto = _proto(
        nodes=[
            helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
            helper.make_node("Unique", ["m"], ["y"], name="ln"),  # marked N in the TensorRT 10 matrix
        ]
    )
    model = ir.serde.deserialize_model(proto)
    node = next(n for n in model.graph if n.op_type == "Unique")
    answer = trt_backend.supports(node, model)
    assert not answer and "Unique" in answer.reason and "onnx-tensorrt" in answer.reason
    assert trt_backend.supports(next(n for n in model.graph if n.op_type == "MatMul"), model)
    with pytest.raises(UnsupportedOpsError) as caught:
        _compile(tmp_path, model=model)
    assert "node 'ln'" in str(caught.value) and "Unique" in str(caught.value)


def test_a_com_microsoft_op_is_refused_naming_its_domain(tmp_path):
    proto = _proto(
        nodes=[
            helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
            helper.make_node("BiasGelu", ["m", "B"], ["y"], name="gelu", domain="com.microsoft"),
        ],
        domains=("com.microsoft",),
    )
    model = ir.serde.deserialize_model(proto)
    node = next(n for n in model.graph if n.op_type == "BiasGelu")
    answer = trt_backend.supports(node, model)
    assert not answer and "com.microsoft" in answer.reason and "standard domain" in answer.reason
    with pytest.raises(UnsupportedOpsError, match="node 'gelu'"):
        _compile(tmp_path, model=model)


def test_profiles_give_min_opt_max_for_dynamic_batch_and_sequence(tmp_path):
    _compile(tmp_path / "a", opt_dims={"batch": 4, "seq": 64})
    profiles = json.loads((tmp_path / "a" / "profiles.json").read_text())
    x = profiles["profiles"][0]["inputs"]["x"]
    assert x["dynamic"] and x["dims"] == ["batch", "seq", None]
    assert (x["min"], x["opt"], x["max"]) == ([1, 1, 8], [4, 64, 8], [32, 128, 8])
    assert profiles["dims"]["seq"]["opt_from"] == "example inputs"
    # without example sizes the builder optimises for the range maximum, and says so
    _compile(tmp_path / "b")
    x = json.loads((tmp_path / "b" / "profiles.json").read_text())["profiles"][0]["inputs"]["x"]
    assert x["opt"] == [32, 128, 8]
    # an example size outside the range is clamped into it
    _compile(tmp_path / "c", opt_dims={"batch": 999, "seq": 3})
    x = json.loads((tmp_path / "c" / "profiles.json").read_text())["profiles"][0]["inputs"]["x"]
    assert x["opt"] == [32, 3, 8]


_SWITCH = {"FP16": "--fp16", "BF16": "--bf16", "INT8": "--int8", "FP8": "--fp8"}


@pytest.mark.parametrize(
    "precision, flags",
    [("fp32", []), ("fp16", ["FP16"]), ("bf16", ["BF16"]), ("int8", ["INT8"]), ("fp8", ["FP8"])],
)
def test_build_script_and_trtexec_line_per_precision(tmp_path, precision, flags):
    engine = _compile(tmp_path, precision=precision, opt_dims={"batch": 2, "seq": 16}, tf32=False)
    source = (tmp_path / "build.py").read_text()
    ast.parse(source)
    compile(source, "build.py", "exec")  # the builtin compile: valid Python, not run
    assert engine.config["builder_flags"] == flags
    for flag in _SWITCH:
        assert (f'set_precision(config, "{flag}")' in source) == (flag in flags), flag
    for needed in (
        "trt.OnnxParser(",
        "parse_from_file(",
        "create_builder_config()",
        "builder_optimization_level = OPTIMIZATION_LEVEL",
        "set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE",
        "create_optimization_profile()",
        'set_shape(name, shapes["min"], shapes["opt"], shapes["max"])',
        "create_timing_cache(",
        "set_timing_cache(",
        "build_serialized_network(",
        "os.replace(",
        "config.clear_flag(trt.BuilderFlag.TF32)",
        "EXPLICIT_BATCH",
    ):
        assert needed in source, needed
    assert "int8_calibrator" not in source  # explicit Q/DQ: no calibrator
    args = shlex.split((tmp_path / "build.sh").read_text().replace("\\\n", " ").split('cd "$(dirname "$0")"')[1])
    assert args[0] == "trtexec" and "--onnx=model.onnx" in args and "--saveEngine=model.plan" in args
    assert "--minShapes=x:1x1x8" in args and "--optShapes=x:2x16x8" in args and "--maxShapes=x:32x128x8" in args
    assert "--timingCacheFile=timing.cache" in args and "--builderOptimizationLevel=3" in args
    assert "--memPoolSize=workspace:4096M" in args and "--noTF32" in args
    assert {a for a in args if a in _SWITCH.values()} == {_SWITCH[f] for f in flags}
    assert args == engine.config["trtexec"]


def test_a_precision_the_target_lacks_is_refused(tmp_path):
    with pytest.raises(AdapterError, match="FP8.*nvidia-a100"):
        _compile(tmp_path, target="nvidia-a100", precision="fp8")


def test_stand_in_matches_numpy_on_dynamic_shapes(tmp_path):
    engine = _compile(tmp_path)
    assert not engine.runs_here
    stand_in, description = engine.stand_in()
    assert "ONNX Runtime" in description and "model.onnx" in description
    for shape in [(1, 1, 8), (3, 5, 8), (32, 128, 8)]:
        x = RNG.standard_normal(shape).astype(np.float32)
        (y,) = stand_in.run({"x": x}).values()
        np.testing.assert_allclose(y, _numpy_reference(x), rtol=1.3e-6, atol=1e-6)


def test_report_says_no_engine_was_built(tmp_path):
    engine = _compile(tmp_path)
    note = engine.config["note"]
    assert engine.config["engine_built"] is False and not engine.runs_here
    assert note.startswith("No TensorRT engine was built: ") and "python build.py" in note and "trtexec" in note
    assert note in (tmp_path / "README.md").read_text()
    assert "model.plan" not in engine.files()
    with pytest.raises(AdapterError, match="No TensorRT engine was built"):
        engine.run({"x": np.zeros((1, 1, 8), np.float32)})


@pytest.mark.skipif(
    trt_backend._unavailable() is None, reason="TensorRT and a CUDA GPU are present here: compile builds the plan"
)
def test_without_tensorrt_or_gpu_the_reason_is_named(tmp_path):
    engine = _compile(tmp_path, build="auto")
    assert engine.config["note"] == (
        f"No TensorRT engine was built: {trt_backend._unavailable()}. "
        "Build it on the target with: python build.py (or the trtexec line in build.sh)."
    )
    assert trt_backend.version() in ("not installed", "not importable") or "GPU" in engine.config["note"]


# ---------------------------------------------------------------- explicit quantization


def _qdq(op, x, scale, zero, name, **attrs):
    inputs = [x, scale] + ([zero] if zero else [])
    return helper.make_node(op, inputs, [f"{name}_out"], name=name, **attrs)


def _qdq_model(zero_dtype=TensorProto.INT8, zero_value=0, act_scales=1, weight_axis=1, opset=20) -> ir.Model:
    """x -Q/DQ-> MatMul with a per-channel DQ weight [8, 16]."""
    np_zero = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8}[zero_dtype]
    weight = np.clip(np.round(W * 20), -127, 127).astype(np.int8)
    channels = W.shape[weight_axis]
    inits = [
        numpy_helper.from_array(weight, "Wq"),
        numpy_helper.from_array(np.full(channels, 0.05, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(channels, np.int8), "w_zero"),
        numpy_helper.from_array(
            np.full(act_scales, 0.02, np.float32).reshape(() if act_scales == 1 else (8,)), "x_scale"
        ),
        numpy_helper.from_array(
            np.full(act_scales, zero_value, np_zero).reshape(() if act_scales == 1 else (8,)), "x_zero"
        ),
    ]
    nodes = [
        _qdq("QuantizeLinear", "x", "x_scale", "x_zero", "q_x", **({"axis": 2} if act_scales > 1 else {})),
        helper.make_node(
            "DequantizeLinear",
            ["q_x_out", "x_scale", "x_zero"],
            ["x_dq"],
            name="dq_x",
            **({"axis": 2} if act_scales > 1 else {}),
        ),  # fmt: skip
        helper.make_node("DequantizeLinear", ["Wq", "w_scale", "w_zero"], ["w_dq"], name="dq_w", axis=weight_axis),
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16])],
        inits,
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def test_qdq_that_follows_tensorrt_rules_passes():
    assert trt_backend.check_qdq(_qdq_model()) == []


@pytest.mark.parametrize(
    "kwargs, nodes, words",
    [
        ({"zero_dtype": TensorProto.UINT8, "zero_value": 128}, {"q_x", "dq_x"}, "UINT8"),
        ({"zero_value": 3}, {"q_x", "dq_x"}, "is not 0"),
        ({"act_scales": 8}, {"q_x", "dq_x"}, "activations per tensor"),
        ({"weight_axis": 0}, {"dq_w"}, "output channels on axis 1"),
        ({"opset": 12}, {"q_x", "dq_x", "dq_w"}, "opset 13"),
    ],
)
def test_qdq_breaking_tensorrt_rules_is_named(kwargs, nodes, words):
    problems = trt_backend.check_qdq(_qdq_model(**kwargs))
    assert {p.node for p in problems} == nodes
    assert all(words in p.reason for p in problems)


def _ort_quantized(symmetric: bool = True) -> onnx.ModelProto:
    """What adapter's INT8 static mode produces: ONNX Runtime's QDQ quantizer, per-channel weights."""
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    gemm = [
        helper.make_node("Gemm", ["x2", "G", "GB"], ["y"], name="gemm", transB=1),
    ]
    graph = helper.make_graph(
        gemm,
        "g",
        [helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(W[:, :4].T.copy(), "G"), numpy_helper.from_array(B[:4].copy(), "GB")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    samples = iter([{"x2": RNG.standard_normal((2, 8)).astype(np.float32)} for _ in range(4)])

    class Reader:
        def get_next(self):
            return next(samples, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            onnx.save(proto, src)
            quantize_static(
                str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
            )  # fmt: skip
            return onnx.load(str(dst))
    finally:
        root.setLevel(level)


def test_ort_int8_bias_dequantize_is_folded_exactly(tmp_path):
    import onnxruntime as ort

    quantized = _ort_quantized()
    model = ir.serde.deserialize_model(quantized)
    problems = trt_backend.check_qdq(model)
    assert problems and all("INT32" in p.reason for p in problems)  # ORT quantizes the Gemm bias to INT32
    specs = ([TensorSpec("x2", "float32", (BATCH, 8))], [TensorSpec("y", "float32", (BATCH, 4))])
    profile = load_profile("nvidia-h100")
    options = trt_backend.Options.from_profile(profile, {"build": "never"})
    engine = trt_backend.compile(model, profile, options, specs, tmp_path)
    assert engine.config["folded_bias_dequantize"] == 1 and engine.config["builder_flags"] == ["INT8"]
    written = ir.load(tmp_path / "model.onnx")
    assert trt_backend.check_qdq(written) == []
    x = RNG.standard_normal((5, 8)).astype(np.float32)
    (expected,) = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x2": x}
    )
    stand_in, _ = engine.stand_in()
    np.testing.assert_array_equal(stand_in.run({"x2": x})["y"], expected)


def test_asymmetric_ort_activations_are_refused(tmp_path):
    model = ir.serde.deserialize_model(_ort_quantized(symmetric=False))
    specs = ([TensorSpec("x2", "float32", (BATCH, 8))], [TensorSpec("y", "float32", (BATCH, 4))])
    profile = load_profile("nvidia-h100")
    with pytest.raises(UnsupportedOpsError, match="is not 0: TensorRT's quantization is symmetric"):
        trt_backend.compile(
            model, profile, trt_backend.Options.from_profile(profile, {"build": "never"}), specs, tmp_path
        )
