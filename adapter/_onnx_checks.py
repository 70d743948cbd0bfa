"""Structural checks of an ONNX graph before any tool is given it.

ONNX Runtime, OpenVINO and onnx-ir react to a malformed graph with their own internal
errors (or crash); these checks name the file, the node and the problem first. They
run on the protobuf without its external data.
"""

from __future__ import annotations

from pathlib import Path

from adapter.errors import SourceError

INT64_MAX = 2**63 - 1
_STANDARD_DOMAINS = {"": "onnx_opset_version", "ai.onnx": "onnx_opset_version", "ai.onnx.ml": "onnx_ml_opset_version"}


def _check_opsets(proto, path: Path) -> None:
    import onnx.defs

    for opset in proto.opset_import:
        known = _STANDARD_DOMAINS.get(opset.domain)
        if known is None:
            continue
        newest = getattr(onnx.defs, known)()
        if not 1 <= opset.version <= newest:
            domain = opset.domain or "ai.onnx"
            raise SourceError(
                f"'{path}' imports opset {opset.version} of domain '{domain}'; the installed onnx "
                f"{onnx.__version__} knows versions 1 to {newest}.",
                "Re-export the model with a released opset (e.g. torch.onnx.export(..., opset_version=20)).",
            )


def _product(dims) -> int:
    total = 1
    for d in dims:
        total *= d
    return total


def _check_shapes(graph, path: Path) -> None:
    for tensor in graph.initializer:
        if any(d < 0 for d in tensor.dims):
            raise SourceError(
                f"'{path}' has initializer '{tensor.name}' with a negative dimension {list(tensor.dims)}."
            )
        if _product(tensor.dims) > INT64_MAX:
            raise SourceError(
                f"'{path}' has initializer '{tensor.name}' of shape {list(tensor.dims)}: its element count "
                "overflows int64.",
                "The file is corrupt or forged.",
            )
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
            continue
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim if d.HasField("dim_value")]
        if any(d < 0 for d in dims) or _product(dims) > INT64_MAX:
            raise SourceError(
                f"'{path}' declares value '{value.name}' with dimensions {dims}: negative, or their product "
                "overflows int64.",
                "The file is corrupt or forged.",
            )


def _subgraphs(node):
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _check_topology(graph, path: Path, outer: frozenset[str] = frozenset()) -> None:
    """Every node input must be produced somewhere, and the nodes must not form a cycle."""
    known = set(outer) | {v.name for v in graph.input} | {t.name for t in graph.initializer}
    known |= {s.values.name for s in graph.sparse_initializer}
    producer: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.output:
            if name:
                producer[name] = index
    for node in graph.node:
        for name in node.input:
            if name and name not in known and name not in producer:
                raise SourceError(
                    f"'{path}': node '{node.name or node.op_type}' ({node.op_type}) reads '{name}', which no "
                    "graph input, initializer or node provides (a missing initializer?).",
                    "The file is incomplete; re-export the model.",
                )
        for sub in _subgraphs(node):
            _check_topology(sub, path, frozenset(known | set(producer)))
    # Kahn's algorithm over the node -> node edges of this graph.
    waiting = [sum(1 for n in set(node.input) if n in producer) for node in graph.node]
    users: dict[int, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in set(node.input):
            if name in producer:
                users.setdefault(producer[name], []).append(index)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    done = 0
    while ready:
        index = ready.pop()
        done += 1
        for user in users.get(index, []):
            waiting[user] -= 1
            if waiting[user] == 0:
                ready.append(user)
    if done < len(graph.node):
        stuck = [graph.node[i].name or graph.node[i].op_type for i, count in enumerate(waiting) if count > 0]
        raise SourceError(
            f"'{path}' has a cycle in its graph: nodes {', '.join(stuck[:6])}"
            + (f" and {len(stuck) - 6} more" if len(stuck) > 6 else "")
            + " cannot be ordered (each waits, directly or not, on another).",
            "An ONNX graph must be acyclic; the file is corrupt or was built wrongly.",
        )


def check_graph(proto, path: Path) -> None:
    """Refuse unknown standard opsets, overflowing shapes, dangling inputs and cycles.

    Raises:
        SourceError: naming ``path`` and the problem.
    """
    _check_opsets(proto, path)
    _check_shapes(proto.graph, path)
    _check_topology(proto.graph, path)
