"""Backends this machine cannot ask live, as their own documentation lists their ONNX ops.

Facts transcribed from the cited files (read at the named commit or release branch). TensorRT's
list holds every op its matrix marks supported, and ``refused`` every op it marks unsupported;
MIGraphX's is restricted to the ops this library has entries for plus their near neighbours.
An op absent from a list is unsupported by that document. ``constant_inputs`` carries the
per-op notes that make support conditional on an input being a build-time constant.
TVM's list is read live from the installed frontend's converter map where TVM imports
(:func:`tvm_live`); :data:`TVM_DOCUMENTED` is the fallback. ONNX Runtime and OpenVINO are
never listed here: their answers come from the backends' own ``supports()``
(see :mod:`adapter.converter.coverage`).
"""

from __future__ import annotations

__all__ = ["TVM", "TVM_DOCUMENTED", "TENSORRT", "MIGRAPHX", "DOCUMENTED", "tvm_live", "tvm_differences"]  # noqa: F822

import functools
from collections.abc import Iterator, Mapping

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

TVM_DOCUMENTED = DocumentedBackend(
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
"""TVM's list as read from the source at the cited commit: the fallback where TVM does not import."""

_TVM_DIRECT = frozenset({"If"})
"""Ops the Relax importer converts itself rather than through the map (its ``directly_handled_ops``)."""


@functools.cache
def tvm_live() -> DocumentedBackend | None:
    """TVM's list read from the installed frontend's ``_get_convert_map()`` (None when TVM does not import)."""
    try:
        import tvm
        from tvm.relax.frontend.onnx import onnx_frontend
    except Exception:  # not installed, or a build without Relax / LLVM
        return None
    ops = frozenset(onnx_frontend._get_convert_map()) | _TVM_DIRECT
    return DocumentedBackend(
        name="tvm",
        version=f"Apache TVM {tvm.__version__} Relax ONNX frontend (installed, read live)",
        source="tvm.relax.frontend.onnx.onnx_frontend._get_convert_map() of the installed TVM",
        extra_sources=(TVM_DOCUMENTED.source,),
        ignores_domain=True,
        ops=ops,
        notes=dict(TVM_DOCUMENTED.notes),
        basis="live converter map",
    )


def tvm_differences() -> dict[str, list[str]] | None:
    """Live converter map against the documented list: ops only in one of them (None when TVM does not import)."""
    live = tvm_live()
    if live is None:
        return None
    return {
        "live_only": sorted(live.ops - TVM_DOCUMENTED.ops),
        "documented_only": sorted(TVM_DOCUMENTED.ops - live.ops),
    }


def _tvm() -> DocumentedBackend:
    return tvm_live() or TVM_DOCUMENTED


# Every op the matrix marks Y (support matrix "Supported" column), standard domain.
_TENSORRT_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
    BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
    CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
    Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish
    Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
    LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike
    Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
    ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign
    RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid
    Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
    TensorScatter ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)

# Every op the same matrix marks N.
_TENSORRT_REFUSED = frozenset(
    """
    AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor CenterCropPad Col2Im Compress
    ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool
    MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement
    OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty
    SequenceErase SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence
    StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique
    """.split()
)

_REDUCE_OPS = (
    "ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare"
).split()

