"""Structural checks of an ONNX graph before any tool is given it.

ONNX Runtime, OpenVINO and onnx-ir react to a malformed graph with their own internal
errors (or crash); these checks name the file, the node and the problem first. They
run on the protobuf without its external data.
"""

from __future__ import annotations

from pathlib import Path

from adapter.core.errors import SourceError

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
    for value in graph.output:
        if value.name not in known and value.name not in producer:
            raise SourceError(
                f"'{path}': graph output '{value.name}' is not produced by any node, input or initializer.",
                "The file is incomplete or damaged; re-export the model.",
            )
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


def _check_tensor_types(graph, path: Path) -> None:
    """Every initializer has a concrete element type (UNDEFINED has no size to read)."""
    from onnx import TensorProto

    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.UNDEFINED or tensor.data_type not in TensorProto.DataType.values():
            raise SourceError(
                f"'{path}': initializer '{tensor.name}' has no valid element type (data_type {tensor.data_type}).",
                "The file is damaged; re-export the model.",
            )
    for node in graph.node:
        for sub in _subgraphs(node):
            _check_tensor_types(sub, path)


def _utf8(text: str | bytes) -> bool:
    """Protobuf hands back invalid UTF-8 in a string field as bytes (or as str with surrogates)."""
    if isinstance(text, bytes):
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bad_text(message, where: str = "") -> str | None:
    """The first text field (a name, a doc string, a string attribute) that is not valid UTF-8."""
    from google.protobuf.descriptor import FieldDescriptor

    for field, value in message.ListFields():
        here = f"{where}.{field.name}" if where else field.name
        if field.type == FieldDescriptor.TYPE_STRING:
            for text in value if field.is_repeated else [value]:
                if not _utf8(text):
                    return f"{here} = {text!r}"
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.name != "TensorProto":
            for item in value if field.is_repeated else [value]:
                found = _bad_text(item, here)
                if found:
                    return found
        elif field.type == FieldDescriptor.TYPE_MESSAGE:  # tensors: their names only (data can be large)
            for item in value if field.is_repeated else [value]:
                if not _utf8(item.name):
                    return f"{here}.name = {item.name!r}"
    return None


def check_graph(proto, path: Path) -> None:
    """Refuse unknown standard opsets, overflowing shapes, dangling inputs and cycles.

    Raises:
        SourceError: naming ``path`` and the problem.
    """
    bad = _bad_text(proto)
    if bad:
        raise SourceError(f"'{path}' holds text that is not valid UTF-8: {bad}.", "The file is damaged; re-export it.")
    _check_opsets(proto, path)
    _check_shapes(proto.graph, path)
    _check_tensor_types(proto.graph, path)
    _check_topology(proto.graph, path)
