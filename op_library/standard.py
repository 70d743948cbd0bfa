"""Standard-domain (``ai.onnx``) ops the exporter and passes emit over the test zoo, plus the
QDQ / integer ops the precision passes write. One row per op: cost family, FLOPs formula,
allowed precisions. Definitions: https://onnx.ai/onnx/operators/ (opset 20, the exporter's).
"""

from __future__ import annotations

__all__ = ["ENTRIES"]

from adapter.op_library import _flops as f
from adapter.op_library._schema import OpEntry

FLOAT = ("fp32", "fp16", "bf16")
"""Float-only math (transcendentals, normalisations, softmax)."""
ARITH = ("fp32", "fp16", "bf16", "int8")
"""Elementwise arithmetic: float, or INT8 inside a QDQ region."""
COMPUTE = ("fp32", "fp16", "bf16", "int8", "fp8")
"""Matrix engines: float, INT8 / FP8 through QDQ."""
ANY = ("fp32", "fp16", "bf16", "int8", "fp8", "int4")
"""Data movement carries whatever type flows through it."""


def _op(op_type: str, family: str, flops, formula: str, precisions: tuple[str, ...], notes: str = "") -> OpEntry:
    spec = f"https://onnx.ai/onnx/operators/onnx__{op_type}.html"
    return OpEntry(op_type, "", family, flops, formula, precisions, spec, notes)


# fmt: off
_ROWS = [
    # matrix engines
    _op("MatMul", "matmul", f.matmul, "2·M·N·K", (*COMPUTE, "int4"), "INT4 only as weight-only MatMulNBits"),
    _op("Gemm", "matmul", f.gemm, "2·M·N·K + M·N (bias)", COMPUTE),
    _op("Conv", "conv", f.conv, "2·out·(Cin/g)·kernel + out (bias)", COMPUTE),
    _op("MatMulInteger", "matmul", f.matmul, "2·M·N·K (integer ops)", ("int8",), "written by INT8 dynamic quantization"),
    # elementwise arithmetic: 1 FLOP per output element
    *(
        _op(name, "elementwise", f.per_output(1), "out", ARITH)
        for name in ("Add", "Sub", "Mul", "Div", "Max", "Min", "Neg", "Abs", "Relu", "Clip", "Where", "Reciprocal")
    ),
    _op("Sqrt", "elementwise", f.per_output(1), "out", FLOAT),
    _op("Pow", "elementwise", f.per_output(1), "out", FLOAT, "exporters emit Pow(x, 2); a general power costs more"),
    # transcendentals
    *(
        _op(name, "elementwise", f.per_output(f.TRANSCENDENTAL), "4·out", FLOAT)
        for name in ("Exp", "Log", "Erf", "Tanh", "Sigmoid", "Sin", "Cos")
    ),
    _op("Gelu", "activation", f.per_output(8), "8·out (erf or tanh form)", FLOAT),
    # comparisons and logic
    *(
        _op(name, "elementwise", f.per_output(1), "out", ARITH)
        for name in ("Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Not")
    ),
    # reductions and normalisations
    *(_op(name, "reduction", f.per_input(1), "in", ARITH) for name in ("ReduceMean", "ReduceSum", "ReduceMax")),
    _op("ReduceL2", "reduction", f.per_input(2), "2·in", FLOAT),
    _op("ArgMax", "reduction", f.per_input(1), "in", ARITH),
    _op("TopK", "reduction", f.per_input(1), "in (comparisons)", ARITH),
    _op("CumSum", "reduction", f.per_output(1), "out", ARITH),
    _op("Softmax", "softmax", f.softmax, "8·out (max, sub, exp, sum, div)", FLOAT),
    _op("LayerNormalization", "normalization", f.per_output(8), "8·out", FLOAT),
    _op(
        "SimplifiedLayerNormalization", "normalization", f.per_output(4), "4·out", FLOAT,
        "ONNX Runtime's RMSNorm, registered in the standard domain (not an ONNX op): "
        "https://github.com/microsoft/onnxruntime/blob/main/onnxruntime/core/graph/contrib_ops/contrib_defs.cc (SetDomain(kOnnxDomain))",
    ),
    _op("BatchNormalization", "normalization", f.per_output(2), "2·out (inference: scale, shift)", FLOAT),
    _op("MaxPool", "pool", f.pool, "out·kernel", ARITH),
    _op("AveragePool", "pool", f.pool, "out·kernel", ARITH),
    _op("GlobalAveragePool", "pool", f.per_input(1), "in", ARITH),
    # quantization
    _op("QuantizeLinear", "quantize", f.per_input(3), "3·in (scale, round, zero point)", ANY),
    _op("DequantizeLinear", "quantize", f.per_input(2), "2·in (zero point, scale)", ANY),
    _op("DynamicQuantizeLinear", "quantize", f.per_input(5), "5·in (min/max + quantize)", ("fp32", "int8")),
    # data movement, shapes and indices: bytes only
    *(
        _op(name, "movement", f.zero, "0", ANY)
        for name in (
            "Reshape", "Transpose", "Concat", "Split", "Slice", "Squeeze", "Unsqueeze", "Expand", "Gather",
            "GatherND", "Cast", "Shape", "Range", "Identity", "Constant", "ConstantOfShape", "Flatten", "Tile", "Trilu",
        )
    ),
]
# fmt: on

ENTRIES: dict[str, OpEntry] = {e.key: e for e in _ROWS}
