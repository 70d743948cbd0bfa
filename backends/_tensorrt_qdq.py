"""TensorRT's rules for explicit quantization: which Q/DQ placements its builder takes
(:func:`check_qdq`), and bias dequantizations folded back into float initializers."""

from __future__ import annotations

__all__ = ["check_qdq", "fold_bias_dequantize", "qdq_problem", "quantized_type"]


import numpy as np
import onnx_ir as ir

from adapter.backends._recipe import constant_of
from adapter.backends.base import module_of
from adapter.core.errors import UnsupportedOp


def quantized_type(node: ir.Node) -> str:
    """The quantized data type of a Q (its output) or DQ (its input), as an ONNX type name."""
    if node.op_type == "DequantizeLinear":
        source = node.inputs[0]
        dtype = source.dtype if source is not None else None
        if dtype is None and len(node.inputs) > 2 and node.inputs[2] is not None:
            dtype = node.inputs[2].dtype  # the zero-point has the quantized type
        if dtype is None and source is not None and source.producer() is not None:
            producer = source.producer()
            if producer.op_type == "QuantizeLinear":
                return quantized_type(producer)
    else:
        zero = node.inputs[2] if len(node.inputs) > 2 else None
        dtype = zero.dtype if zero is not None else None
        if dtype is None:
            attr = node.attributes.get("output_dtype")
            dtype = ir.DataType(attr.value) if attr is not None and attr.value else ir.DataType.UINT8
    return dtype.name if dtype is not None else "unknown"


def _weight_consumers(node: ir.Node) -> list[tuple[ir.Node, int]]:
    """(consumer, input index) of the dequantized weight a Q/DQ node belongs to."""
    out = node.outputs[0]
    if node.op_type == "QuantizeLinear":  # weight kept as float: Q -> DQ -> op
        return [use for dq, _ in out.uses() if dq.op_type == "DequantizeLinear" for use in dq.outputs[0].uses()]
    return list(out.uses())


def _is_weight(node: ir.Node) -> bool:
    source = node.inputs[0]
    if constant_of(source) is not None:
        return True
    producer = source.producer() if source is not None else None
    return (
        node.op_type == "DequantizeLinear"
        and producer is not None
        and producer.op_type == "QuantizeLinear"
        and constant_of(producer.inputs[0]) is not None
    )


def _output_channel_axis(consumer: ir.Node, index: int, rank: int) -> int | None:
    """The output-channel axis of a weight feeding ``consumer`` at ``index`` (None: not a known weight slot)."""
    if index != 1:
        return None
    if consumer.op_type == "Conv":
        return 0
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "MatMul":
        return rank - 1
    if consumer.op_type == "Gemm":
        trans_b = consumer.attributes.get("transB")
        return 0 if trans_b is not None and trans_b.value else 1
    return None


