"""Unpack ONNX Runtime's fused ``Attention`` so its QKV projection can be quantized.

``com.microsoft`` ``Attention`` holds the packed Q/K/V projection (``input @ W + b``,
``W`` of shape ``[D, 3D]``) inside the op. ONNX Runtime's dynamic quantizer turns it into
``QAttention`` only when the node has no ``attention_bias`` (input 5): ``QAttention`` has
no such input, and the tool drops it silently (the padding mask with it). Encoders
exported from PyTorch carry their padding mask exactly there, so their QKV projection --
a third of an encoder layer's matrix FLOPs -- stayed FP32 under INT8 dynamic.

:func:`unpack` rewrites such a node as ``MatMul(input, W)`` -> ``Split`` into Q, K, V ->
``com.microsoft`` ``MultiHeadAttention(q, k, v, bias=b, attention_bias=...)``, the same
computation in ops the quantizer handles (the ``MatMul``) and the CPU provider runs
(``MultiHeadAttention`` takes the bias and the additive mask). The FP32 result is the
same to float rounding (asserted in ``tests/test_unpack_attention.py``).
"""

from __future__ import annotations

__all__ = ["unpackable", "unpack"]

import numpy as np
import onnx
from onnx import helper, numpy_helper

_MHA_ATTRIBUTES = {"num_heads", "scale", "mask_filter_value"}
"""Attention attributes MultiHeadAttention takes over as they are."""


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def unpackable(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto], used: set[str]) -> bool:
    """Whether ``node`` is an Attention :func:`unpack` can rewrite exactly.

    Needs: a constant 2-D ``[D, 3D]`` weight (and a constant ``[3D]`` bias if any), no
    ``mask_index``, ``past`` or inputs past ``attention_bias``, no ``present`` output in
    use, and no attribute MultiHeadAttention lacks (``unidirectional=1``, rotary, unequal
    ``qkv_hidden_sizes``).
    """
    if node.domain != "com.microsoft" or node.op_type != "Attention":
        return False
    inputs = list(node.input) + [""] * (6 - len(node.input))
    if any(inputs[3:5]) or any(inputs[6:]) or any(o in used for o in node.output[1:]):
        return False
    weight = initializers.get(inputs[1])
    if weight is None or len(weight.dims) != 2 or weight.dims[1] != 3 * weight.dims[0]:
        return False
    if inputs[2] and (inputs[2] not in initializers or list(initializers[inputs[2]].dims) != [weight.dims[1]]):
        return False
    attributes = _attributes(node)
    sizes = attributes.pop("qkv_hidden_sizes", None)
    if sizes is not None and list(sizes) != [weight.dims[0]] * 3:
        return False
    if attributes.pop("unidirectional", 0) != 0:
        return False
    return set(attributes) <= _MHA_ATTRIBUTES


def unpack(model: onnx.ModelProto, names: list[str]) -> dict[str, str]:
    """Rewrite the named unpackable Attention nodes in place; returns old name -> MatMul name.

    Nodes that are not unpackable are left alone (and not in the result). The new nodes
    keep the Attention's metadata (its module path), so plans and reports group them
    with the module they came from.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    wanted = set(names)
    renamed: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.name not in wanted or not unpackable(node, initializers, used):
            nodes.append(node)
            continue
        inputs = list(node.input) + [""] * (6 - len(node.input))
        hidden = initializers[inputs[1]].dims[0]
        stem = node.name or f"attention_{len(renamed)}"
        sizes = f"{stem}/qkv_sizes"
        graph.initializer.append(numpy_helper.from_array(np.array([hidden] * 3, dtype=np.int64), sizes))
        packed, q, k, v = (f"{stem}/{part}" for part in ("qkv", "q", "k", "v"))
        matmul = helper.make_node("MatMul", [inputs[0], inputs[1]], [packed], name=f"{stem}/qkv_MatMul")
        split = helper.make_node("Split", [packed, sizes], [q, k, v], name=f"{stem}/qkv_Split", axis=-1)
        attributes = {k_: v_ for k_, v_ in _attributes(node).items() if k_ in _MHA_ATTRIBUTES}
        mha = helper.make_node(
            "MultiHeadAttention", [q, k, v, inputs[2], "", inputs[5]], [node.output[0]],
            name=f"{stem}/MultiHeadAttention", domain="com.microsoft", **attributes,
        )  # fmt: skip
        for new in (matmul, split, mha):
            new.metadata_props.extend(node.metadata_props)
        nodes.extend((matmul, split, mha))
        renamed[node.name] = matmul.name
    if renamed:
        del graph.node[:]
        graph.node.extend(nodes)
    return renamed
