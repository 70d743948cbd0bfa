"""Backends this machine cannot ask live, as their own documentation lists their ONNX ops.

Facts transcribed from the cited files (read at the named commit), restricted to the ops
this library has entries for plus their near neighbours; an op absent from a list is
unsupported by that document. ONNX Runtime and OpenVINO are never listed here: their
answers come from the backends' own ``supports()`` (see :mod:`adapter.op_library.coverage`).
"""

from __future__ import annotations

__all__ = ["TVM", "TENSORRT", "MIGRAPHX", "DOCUMENTED"]

from adapter.op_library._schema import DocumentedBackend

_TVM_OPS = frozenset(
    """
    Add Sub Mul Div Mod Less LessOrEqual Greater GreaterOrEqual Equal And Or Xor Not Log Exp Cos Sin
    Tan Tanh Neg Abs Reciprocal Floor Ceil Round IsInf IsNaN Sqrt Relu Selu Mish Trilu PRelu
    LeakyRelu Elu Gelu FastGelu BiasGelu HardSigmoid HardSwish Sign Softplus Erf Sum Min Max Mean
    Cast Gemm MatMul MatMulInteger Reshape Sigmoid Softmax LogSoftmax Transpose Unsqueeze Where
    Concat Clip Shape Pow CumSum Squeeze Constant Gather GatherElements GatherND ScatterElements
    ScatterND Size BatchNormalization LayerNormalization RMSNormalization SkipLayerNormalization
    EmbedLayerNormalization InstanceNormalization ReduceMax ReduceMin ReduceSum ReduceMean
    ReduceProd ReduceL1 ReduceL2 ArgMax ArgMin TopK Expand ConstantOfShape Slice Attention Pad Split
    Tile AveragePool MaxPool GlobalAveragePool GlobalMaxPool Conv ConvTranspose Flatten Identity
    Resize Einsum Range OneHot NonZero QuantizeLinear DequantizeLinear DynamicQuantizeLinear If
    """.split()
)

TVM = DocumentedBackend(
    name="tvm",
    version="Apache TVM Relax ONNX frontend (main at commit 00357ef)",
    source=(
        "https://github.com/apache/tvm/blob/00357ef24f58706babeb7070ff0b1ad9d1715ea2/"
        "python/tvm/relax/frontend/onnx/onnx_frontend.py (_get_convert_map)"
    ),
    # The converter map is keyed by op_type alone; the importer does not look at the domain,
    # so com.microsoft ops whose names are in the map (Attention, SkipLayerNormalization,
    # BiasGelu, FastGelu, EmbedLayerNormalization) are converted.
    ignores_domain=True,
    ops=_TVM_OPS,
    notes={"If": "handled by the importer itself, not the map"},
)

_TENSORRT_OPS = frozenset(
    """
    Abs Add And ArgMax AveragePool BatchNormalization Cast Clip Concat Constant ConstantOfShape Conv
    Cos CumSum DequantizeLinear Div Equal Erf Exp Expand Flatten Gather GatherND Gemm
    GlobalAveragePool Greater GreaterOrEqual Identity Less LessOrEqual Log MatMul Max MaxPool Min
    Mul Neg Not Or Pow QuantizeLinear Range Reciprocal ReduceL2 ReduceMax ReduceMean ReduceSum Relu
    Reshape Shape Sigmoid Sin Slice Softmax Split Sqrt Squeeze Sub Tanh Tile TopK Transpose Trilu
    Unsqueeze Where
    """.split()
)

TENSORRT = DocumentedBackend(
    name="tensorrt",
    version="onnx-tensorrt operator matrix (TensorRT 8.5, opset ≤ 17)",
    source="https://github.com/onnx/onnx-tensorrt/blob/6d0ab7be324d02c7feb3a306b6fdbeae84f71ddc/docs/operators.md",
    # Only the standard domain is listed: com.microsoft ops need a TensorRT plugin of the
    # same name, which the parser does not ship (docs/operators.md lists none).
    ops=_TENSORRT_OPS,
    notes={
        "LayerNormalization": "listed N in this (TensorRT 8.5) matrix",
        "DynamicQuantizeLinear": "listed N",
        "MatMulInteger": "listed N",
        "DequantizeLinear": "`x_zero_point` must be zero",
        "QuantizeLinear": "`y_zero_point` must be 0",
        "Slice": "`axes` must be an initializer",
        "Squeeze": "`axes` must be an initializer",
        "Unsqueeze": "`axes` must be a constant tensor",
        "CumSum": "`axis` must be an initializer",
        "TopK": "`K` input must be an initializer",
        "Gelu": "not in the matrix (opset 20 op; the matrix stops at opset 17)",
    },
)