def qdq_problem(node: ir.Node, model: ir.Model) -> str | None:
    """Why a QuantizeLinear/DequantizeLinear breaks TensorRT's explicit-quantization rules (None: it follows them).

    The rules: standard-domain Q/DQ at opset ≥ 13 (FP8 at ≥ 19); signed INT8 or FP8 E4M3
    (INT4 for weights only); constant positive scales; zero-points constant 0 (symmetric);
    activations per tensor; weights per tensor or per channel along the consumer's output
    channel (Conv 0, ConvTranspose 1, MatMul last, Gemm 0 with transB else 1).
    """
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return (
            f"{op} in domain '{node.domain}': TensorRT reads only the standard-domain QuantizeLinear/DequantizeLinear"
        )
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if opset < 13:
        return f"opset {opset}: TensorRT's explicit quantization needs QuantizeLinear/DequantizeLinear from opset 13"
    qtype = quantized_type(node)
    weight = _is_weight(node)
    if qtype == "FLOAT8E4M3FN" and opset < 19:
        return f"FP8 {op} at opset {opset}: FP8 Q/DQ needs opset 19 (float8e4m3fn zero-points)"
    if qtype == "INT32":
        return (
            f"{op} of an INT32 tensor (a quantized bias): TensorRT dequantizes INT8/FP8 only; keep biases in float "
            "(fold_bias_dequantize does this)"
        )
    if qtype == "UINT8":
        return f"UINT8 {op}: TensorRT's explicit quantization is signed and symmetric (INT8 with zero-point 0)"
    if qtype not in ("INT8", "FLOAT8E4M3FN") and not (qtype == "INT4" and weight):
        return f"{qtype} {op}: TensorRT quantizes to INT8 or FP8 E4M3 (INT4 for weights only)"
    block = node.attributes.get("block_size")
    if block is not None and block.value and qtype != "INT4":
        return (
            f"block-wise {qtype} {op} (block_size {block.value}): "
            "TensorRT takes block quantization for INT4 weights only"
        )
    scale = constant_of(node.inputs[1])
    if scale is None:
        return f"{op}'s scale '{node.inputs[1].name}' is computed at run time: TensorRT needs a constant scale"
    if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        return f"{op}'s scale '{node.inputs[1].name}' has non-positive or non-finite values"
    zero_value = node.inputs[2] if len(node.inputs) > 2 else None
    if zero_value is not None:
        zero = constant_of(zero_value)
        if zero is None:
            return f"{op}'s zero-point '{zero_value.name}' is not a constant: TensorRT needs zero-point 0"
        if np.any(zero.astype(np.float32) != 0):
            return f"{op}'s zero-point '{zero_value.name}' is not 0: TensorRT's quantization is symmetric"
    if scale.size == 1:
        return None
    if not weight:
        return (
            f"per-channel {op} on activation '{node.inputs[0].name}' ({scale.size} scales): "
            "TensorRT quantizes activations per tensor"
        )
    if qtype == "INT4":
        return None  # block-quantized INT4 weights carry a scale tensor, not a per-channel vector
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    axis_attr = node.attributes.get("axis")
    axis = axis_attr.value if axis_attr is not None else 1
    if rank is not None and axis < 0:
        axis += rank
    for consumer, index in _weight_consumers(node):
        expected = _output_channel_axis(consumer, index, rank or 0)
        if expected is not None and rank is not None and axis != expected:
            return (
                f"per-channel {op} on weight '{node.inputs[0].name}' uses axis {axis}, but {consumer.op_type} "
                f"'{consumer.name}' has its output channels on axis {expected}"
            )
    return None


def check_qdq(model: ir.Model) -> list[UnsupportedOp]:
    """Every Q/DQ node of ``model`` that breaks TensorRT's explicit-quantization rules, with the reason."""
    problems = []
    for node in model.graph.all_nodes():
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            problem = qdq_problem(node, model)
            if problem:
                problems.append(UnsupportedOp(node.name or "", node.op_type, node.domain, module_of(node), problem))
    return problems


def fold_bias_dequantize(model: ir.Model) -> int:
    """Replace each constant INT32 DequantizeLinear (ONNX Runtime's quantized biases) by the float
    initializer it computes, ``(x - zero_point) * scale`` in FP32; returns how many were folded."""
    graph = model.graph
    folded = 0
    for node in list(graph):
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        source, scale = node.inputs[0], constant_of(node.inputs[1])
        data = constant_of(source)
        if data is None or scale is None or data.dtype != np.int32 or node.outputs[0].is_graph_output():
            continue
        zero = constant_of(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        values = data.astype(np.float32) - (zero.astype(np.float32) if zero is not None else np.float32(0))
        if scale.size > 1:
            axis = node.attributes.get("axis")
            axis = (axis.value if axis is not None else 1) % data.ndim
            shape = [1] * data.ndim
            shape[axis] = scale.size
            scale = scale.reshape(shape)
        values = (values * scale.astype(np.float32)).astype(np.float32)
        out = node.outputs[0]
        name = f"{out.name}_float"
        replacement = ir.Value(name=name, shape=ir.Shape(values.shape), type=ir.TensorType(ir.DataType.FLOAT))
        replacement.const_value = ir.tensor(values, name=name)
        graph.register_initializer(replacement)
        ir.convenience.replace_all_uses_with(out, replacement)
        graph.remove(node, safe=True)
        folded += 1
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]
    return folded
