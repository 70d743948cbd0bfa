"""Roofline fractions in the convert report: the op library's FLOPs over the measured peak
of the precision an engine computes in, or its weights and I/O over the bandwidth."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx_ir as ir
import pytest

from adapter import ConvertOptions, convert
from adapter.converter.precision import PrecisionOptions
from adapter.converter.roofline import peak_key, roofline
from adapter.core.specs import Dim, TensorSpec


def _matmul(k: int, n: int) -> ir.Model:
    batch = ir.SymbolicDim("batch")
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([batch, k]))
    w = ir.Value(name="w", const_value=ir.tensor(np.ones((k, n), np.float32)), type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([k, n]))
    node = ir.node("MatMul", [x, w], name="mm")
    node.outputs[0].name, node.outputs[0].dtype, node.outputs[0].shape = "y", ir.DataType.FLOAT, ir.Shape([batch, n])
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 20})
    return ir.Model(graph, ir_version=10)


def test_roofline_of_a_matmul_is_its_flops_or_its_bytes_whichever_binds():
    profile = SimpleNamespace(peak_flops={"fp32": 1e12, "bf16": 4e12}, memory_bandwidth=1e11)
    specs = [TensorSpec("x", "float32", (Dim("batch", 1, 4096), 256))]
    big = roofline(_matmul(256, 512), specs, {"x": np.zeros((4096, 256), np.float32)}, profile)
    flops = 2 * 4096 * 256 * 512
    assert big.flops == flops
    assert big.ms("fp32") == pytest.approx(1e3 * flops / 1e12)  # compute-bound
    assert big.ms("bf16") == pytest.approx(1e3 * flops / 4e12)
    small = roofline(_matmul(256, 512), specs, {"x": np.zeros((1, 256), np.float32)}, profile)
    moved = 256 * 512 * 4 + 256 * 4  # the weights and the input: memory-bound at batch 1
    assert small.ms("fp32") == pytest.approx(1e3 * moved / 1e11)
    assert small.ms("bf16") == pytest.approx(1e3 * (256 * 512 * 2 + 256 * 4) / 1e11)  # BF16 weights: half
    figures = big.figures("int8-dynamic", profile, 2 * big.ms("fp32"))
    assert figures["peak"] == "fp32" and figures["fraction"] == pytest.approx(0.5)  # no int8 figure: FP32's
    assert peak_key("bf16", profile) == "bf16" and peak_key("int4-weight", profile) == "fp32"


def test_convert_reports_each_candidates_fraction_of_the_roofline(tmp_path):
    result = convert("models:mlp", tmp_path / "e", ConvertOptions(precision=PrecisionOptions(mode="fp32")))
    latency = result.manifest["latency"]
    roof = latency["roofline"]
    assert roof["peak"] == "fp32" and roof["roofline_ms"] > 0
    assert roof["fraction"] == pytest.approx(roof["roofline_ms"] / latency["engine_ms"])
    timed = [c for c in result.manifest["backend"]["candidates"] if c.get("latency_ms")]
    assert timed and all(0 < c["roofline"]["fraction"] for c in timed)
