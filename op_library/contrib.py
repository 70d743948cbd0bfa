"""``com.microsoft`` fused ops the ONNX Runtime fusion passes and the precision passes write.

Definitions: ONNX Runtime's contrib-op reference,
https://github.com/microsoft/onnxruntime/blob/main/docs/ContribOperators.md
"""

from __future__ import annotations

__all__ = ["ENTRIES"]

from adapter.op_library import _flops as f
from adapter.op_library._schema import OpEntry

DOMAIN = "com.microsoft"
FLOAT = ("fp32", "fp16", "bf16")


def _op(op_type: str, family: str, flops, formula: str, precisions: tuple[str, ...], notes: str = "") -> OpEntry:
    spec = f"https://github.com/microsoft/onnxruntime/blob/main/docs/ContribOperators.md#{DOMAIN}.{op_type}"
    return OpEntry(op_type, DOMAIN, family, flops, formula, precisions, spec, notes)


_ROWS = [
    _op(
        "Attention",
        "attention",
        f.attention,
        "2·B·S·Hin·3H + 4·B·N·S·L·h + 8·B·N·S·L",
        FLOAT,
        "QKV projection + scores + softmax + context; the output projection stays a MatMul",
    ),
    _op(
        "MultiHeadAttention",
        "attention",
        f.multi_head_attention,
        "4·B·N·S·L·h + 8·B·N·S·L",
        FLOAT,
        "on projected Q, K, V",
    ),
    _op(
        "QAttention",
        "attention",
        f.attention,
        "as Attention (INT8 projection)",
        ("int8",),
        "INT8 dynamic quantization of Attention",
    ),
    _op("SkipLayerNormalization", "normalization", f.per_output(9), "9·out (skip add + LayerNorm)", FLOAT),
    _op("SkipSimplifiedLayerNormalization", "normalization", f.per_output(5), "5·out (skip add + RMSNorm)", FLOAT),
    _op("BiasGelu", "activation", f.per_output(9), "9·out (bias add + erf GELU)", FLOAT),
    _op("FastGelu", "activation", f.per_output(9), "9·out (bias add + tanh GELU)", FLOAT),
    _op("RotaryEmbedding", "elementwise", f.per_output(3), "3·out (x·cos + rot(x)·sin)", FLOAT),
    _op(
        "MatMulNBits",
        "matmul",
        f.matmul_nbits,
        "2·M·N·K + 2·N·K (dequantize)",
        ("fp32", "fp16", "int8", "int4"),
        "weight-only INT4/INT8 (block-quantized B, attributes K and N)",
    ),
]

ENTRIES: dict[str, OpEntry] = {e.key: e for e in _ROWS}
