"""Per-op data (installed as ``adapter.op_library``): FLOPs and bytes formulas, allowed
precisions and per-backend support, with a coverage matrix over the test zoo.

One entry per ONNX op the exporter and the passes emit (:mod:`.standard`, :mod:`.contrib`).
Support for ONNX Runtime and OpenVINO is asked live from the backends' ``supports()``;
TVM, TensorRT and MIGraphX come from their documented op lists (:mod:`.documented`).
``adapter ops`` prints the matrix (:mod:`.coverage`).

Example:
    >>> from adapter.op_library import model_cost
    >>> model_cost(model, {"batch": 1, "seq": 128})["flops"]
"""

from __future__ import annotations

__all__ = [
    "OPS",
    "PRECISIONS",
    "NodeCost",
    "OpEntry",
    "Tensor",
    "lookup",
    "node_cost",
    "model_cost",
]

from collections import Counter
from collections.abc import Mapping
from typing import Any, NamedTuple

from adapter.op_library import contrib, standard
from adapter.op_library._schema import PRECISIONS, OpEntry, Tensor, tensor_of

OPS: dict[str, OpEntry] = {**standard.ENTRIES, **contrib.ENTRIES}
"""Every entry by key (``op_type`` for the standard domain, ``domain::op_type`` otherwise)."""



def _key(op_type: str, domain: str = "") -> str:
    domain = "" if domain in ("", "ai.onnx") else domain
    return f"{domain}::{op_type}" if domain else op_type


def lookup(op_type: str, domain: str = "") -> OpEntry | None:
    """The entry for an op, or None when the library has none."""
    return OPS.get(_key(op_type, domain))


class NodeCost(NamedTuple):
    """One node's cost: FLOPs and bytes moved (None when a shape could not be resolved)."""

    flops: int | None
    bytes: int | None


def _attributes(node: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, attr in node.attributes.items():
        value = attr.value
        out[name] = tuple(value) if isinstance(value, list | tuple) else value
    return out


def node_cost(node: Any, sizes: Mapping[str, int] | None = None) -> NodeCost:
    """FLOPs and bytes of one onnx-ir node, symbolic dims taken from ``sizes``.

    Raises:
        KeyError: The op has no entry in the library (its name is the message).
    """
    entry = lookup(node.op_type, node.domain)
    if entry is None:
        raise KeyError(_key(node.op_type, node.domain))
    sizes = sizes or {}
    ins = [tensor_of(v, sizes) for v in node.inputs]
    outs = [tensor_of(v, sizes) for v in node.outputs]
    flops = entry.flops(ins, outs, _attributes(node))
    # an optional output nothing reads (SkipLayerNormalization's mean, ...) is not materialised
    present = [*node.inputs, *(v for v in node.outputs if v is not None and (v.shape is not None or v.uses()))]
    resolved = all(tensor_of(v, sizes) is not None for v in present if v is not None)
    return NodeCost(flops, entry.bytes(ins, outs) if resolved else None)


def model_cost(model: Any, sizes: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Total FLOPs and bytes of an onnx-ir model, with per-op totals and the ops left out.

    Returns:
        ``{"flops", "bytes", "by_op": {op: flops}, "unknown_ops": [...], "unresolved_nodes": n}``.
    """
    flops = total_bytes = unresolved = 0
    by_op: Counter = Counter()
    unknown: set[str] = set()
    for node in model.graph.all_nodes():
        try:
            cost = node_cost(node, sizes)
        except KeyError:
            unknown.add(_key(node.op_type, node.domain))
            continue
        flops += cost.flops or 0
        by_op[_key(node.op_type, node.domain)] += cost.flops or 0
        if cost.bytes is None:
            unresolved += 1
        else:
            total_bytes += cost.bytes
    return {
        "flops": flops,
        "bytes": total_bytes,
        "by_op": dict(by_op.most_common()),
        "unknown_ops": sorted(unknown),
        "unresolved_nodes": unresolved,
    }
