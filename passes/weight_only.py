"""Weight-only quantization of a decoder's MatMuls to ``MatMulNBits`` (INT4 or INT8).

ONNX Runtime's own quantizer (``MatMulNBitsQuantizer``) does the work: each MatMul whose
second input is a constant weight becomes ``com.microsoft::MatMulNBits`` with block-wise
scales (``block_size`` 32/64/128, symmetric or with zero points) and an accuracy level
(4: INT8 activations, its fastest CPU kernels). Layers named in ``keep`` (the LM head,
by default) stay FP32. The tool takes and gives a ModelProto; the result replaces the
graph of the ``ir.Model`` given, so this is an in-place pass.
"""

from __future__ import annotations

__all__ = ["WeightOnlyQuantize", "matmul_weights"]

import logging

import onnx_ir as ir

from adapter.passes.base import CountedPass


def matmul_weights(model: ir.Model) -> list[ir.Node]:
    """MatMul nodes whose right-hand input is a constant 2-D weight."""
    found = []
    for node in model.graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if weight is not None and weight.const_value is not None and len(weight.const_value.shape) == 2:
            found.append(node)
    return found


class WeightOnlyQuantize(CountedPass):
    """Quantize constant-weight MatMuls to ``MatMulNBits`` with ONNX Runtime's tool.

    Args:
        bits: 4 or 8.
        block_size: Weights per scale along the input dimension.
        symmetric: No zero points when True.
        accuracy_level: ONNX Runtime's compute type for the activations (4 = INT8).
        keep: Substrings of node or module names to leave in FP32 (``lm_head``). Weights
            shorter than ``block_size`` along K are always left.
        only: When given, quantize only the MatMuls whose names contain one of these
            (a second run at other bits then takes the rest: mixed INT8/INT4 recipes).
    """

    name = "weight-only-quantize"

    def __init__(
        self, bits: int = 4, block_size: int = 32, symmetric: bool = True, accuracy_level: int = 4,
        keep: tuple[str, ...] = ("lm_head",), only: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"weight-only quantization takes 4 or 8 bits, not {bits}")
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block size must be a power of two >= 16, not {block_size}")
        self.bits, self.block_size, self.symmetric = bits, block_size, symmetric
        self.accuracy_level, self.keep, self.only = accuracy_level, keep, only

    @staticmethod
    def _matches(node: ir.Node, patterns: tuple[str, ...]) -> bool:
        names = (node.name or "", node.metadata_props.get("adapter.module", ""))
        return any(k in name for k in patterns for name in names)

    def _kept(self, node: ir.Node) -> bool:
        # a weight shorter than one block along K is no layer's projection: the rotary
        # embedding's positions x inverse frequencies (K = 1) after fuse-ort-rotary
        if node.inputs[1].const_value.shape[0] < self.block_size:
            return True
        return self._matches(node, self.keep) or bool(self.only) and not self._matches(node, self.only)

    def apply(self, model: ir.Model) -> dict[str, int]:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        candidates = matmul_weights(model)
        for index, node in enumerate(candidates):  # the tool selects nodes by name
            node.name = node.name or f"matmul_weight_{index}"
        kept = [n.name for n in candidates if self._kept(n)]
        if len(kept) == len(candidates):
            return {"quantized": 0, "kept_fp32": len(kept)}
        # the tool reads weights from the ModelProto; weights still in external files (relative
        # to a folder the tool does not know) come into memory first
        ir.external_data.load_to_model(model)
        # nodes_to_exclude, not nodes_to_include: ONNX Runtime 1.32's default algorithm ignores the latter
        quantizer = MatMulNBitsQuantizer(
            ir.serde.serialize_model(model), bits=self.bits, block_size=self.block_size,
            is_symmetric=self.symmetric, accuracy_level=self.accuracy_level, nodes_to_exclude=kept,
        )  # fmt: skip
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
        quantizer.process()
        result = ir.serde.deserialize_model(quantizer.model.model)
        model.graph = result.graph  # the opset imports live on the graph
        left = len(matmul_weights(model))
        return {"quantized": len(candidates) - left, "kept_fp32": left}
