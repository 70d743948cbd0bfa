"""ApplyPrecisionPlan: a precision plan realised by an in-place onnx-ir pass.

The three parts: the op types after the pass, the function before and after it on fresh
random inputs through ONNX Runtime (cosine for quantized graphs, close values for FP16),
and plans under which it must not fire. On a small MatMul graph (no model export).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from adapter.core.errors import SourceError
from adapter.passes.precision import ApplyPrecisionPlan, PrecisionPlan, apply_plan, candidate_nodes


def _model() -> ir.Model:
    """x [B, 32] -> Mul (channel 0 an outlier) -> two MatMuls with constant weights (``up``
    and ``side``) -> Relu and Add -> y."""
    rng = np.random.default_rng(0)
    gain = np.ones(32, np.float32)
    gain[0] = 40.0
    inits = [
        numpy_helper.from_array(gain, "gain"),
        numpy_helper.from_array((rng.standard_normal((32, 16)) / 6).astype(np.float32), "w_up"),
        numpy_helper.from_array((rng.standard_normal((32, 16)) / 6).astype(np.float32), "w_side"),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "gain"], ["a"], name="scale"),
        helper.make_node("MatMul", ["a", "w_up"], ["u"], name="up"),
        helper.make_node("Relu", ["u"], ["r"], name="relu"),
        helper.make_node("MatMul", ["a", "w_side"], ["s"], name="side"),
        helper.make_node("Add", ["r", "s"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 16])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # typed intermediates, as after the canonical pipeline (the FP16 conversion reads them)
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))
    for node in model.graph:
        node.metadata_props["adapter.module"] = f"layers.{node.name}"
    return model


def _samples(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((8, 32)).astype(np.float32)} for _ in range(n)]


def _run(model: ir.Model, feed: dict[str, np.ndarray]) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], feed)[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def test_int8_dynamic_plan_is_realised_in_place_with_counters():
    model = _model()
    fresh = _samples(4, 9)
    want = [_run(model, feed) for feed in fresh]
    names, modules = candidate_nodes(model, "int8-dynamic")
    assert names == ["up", "side"] and modules == {"up": "layers.up", "side": "layers.side"}
    options = {"per_channel": True, "smooth_alpha": 0.5, "narrow_weights": ["up"]}
    plan = PrecisionPlan(mode="int8-dynamic", nodes=names, modules=modules, options=options)
    applying = ApplyPrecisionPlan(plan, _samples(8, 1))
    result = applying(model)
    assert result.model is model and result.modified
    # op types: both MatMuls quantized (integer MatMul on a dynamically quantized input),
    # behind one smoothing divisor on their shared activation
    ops = _ops(model)
    assert "MatMul" not in ops and ops.count("MatMulInteger") == 2 and "DynamicQuantizeLinear" in ops
    assert ops.count("Mul") >= 2 and "smooth" in " ".join(n.name for n in model.graph)
    assert applying.record.counters == {
        "nodes_lowered": 2, "kept_fp32": 0, "weights_7bit": 1, "smoothed_tensors": 1, "attention_unpacked": 0,
    }  # fmt: skip
    assert plan.measured == {"smoothed_tensors": 1}  # what apply_plan has always recorded
    assert applying.record.op_delta["MatMul"] == -2
    for feed, expected in zip(fresh, want):  # the same function, to INT8 rounding
        assert _cosine(_run(model, feed), expected) > 0.995


def test_fp16_plan_keeps_its_overrides_and_the_function():
    model = _model()
    fresh = _samples(3, 11)
    want = [_run(model, feed) for feed in fresh]
    names, modules = candidate_nodes(model, "fp16")
    plan = PrecisionPlan(mode="fp16", nodes=names, modules=modules, overrides={"side": {"reason": "test"}})
    applying = ApplyPrecisionPlan(plan)
    assert applying(model).modified
    assert "Cast" in _ops(model)
    side = next(n for n in model.graph if n.name == "side")
    assert side.outputs[0].dtype == ir.DataType.FLOAT
    up = next(n for n in model.graph if n.name == "up")
    assert side.inputs[1].const_value.dtype == ir.DataType.FLOAT  # the kept MatMul's weight stays FP32
    assert up.inputs[1].const_value.dtype == ir.DataType.FLOAT16
    assert applying.record.counters["nodes_lowered"] == len(names) - 1 and applying.record.counters["kept_fp32"] == 1
    assert plan.measured["conversion"]["nodes_lowered"] > 0
    assert [o.dtype for o in model.graph.outputs] == [ir.DataType.FLOAT]  # the interface stays FP32
    for feed, expected in zip(fresh, want):
        np.testing.assert_allclose(_run(model, feed), expected, rtol=2e-2, atol=2e-2)


def test_apply_plan_runs_the_pass_on_a_clone():
    """The search applies many plans to one FP32 model: apply_plan leaves it as it was (types
    included: a clone shares type objects, which the FP16 conversion would change)."""
    model = _model()
    before = ir.serde.serialize_model(model).SerializeToString()
    names, modules = candidate_nodes(model, "fp16")
    lowered = apply_plan(model, PrecisionPlan(mode="fp16", nodes=names, modules=modules))
    assert "Cast" in _ops(lowered) and "Cast" not in _ops(model)
    assert ir.serde.serialize_model(model).SerializeToString() == before
    names, modules = candidate_nodes(model, "int8-dynamic")
    quantized = apply_plan(model, PrecisionPlan(mode="int8-dynamic", nodes=names, modules=modules))
    assert "MatMulInteger" in _ops(quantized)
    assert ir.serde.serialize_model(model).SerializeToString() == before


@pytest.mark.parametrize(
    "plan",
    [
        PrecisionPlan(mode="fp32"),
        PrecisionPlan(mode="bf16"),  # a backend hint: the graph stays FP32
        PrecisionPlan(mode="int8-dynamic", nodes=["up", "side"], overrides={"up": {}, "side": {}}),  # all kept
    ],
    ids=["fp32", "bf16", "all-kept"],
)
def test_plans_that_lower_nothing_leave_the_graph_alone(plan):
    model = _model()
    before = ir.serde.serialize_model(model).SerializeToString()
    applying = ApplyPrecisionPlan(plan)
    result = applying(model)
    assert applying.record.counters["nodes_lowered"] == 0 and applying.record.op_delta == {}
    assert result.modified == bool(plan.overrides)  # only the kept count is non-zero
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_a_plan_for_another_model_is_refused_before_anything_changes():
    model = _model()
    before = ir.serde.serialize_model(model).SerializeToString()
    plan = PrecisionPlan(mode="int8-dynamic", nodes=["up", "not_here"])
    with pytest.raises(SourceError, match="names 1 node"):
        ApplyPrecisionPlan(plan)(model)
    assert ir.serde.serialize_model(model).SerializeToString() == before
