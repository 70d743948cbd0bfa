"""INT8 dynamic weight widths measured on this CPU's kernels (passes/saturation.py).

The saturating case is built so that the u8 x s8 pair sums of ``vpmaddubsw`` exceed the
16-bit range (positive activations near 255 next to weights near 127): on a CPU whose
kernel saturates (AVX2, AVX-512 without VNNI) the measured 8-bit error is far above what
exact integer arithmetic gives and 7-bit weights win; on a CPU that accumulates in 32
bits (VNNI, ARM) the measured error equals the exact one and 8 bits stay. Which case this
machine is, is measured first, independently of the code under test.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from adapter.passes.precision import PrecisionPlan, _quantize_dynamic, apply_plan, fit_weight_widths
from adapter.passes.saturation import matmul_errors, narrower


def _model() -> ir.Model:
    """Two MatMuls: ``loud`` reads sigmoid(x) (all positive: u8 values up to 255) with
    positive weights (near +127 once quantized); ``quiet`` reads x with signed weights whose
    quantized magnitudes stay small (one row sets every column's scale)."""
    rng = np.random.default_rng(0)
    quiet = rng.standard_normal((64, 16)).astype(np.float32)
    quiet[0] = 8.0 * np.abs(quiet).max(axis=0)  # one large row sets each column's scale
    inits = [
        numpy_helper.from_array(rng.uniform(0.6, 1.0, (64, 16)).astype(np.float32), "w_loud"),
        numpy_helper.from_array(quiet, "w_quiet"),
    ]
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["s"], name="squash"),
        helper.make_node("MatMul", ["s", "w_loud"], ["y_loud"], name="loud"),
        helper.make_node("MatMul", ["x", "w_quiet"], ["y_quiet"], name="quiet"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 64])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y_loud", "y_quiet")],
        inits,
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _samples(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return [{"x": (3.0 * rng.standard_normal((8, 64)) + 2.0).astype(np.float32)} for _ in range(n)]


def _kernel_saturates() -> bool:
    """Does this CPU's u8 x s8 MatMulInteger differ from exact integer arithmetic on a
    product built to overflow 16-bit pair sums? (Measured without the code under test.)"""
    a = np.full((4, 64), 250, np.uint8)
    b = np.full((64, 8), 120, np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
        [numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"a": a})[0]
    return not np.array_equal(got, a.astype(np.int64) @ b.astype(np.int64))


def _session(model: ir.Model) -> ort.InferenceSession:
    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _exact_int8_error(model: ir.Model, quantized: ir.Model, samples) -> float:
    """Relative error of ``loud`` computed in exact arithmetic from the quantized weights
    (the ONNX DynamicQuantizeLinear formula for the activation)."""
    inits = {name: v.const_value.numpy() for name, v in quantized.graph.initializers.items()}
    q_name = next(n for n, v in inits.items() if n.startswith("w_loud") and v.dtype == np.int8 and v.shape == (64, 16))
    scale = next(v for n, v in inits.items() if n.startswith("w_loud") and "scale" in n)
    w = model.graph.initializers["w_loud"].const_value.numpy().astype(np.float64)
    err = ref = 0.0
    for feed in samples:
        s = 1.0 / (1.0 + np.exp(-feed["x"].astype(np.float64)))
        lo, hi = min(0.0, s.min()), max(0.0, s.max())
        a_scale = np.float32((hi - lo) / 255.0)
        zero = np.clip(np.round(-lo / a_scale), 0, 255)
        q = np.clip(np.round(s.astype(np.float32) / a_scale) + zero, 0, 255)
        got = ((q - zero) @ inits[q_name].astype(np.float64)) * a_scale * scale.astype(np.float64)
        want = s @ w
        err += float(np.square(got - want).sum())
        ref += float(np.square(want).sum())
    return float(np.sqrt(err / ref))


def test_each_matmul_gets_the_weight_width_with_the_smaller_measured_error():
    model, samples = _model(), _samples(6, 1)
    nodes = ["loud", "quiet"]
    eight_model = _quantize_dynamic(model, nodes, True, set())
    eight = matmul_errors(model, eight_model, nodes, samples)
    seven = matmul_errors(model, _quantize_dynamic(model, nodes, True, set(nodes)), nodes, samples)
    exact = _exact_int8_error(model, eight_model, samples)
    assert exact < 0.02  # 8-bit weights are accurate in exact arithmetic
    if _kernel_saturates():
        assert eight["loud"] > 5 * exact  # the kernel's clipping, not the rounding
        assert seven["loud"] < eight["loud"] / 3
        assert narrower(eight, seven) == ["loud"]
    else:  # 32-bit accumulation: the kernel is exact and 8 bits win everywhere
        assert abs(eight["loud"] - exact) < 1e-3 * max(exact, 1e-6) + 1e-5
        assert narrower(eight, seven) == []
    assert eight["quiet"] < seven["quiet"]  # no saturation there: the finer weights win


def test_a_plan_with_narrow_weights_quantizes_those_with_7_bits_and_reproduces(tmp_path):
    model, samples = _model(), _samples(6, 1)
    plan = PrecisionPlan(mode="int8-dynamic", nodes=["loud", "quiet"], options={"per_channel": True})
    fit = fit_weight_widths(model, plan, samples)
    assert set(fit["errors"]) == {"loud", "quiet"}
    assert fit["narrow"] == [n for n, e in sorted(fit["errors"].items()) if e["int7"] < e["int8"]]
    plan.options["narrow_weights"] = ["loud"]
    quantized = apply_plan(model, plan, samples)
    weights = {
        name: v.const_value.numpy() for name, v in quantized.graph.initializers.items() if v.const_value.dtype == ir.DataType.INT8
    }
    loud = next(v for n, v in weights.items() if n.startswith("w_loud") and v.shape == (64, 16))
    quiet = next(v for n, v in weights.items() if n.startswith("w_quiet") and v.shape == (64, 16))
    assert np.abs(loud.astype(int)).max() <= 64  # 7-bit range (reduce_range)
    assert np.abs(quiet.astype(int)).max() == 127  # full 8-bit range
    # the same plan gives the same model, and its outputs stay close to FP32 (7-bit or not)
    plan.save(tmp_path / "plan.json")
    again = apply_plan(model, PrecisionPlan.load(tmp_path / "plan.json"), samples)
    assert ir.serde.serialize_model(again).SerializeToString() == ir.serde.serialize_model(quantized).SerializeToString()
    run, ref = _session(quantized), _session(model)
    for feed in _samples(3, 9):
        got, want = run.run(["y_loud"], feed)[0], ref.run(["y_loud"], feed)[0]
        cos = float((got * want).sum() / (np.linalg.norm(got) * np.linalg.norm(want)))
        assert cos > 0.999


def test_convert_reports_the_7_bit_matmuls_and_saves_them_in_the_plan(cli, tmp_path):
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(24):
        np.savez(calib / f"{i:02d}.npz", x=(3.0 * rng.standard_normal((2, 4, 64)) + 2.0).astype(np.float32))
    out = tmp_path / "o"
    code, text, err = cli("convert", "models:saturating", "--precision", "int8-dynamic", "--calib", calib, "-o", out)
    assert code == 0, err
    plan = PrecisionPlan.load(out / "plan.json")
    report = json.loads((out / "manifest.json").read_text())["precision"]
    measured = plan.measured["weight_widths"]
    assert len(measured) == 2  # both Linear layers measured both ways
    narrow = [n["module"] for n in report["narrow_weights"]]
    assert plan.options["narrow_weights"] == sorted(n for n, e in measured.items() if e["int7"] < e["int8"])
    if _kernel_saturates():
        assert "loud" in narrow and f"7-bit weights for {len(narrow)} MatMul(s)" in text and "loud (" in text
        loud = next(e for n, e in measured.items() if plan.modules[n] == "loud")
        assert loud["int8"] > 3 * loud["int7"]
    else:
        assert narrow == [] and "7-bit weights" not in text
    figures = report["accuracy"]["output"]
    assert figures["cos"] >= 0.995  # the engine is accurate once the width is right
