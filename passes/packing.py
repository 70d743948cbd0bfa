"""Sibling projections of one input packed into one MatMul (Q/K/V, gate/up).

A decoder block projects the same normalized hidden state three times (query, key, value)
and the MLP input twice (gate, up). Each ``MatMul(x, W_i)`` with a constant 2-D weight of
the same input width becomes one ``MatMul(x, concat(W_1, ..., W_n))`` followed by a
``Split`` of its last axis, so one kernel call reads ``x`` once and runs a wider matrix:
at decode time (one token) ONNX Runtime's ``MatMulNBits`` splits a wide matrix over its
threads better than a narrow one (a 4-KV-head key projection is only 256 columns wide).
The numbers do not change (each output column is the same dot product). The packed node
keeps the first sibling's name and module path, so per-module choices made later (which
blocks stay INT8) still find it.
"""

from __future__ import annotations

__all__ = ["PackSiblingMatMuls"]

from collections import defaultdict
from typing import Any

import numpy as np
import onnx_ir as ir

from adapter.passes.base import CountedPass


def _weight(node: ir.Node) -> np.ndarray | None:
    if node.op_type != "MatMul" or node.domain != "" or len(node.inputs) != 2:
        return None
    weight = node.inputs[1]
    if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2:
        return None
    return weight.const_value.numpy()


class PackSiblingMatMuls(CountedPass):
    """MatMuls that share their input and have constant weights of one width: one MatMul + Split."""

    name = "pack-sibling-matmuls"

    def apply(self, model: ir.Model) -> dict[str, Any]:
        graph = model.graph
        groups: dict[tuple[int, int, Any], list[tuple[ir.Node, np.ndarray]]] = defaultdict(list)
        for node in graph:
            weight = _weight(node)
            if weight is not None and node.inputs[0] is not None:
                groups[(id(node.inputs[0]), weight.shape[0], weight.dtype)].append((node, weight))
        packs = [siblings for siblings in groups.values() if len(siblings) > 1]
        for siblings in packs:
            self._pack(graph, siblings)
        return {"packed": len(packs), "matmuls_merged": sum(len(s) for s in packs)}

    @staticmethod
    def _pack(graph: ir.Graph, siblings: list[tuple[ir.Node, np.ndarray]]) -> None:
        first = siblings[0][0]
        base = first.name or "matmul"
        weight = ir.val(f"{base}_packed_weight", const_value=ir.tensor(np.concatenate([w for _, w in siblings], axis=1)))
        sizes = ir.val(f"{base}_packed_sizes", const_value=ir.tensor(np.array([w.shape[1] for _, w in siblings], np.int64)))
        graph.register_initializer(weight)
        graph.register_initializer(sizes)
        matmul = ir.node("MatMul", [first.inputs[0], weight], name=f"{base}_packed")
        matmul.metadata_props.update(first.metadata_props)
        split = ir.node("Split", [matmul.outputs[0], sizes], attributes={"axis": -1}, num_outputs=len(siblings),
                        name=f"{base}_packed_split")  # fmt: skip
        # the packed pair goes where the earliest sibling was, so every user stays after it
        earliest = min((node for node, _ in siblings), key=graph.index)
        graph.insert_before(earliest, [matmul, split])
        for (node, _), out in zip(siblings, split.outputs):
            old = node.outputs[0]
            name, old.name = old.name, None
            out.name, out.shape, out.type = name, old.shape, old.type
            ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
            graph.remove(node, safe=True)