TENSORRT = DocumentedBackend(
    name="tensorrt",
    version=(
        "onnx-tensorrt operator matrix for TensorRT 10.15 (opset 9-24; TensorRT 10.15 GA, 2026-02-02 per "
        "docs/Changelog.md). The pinned tensorrt==10.16.1.11 ships the 10.16 parser: its matrix "
        "(branch release/10.16-GA) was not in the stored sources, so 10.16 additions are not reflected"
    ),
    # The stored copy read (search index file id 4266455660) carries no commit id; its header reads
    # "TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24".
    source="https://github.com/onnx/onnx-tensorrt/blob/release/10.15-GA/docs/operators.md",
    extra_sources=(
        # what changed per release (LayerNormalization since 8.6 EA, tensor Slice axes 10.3, dynamic
        # Squeeze/Unsqueeze axes 10.7, dynamic CumSum axis 10.8, Attention 10.14, RMSNormalization,
        # RotaryEmbedding and TensorScatter 10.15)
        "https://github.com/onnx/onnx-tensorrt/blob/release/10.15-GA/docs/Changelog.md",
    ),
    # Only the standard domain is listed: com.microsoft ops need a TensorRT plugin of the
    # same name, which the parser does not ship (docs/operators.md lists none).
    ops=_TENSORRT_OPS,
    refused=_TENSORRT_REFUSED,
    notes={
        "DynamicQuantizeLinear": "listed N; the matrix suggests composing it from ONNX ops in a model-local function",
        "MatMulInteger": "listed N",
        "ConvInteger": "listed N",
        "QLinearMatMul": "listed N",
        "DequantizeLinear": "`x_zero_point` must be zero; quantized types (INT8, FP8, FP4, INT4) only",
        "QuantizeLinear": "`y_zero_point` must be 0",
        "LayerNormalization": "only the first output `Y` is supported",
        "Attention": (
            "`Q`, `K`, `V` and `attn_mask` 4-D; no `past_key`/`past_value`/`nonpad_kv_seqlen` inputs, no "
            "`present_*` or `qk_matmul_output` outputs, no `softcap`"
        ),
        "AveragePool": "2-D or 3-D pooling only; `dilations` empty or all ones",
        "MaxPool": "2-D or 3-D pooling only; no `Indices` output; `dilations` empty or all ones",
        "Constant": "`sparse_value`, `value_string` and `value_strings` unsupported",
        "CumSum": "`axis` must be a build-time constant",
        "Squeeze": "`axes` must be resolvable to a constant",
        "Unsqueeze": "`axes` must be resolvable to a constant",
        # the 8.5 matrix required Slice `axes` and TopK `K` to be initializers; this one does not
        "Slice": "no restriction in the 10.15 matrix (tensor `axes` accepted since 10.3)",
        "TopK": "`sorted` must be 1; `K` must be below 3840 (no longer required to be an initializer)",
        "OneHot": "`depth` must be a build-time constant",
        "Dropout": "`training_mode` must be an initializer evaluating to False",
        "ScatterND": "`reduction` must be `none`",
        "RotaryEmbedding": "`position_ids` must be INT64",
        "STFT": "`frame_step` and `window` must be initializers; real-valued input only",
        "Resize": "no `cubic` mode, no antialiasing, aspect-ratio policy `stretch` only",
        "Cast": "types FP32, FP16, BF16, INT32, INT64, UINT8, BOOL (UINT8 only as network input/output)",
        **{op: "`axes` must be an initializer" for op in _REDUCE_OPS},
    },
    constant_inputs={
        "CumSum": (1,),
        "Squeeze": (1,),
        "Unsqueeze": (1,),
        "OneHot": (1,),
        "Dropout": (2,),
        "STFT": (1, 2),
        **{op: (1,) for op in _REDUCE_OPS},
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
    # the other reductions (✅ in the matrix, same `axes` note)
    + "ReduceL1 ReduceLogSum ReduceLogSumExp ReduceMin ReduceProd ReduceSumSquare".split()
    # contrib ops with their own parser in src/onnx/ (extra_sources)
    + """
    Attention MultiHeadAttention SkipLayerNormalization SkipSimplifiedLayerNormalization
    SimplifiedLayerNormalization RotaryEmbedding MatMulNBits
    """.split()
)

MIGRAPHX = DocumentedBackend(
    name="migraphx",
    version="AMD MIGraphX ONNX operator matrix (opset ≤ 19) + contrib parsers",
    source=(
        "https://github.com/ROCm/AMDMIGraphX/blob/fbf2296bcfbdc74bc564cd67e0a24e7b8e30902b/docs/dev/onnx_operators.rst"
    ),
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
    refused=frozenset(
        # marked ❌ in the matrix (GridSample and Scan are marked as work in progress)
        """
        Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow CenterCropPad Col2Im
        Compress ConcatFromSequence DFT DeformConv Det HammingWindow HannWindow MaxRoiPool MaxUnpool
        MelWeightMatrix Mish NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement STFT
        SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength SequenceMap
        SoftmaxCrossEntropyLoss SplitToSequence StringNormalizer TfIdfVectorizer GridSample Scan
        """.split()
    ),
    constant_inputs={
        "Slice": (1, 2, 3, 4),
        "Squeeze": (1,),
        "Unsqueeze": (1,),
        "Range": (0, 1, 2),
        "CumSum": (1,),
        "TopK": (1,),
        "Trilu": (1,),
        **{op: (1,) for op in _REDUCE_OPS},
    },
    notes={
        "LayerNormalization": "`stash_type` not supported",
        "CumSum": "dynamic `axis` is not supported",
        "ConstantOfShape": "dynamic shape is not supported",
        "Split": "dynamic shape is not supported",
        "Tile": "dynamic shape is not supported",
        "TopK": "dynamic `k` is not supported; `sorted` is not supported",
        "Trilu": "dynamic `k` is not supported",
        "Where": "mixed static and dynamic shape inputs are not supported",
        "MaxPool": "`storage_order` not supported; no `indices` output",
        "Identity": "`sequence` data types are not supported",
        **{op: "dynamic `axes` is not supported" for op in _REDUCE_OPS},
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


class _Documented(Mapping[str, DocumentedBackend]):
    """Backends by name; TVM's entry is resolved on first use (importing TVM takes seconds)."""

    _names = ("tvm", "tensorrt", "migraphx")

    def __getitem__(self, name: str) -> DocumentedBackend:
        if name == "tvm":
            return _tvm()
        if name == "tensorrt":
            return TENSORRT
        if name == "migraphx":
            return MIGRAPHX
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names


DOCUMENTED: Mapping[str, DocumentedBackend] = _Documented()
"""Documented backends by name (TVM: the live converter map where TVM imports, else its documented list)."""


def __getattr__(name: str) -> DocumentedBackend:
    if name == "TVM":  # resolved lazily, like DOCUMENTED["tvm"]
        return _tvm()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