_MIGRAPHX_OPS = frozenset(
    """
    Abs Add And ArgMax AveragePool BatchNormalization BiasGelu Cast Clip Concat Constant
    ConstantOfShape Conv Cos CumSum DequantizeLinear Div DynamicQuantizeLinear Equal Erf Exp Expand
    FastGelu Flatten Gather GatherND Gelu Gemm GlobalAveragePool Greater GreaterOrEqual Identity
    LayerNormalization Less LessOrEqual Log MatMul MatMulInteger Max MaxPool Min Mul Neg Not Or Pow
    QuantizeLinear Range Reciprocal ReduceL2 ReduceMax ReduceMean ReduceSum Relu Reshape Shape
    Sigmoid Sin Slice Softmax Split Sqrt Squeeze Sub Tanh Tile TopK Transpose Trilu Unsqueeze Where
    """.split()
    # contrib ops with their own parser in src/onnx/ (extra_sources)
    + """
    Attention MultiHeadAttention SkipLayerNormalization SkipSimplifiedLayerNormalization
    SimplifiedLayerNormalization RotaryEmbedding MatMulNBits
    """.split()
)

MIGRAPHX = DocumentedBackend(
    name="migraphx",
    version="AMD MIGraphX ONNX operator matrix (opset ≤ 19) + contrib parsers",
    source="https://github.com/ROCm/AMDMIGraphX/blob/fbf2296bcfbdc74bc564cd67e0a24e7b8e30902b/docs/dev/onnx_operators.rst",
    extra_sources=(
        # contrib ops the matrix does not list, each with its own ONNX parser in src/onnx/
        "https://github.com/ROCm/AMDMIGraphX/blob/develop/src/onnx/parse_attention.cpp",
        "https://github.com/ROCm/AMDMIGraphX/blob/develop/src/onnx/parse_multi_head_attention.cpp",
        "https://github.com/ROCm/AMDMIGraphX/blob/develop/src/onnx/parse_skip_layer_normalization.cpp",
        "https://github.com/ROCm/AMDMIGraphX/blob/develop/src/onnx/parse_skip_simplified_layer_normalization.cpp",
        "https://github.com/ROCm/AMDMIGraphX/blob/develop/src/onnx/parse_simplified_layer_normalization.cpp",
        "https://github.com/ROCm/AMDMIGraphX/blob/develop/src/onnx/parse_rotary_embedding.cpp",
        "https://github.com/ROCm/AMDMIGraphX/blob/develop/src/onnx/parse_matmulnbits.cpp",
    ),
    # MIGraphX's parser registers ops by op_type too (BiasGelu/FastGelu sit in the standard matrix).
    ignores_domain=True,
    ops=_MIGRAPHX_OPS,
    notes={
        "Reshape": "`allowzero` not supported; dynamic shape is not supported",
        "Expand": "dynamic shape is not supported",
        "Range": "dynamic start/end/delta not supported",
        "Slice": "variable inputs are not supported",
        "Squeeze": "variable `axes` is not supported",
        "Unsqueeze": "variable `axes` is not supported",
        "MatMulInteger": "dynamic shape is not supported",
        "DynamicQuantizeLinear": "uint8 only, dynamic shape not supported",
        "QuantizeLinear": "`block_size`, `output_dtype`, `saturate` not supported",
        "Cast": "`saturate` not supported",
    },
)

DOCUMENTED: dict[str, DocumentedBackend] = {b.name: b for b in (TVM, TENSORRT, MIGRAPHX)}
"""Documented backends by name."""
