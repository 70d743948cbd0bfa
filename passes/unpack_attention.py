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

A pure graph rewrite over ``onnx_ir`` nodes; :class:`UnpackAttention` is the same as a pass.
"""

from __future__ import annotations

__all__ = ["UnpackAttention", "unpackable", "unpack"]

from typing import Any

import numpy as np
import onnx_ir as ir

from adapter.passes.base import CountedPass

_MHA_ATTRIBUTES = {"num_heads", "scale", "mask_filter_value"}
"""Attention attributes MultiHeadAttention takes over as they are."""


def _inputs(node: ir.Node, count: int = 6) -> list[ir.Value | None]:
    """The node's inputs padded with ``None`` (absent) to at least ``count``."""
    return list(node.inputs) + [None] * (count - len(node.inputs))


def _constant(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor of an initializer input (None for anything else)."""
    return value.const_value if value is not None and value.is_initializer() else None


def _used(value: ir.Value) -> bool:
    return bool(value.uses()) or value.is_graph_output()


def unpackable(node: ir.Node) -> bool:
    """Whether ``node`` is an Attention :func:`unpack` can rewrite exactly.

    Needs: a constant 2-D ``[D, 3D]`` weight (and a constant ``[3D]`` bias if any), no
    ``mask_index``, ``past`` or inputs past ``attention_bias``, no ``present`` output in
    use, and no attribute MultiHeadAttention lacks (``unidirectional=1``, rotary, unequal
    ``qkv_hidden_sizes``).
    """
    if node.domain != "com.microsoft" or node.op_type != "Attention":
        return False
    inputs = _inputs(node)
    if any(v is not None for v in inputs[3:5]) or any(v is not None for v in inputs[6:]):
        return False
    if any(_used(o) for o in node.outputs[1:]):
        return False
    weight = _constant(inputs[1])
    if weight is None or len(weight.shape) != 2 or weight.shape[1] != 3 * weight.shape[0]:
        return False
    if inputs[2] is not None:
        bias = _constant(inputs[2])
        if bias is None or list(bias.shape) != [weight.shape[1]]:
            return False
    attributes = {name: attr.value for name, attr in node.attributes.items()}
    sizes = attributes.pop("qkv_hidden_sizes", None)
    if sizes is not None and list(sizes) != [weight.shape[0]] * 3:
        return False
    if attributes.pop("unidirectional", 0) != 0:
        return False
    return set(attributes) <= _MHA_ATTRIBUTES


def _rewrite(graph: ir.Graph, node: ir.Node, stem: str) -> ir.Node:
    """Replace ``node`` by MatMul -> Split -> MultiHeadAttention; returns the MatMul."""
    inputs = _inputs(node)
    hidden = int(inputs[1].const_value.shape[0])
    sizes = ir.tensor(np.array([hidden] * 3, dtype=np.int64), name=f"{stem}/qkv_sizes")
    sizes_value = ir.Value(name=sizes.name, type=ir.TensorType(sizes.dtype), shape=sizes.shape, const_value=sizes)
    graph.register_initializer(sizes_value)
    metadata = dict(node.metadata_props)
    packed, q, k, v = (ir.Value(name=f"{stem}/{part}") for part in ("qkv", "q", "k", "v"))
    matmul = ir.Node(
        "", "MatMul", [inputs[0], inputs[1]], outputs=[packed], name=f"{stem}/qkv_MatMul", metadata_props=dict(metadata)
    )
    split = ir.Node(
        "", "Split", [packed, sizes_value], [ir.AttrInt64("axis", -1)], outputs=[q, k, v],
        name=f"{stem}/qkv_Split", metadata_props=dict(metadata),
    )  # fmt: skip
    # sorted by name, as onnx.helper.make_node writes them
    attributes = [
        ir.Attr(name, attr.type, attr.value) for name, attr in sorted(node.attributes.items()) if name in _MHA_ATTRIBUTES
    ]
    mha = ir.Node(
        "com.microsoft", "MultiHeadAttention", [q, k, v, inputs[2], None, inputs[5]], attributes,
        name=f"{stem}/MultiHeadAttention", metadata_props=dict(metadata),
    )  # fmt: skip
    # the MultiHeadAttention's output takes over the Attention's (its name, type and uses)
    ir.convenience.replace_nodes_and_values(graph, node, [node], [matmul, split, mha], [node.outputs[0]], [mha.outputs[0]])
    return matmul


def unpack(model: ir.Model, names: list[str]) -> dict[str, str]:
    """Rewrite the named unpackable Attention nodes in place; returns old name -> MatMul name.

    Nodes that are not unpackable are left alone (and not in the result). The new nodes
    keep the Attention's metadata (its module path), so plans and reports group them
    with the module they came from.
    """
    graph = model.graph
    wanted = set(names)
    renamed: dict[str, str] = {}
    for node in list(graph):
        if node.name not in wanted or not unpackable(node):
            continue
        matmul = _rewrite(graph, node, node.name or f"attention_{len(renamed)}")
        renamed[node.name] = matmul.name
    return renamed


class UnpackAttention(CountedPass):
    """:func:`unpack` as a pass: the named Attention nodes (all with an ``attention_bias``
    when ``names`` is None) rewritten as MatMul + Split + MultiHeadAttention."""

    name = "unpack-attention"

    def __init__(self, names: list[str] | None = None) -> None:
        super().__init__()
        self.names = names
        self.renamed: dict[str, str] = {}

    def apply(self, model: ir.Model) -> dict[str, Any]:
        names = self.names
        if names is None:
            names = [n.name for n in model.graph if len(n.inputs) > 5 and n.inputs[5] is not None]
        self.renamed = unpack(model, names)
        return {"attention_unpacked": len(self.renamed)}
