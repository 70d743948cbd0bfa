"""Weight-only quantization of a decoder's MatMuls to ``MatMulNBits`` (INT4 or INT8), or to
a blocked INT4 ``DequantizeLinear`` before the MatMul (``form="qdq"``: opset 21, symmetric,
the form TensorRT's parser takes for weight-only INT4).

ONNX Runtime's own quantizer (``MatMulNBitsQuantizer``) does the work: each MatMul whose
second input is a constant weight becomes ``com.microsoft::MatMulNBits`` with block-wise
scales (``block_size`` 32/64/128, symmetric or with zero points) and an accuracy level
(4: INT8 activations, its fastest CPU kernels). Layers named in ``keep`` (the LM head,
by default) stay FP32. The tool takes and gives a ModelProto: it runs on one MatMul at a
time (a one-node model holding that weight only), and its MatMulNBits replaces the MatMul
in the ``ir.Model`` given, so memory grows by one weight, never by a copy of the model.
"""

from __future__ import annotations

__all__ = ["WeightOnlyQuantize", "matmul_weights"]

import logging

import numpy as np
import onnx
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
        form: ``"nbits"`` (``com.microsoft::MatMulNBits``) or ``"qdq"`` (a standard
            ``DequantizeLinear`` of INT4 weights in blocks along K, then the MatMul; 4 bits
            only, as ONNX Runtime's tool writes it; the model's opset becomes at least 21).
    """

    name = "weight-only-quantize"

    def __init__(
        self, bits: int = 4, block_size: int = 32, symmetric: bool = True, accuracy_level: int = 4,
        keep: tuple[str, ...] = ("lm_head",), only: tuple[str, ...] = (), form: str = "nbits",
    ) -> None:  # fmt: skip
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"weight-only quantization takes 4 or 8 bits, not {bits}")
        if form not in ("nbits", "qdq") or form == "qdq" and bits != 4:
            raise ValueError(f"weight-only forms are nbits (4 or 8 bits) and qdq (4 bits), not {form} at {bits}")
        self.form = form
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

    def _quantized(self, name: str, weight: np.ndarray) -> tuple[dict[str, int], list[ir.Value]]:
        """ONNX Runtime's quantizer on one MatMul: a one-node model holding only this weight
        (the whole graph as one ModelProto would hold a second copy of every weight), its
        MatMulNBits' (or DequantizeLinear's) attributes and constant inputs back."""
        from onnxruntime.quantization import QuantFormat
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        k, n = weight.shape
        dtype = onnx.helper.np_dtype_to_tensor_dtype(weight.dtype)
        one = onnx.helper.make_model(
            onnx.helper.make_graph(
                [onnx.helper.make_node("MatMul", ["A", name], ["Y"], name="matmul")], "one",
                [onnx.helper.make_tensor_value_info("A", dtype, ["m", k])],
                [onnx.helper.make_tensor_value_info("Y", dtype, ["m", n])],
                [onnx.numpy_helper.from_array(weight, name)],
            ),
            opset_imports=[onnx.helper.make_opsetid("", 21)],
        )  # fmt: skip
        quantizer = MatMulNBitsQuantizer(
            one, bits=self.bits, block_size=self.block_size, is_symmetric=self.symmetric,
            accuracy_level=self.accuracy_level,
            quant_format=QuantFormat.QDQ if self.form == "qdq" else QuantFormat.QOperator,
        )  # fmt: skip
        quantizer.process()
        want = "DequantizeLinear" if self.form == "qdq" else "MatMulNBits"
        node = next((n for n in quantizer.model.model.graph.node if n.op_type == want), None)
        if node is None:
            left = [n.op_type for n in quantizer.model.model.graph.node]
            raise RuntimeError(f"ONNX Runtime's quantizer left '{name}' as {left}")
        tensors = {t.name: t for t in quantizer.model.model.graph.initializer}
        attributes = {a.name: a.i for a in node.attribute}  # MatMulNBits: K, N, bits, block_size, accuracy_level
        # (the INT4 weights of a DequantizeLinear stay packed two to a byte, as the file holds them)
        read = ir.serde.deserialize_tensor if self.form == "qdq" else lambda t: ir.tensor(onnx.numpy_helper.to_array(t))
        constants = [ir.val(tensors[i].name, const_value=read(tensors[i]))
                     for i in node.input[(1 if self.form == "nbits" else 0):] if i]  # fmt: skip
        return attributes, constants

    def apply(self, model: ir.Model) -> dict[str, int]:
        candidates = matmul_weights(model)
        for index, node in enumerate(candidates):  # named for the records and the keep/only patterns
            node.name = node.name or f"matmul_weight_{index}"
        chosen = [n for n in candidates if not self._kept(n)]
        if not chosen:
            return {"quantized": 0, "kept_fp32": len(candidates)}
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
        if self.form == "qdq":  # a blocked DequantizeLinear is opset 21's
            opset = model.opset_imports.get("", 0)
            if opset < 18:  # 18 -> 21 changes no op this pass meets; older graphs need the version converter
                raise ValueError(f"the qdq form raises the opset to 21; this graph is opset {opset} (export at 18+)")
            model.opset_imports[""] = max(21, opset)
        else:
            model.opset_imports.setdefault("com.microsoft", 1)
        done: dict[str, tuple[dict[str, int], list[ir.Value]]] = {}  # a weight shared by MatMuls once
        for node in chosen:
            weight = node.inputs[1]
            if weight.name not in done:
                # one weight in memory at a time (an external weight is read from its file here)
                done[weight.name] = self._quantized(weight.name, weight.const_value.numpy())
                for value in done[weight.name][1]:
                    model.graph.register_initializer(value)
            attributes, constants = done[weight.name]
            if self.form == "qdq":
                if not isinstance(constants, ir.Value):  # one DequantizeLinear per weight, before its first user
                    dequantized = ir.node("DequantizeLinear", constants, attributes, name=f"{node.name}/dequantize",
                                          metadata_props=dict(node.metadata_props))  # fmt: skip
                    model.graph.insert_before(node, dequantized)
                    done[weight.name] = (attributes, dequantized.outputs[0])
                node.replace_input_with(1, done[weight.name][1])
                if not weight.uses() and weight.name in model.graph.initializers:
                    del model.graph.initializers[weight.name]
                continue
            packed = ir.node(
                "MatMulNBits", [node.inputs[0], *constants], attributes, domain="com.microsoft",
                name=node.name, metadata_props=dict(node.metadata_props),
            )  # fmt: skip
            ir.convenience.replace_nodes_and_values(model.graph, node, [node], [packed], node.outputs, packed.outputs)
            if not weight.uses() and weight.name in model.graph.initializers:
                del model.graph.initializers[weight.name]
        left = len(matmul_weights(model))
        return {"quantized": len(candidates) - left, "kept_fp32": left}
