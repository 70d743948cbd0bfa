"""Activation smoothing before INT8 dynamic: same FP32 function, better INT8 accuracy, and
it leaves alone what it must."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from adapter.passes.smoothing import smooth


def _graph(outlier: float = 50.0, dynamic_weight: bool = False) -> ir.Model:
    """x [B, 16] -> two MatMuls reading the same activation (one lowered, one kept) and a
    third whose weight is a graph input. Channel 0 of the activation is ``outlier`` times
    larger than the others."""
    rng = np.random.default_rng(0)
    gain = np.ones(16, np.float32)
    gain[0] = outlier
    inits = [
        numpy_helper.from_array(gain, "gain"),
        numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "gain"], ["a"], name="scale"),
        helper.make_node("MatMul", ["a", "w1"], ["y1"], name="lowered"),
        helper.make_node("MatMul", ["a", "w2"], ["y2"], name="kept"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 16])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y1", "y2")]
    if dynamic_weight:
        nodes.append(helper.make_node("MatMul", ["a", "wd"], ["y3"], name="dynamic"))
        inputs.append(helper.make_tensor_value_info("wd", TensorProto.FLOAT, [16, 8]))
        outputs.append(helper.make_tensor_value_info("y3", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _run(model: ir.Model, feed):
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def _samples(n: int, seed: int, extra=None):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 16)).astype(np.float32), **(extra or {})} for _ in range(n)]


def test_smoothing_inserts_one_divisor_and_keeps_the_function():
    model = _graph()
    smoothed, count = smooth(model, ["lowered"], _samples(8, 1))
    assert count == 1
    ops = [n.op_type for n in smoothed.graph]
    assert ops.count("Mul") == 2  # the model's own scale, plus one divisor
    kept = next(n for n in smoothed.graph if n.name == "kept")
    assert [v.name for v in kept.inputs] == ["a", "w2"]  # the FP32 MatMul still reads the original
    lowered = next(n for n in smoothed.graph if n.name == "lowered")
    assert [v.name for v in lowered.inputs] == ["a_smoothed", "w1"]
    assert [n.op_type for n in model.graph].count("Mul") == 1  # the model given is not changed
    assert not np.array_equal(lowered.inputs[1].const_value.numpy(), model.graph.initializers["w1"].const_value.numpy())
    for feed in _samples(3, 7):  # fresh inputs: the same function
        want, got = _run(model, feed), _run(smoothed, feed)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_smoothing_makes_int8_dynamic_more_accurate(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = _graph(outlier=200.0)
    calibration, fresh = _samples(16, 2), _samples(8, 3)
    smoothed, _ = smooth(model, ["lowered"], calibration)

    def int8_error(m: ir.Model) -> float:
        src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
        ir.save(m, src)
        quantize_dynamic(
            str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8, nodes_to_quantize=["lowered"]
        )
        quantized = ir.load(str(dst))
        errors = []
        for feed in fresh:
            want = _run(model, feed)["y1"]
            got = _run(quantized, feed)["y1"]
            errors.append(np.abs(got - want).mean() / np.abs(want).mean())
        return float(np.mean(errors))

    plain, balanced = int8_error(model), int8_error(smoothed)
    assert balanced < 0.5 * plain, (plain, balanced)


def test_smoothing_leaves_non_constant_weights_and_empty_plans_alone():
    model = _graph(dynamic_weight=True)
    feed = _samples(4, 4, {"wd": np.ones((16, 8), np.float32)})
    smoothed, count = smooth(model, ["dynamic"], feed)
    assert count == 0 and [n.op_type for n in smoothed.graph] == [n.op_type for n in model.graph]
    assert smooth(model, [], feed)[1] == 0 and smooth(model, ["lowered"], [])[1] == 0


def test_smoothing_skips_activations_without_outlier_channels():
    """Channel maxima within 10x of each other: no divisor Mul (it would cost a pass over
    the tensor for no accuracy)."""
    smoothed, count = smooth(_graph(outlier=2.0), ["lowered"], _samples(8, 1))
    assert count == 0 and [n.op_type for n in smoothed.graph].count("Mul") == 1


def test_the_smoothing_strength_is_chosen_by_measurement():
    """Under a budget, each strength's fully lowered plan is measured and the best kept:
    the scores are those the evaluator gives each plan, and smoothing beats none on an
    activation with an outlier channel."""
    from adapter.core.budget import parse_budget
    from adapter.passes.precision import PrecisionPlan
    from adapter.passes.sensitivity import Evaluator, choose_option, ort_runner

    model = _graph(outlier=200.0)
    plan = PrecisionPlan(
        mode="int8-dynamic", nodes=["lowered"], modules={}, options={"per_channel": True, "smooth_alpha": 0.5}
    )
    evaluator = Evaluator(
        model, _samples(16, 2), _samples(8, 3), parse_budget("cos>=0.9999"), lambda m, _hint: ort_runner(m, 1)
    )
    chosen, scores = choose_option(plan, evaluator, "smooth_alpha", (0.0, 0.5, 0.8))
    assert set(scores) == {"0.0", "0.5", "0.8"} and evaluator.runs == 3
    best = max(scores, key=scores.get)
    assert chosen.options["smooth_alpha"] == float(best) and chosen.nodes == plan.nodes
    assert scores["0.0"] < scores[best] and best != "0.0", scores
    again = PrecisionPlan(**{**plan.__dict__, "options": {**plan.options, "smooth_alpha": float(best)}})
    assert abs(evaluator.budget.score(evaluator.measure(again)) - scores[best]) < 1e-6
    assert plan.options["smooth_alpha"] == 0.5  # the plan given is not changed
