"""Tensor-parallel rank graphs from a :class:`~adapter.passes.tensor_parallel.TPPlan`.

:func:`apply_plan` turns a copy of the analysed graph into rank *r*'s: column products keep
the rank's output features (per block), row products its input rows followed by an
``AllReduce`` (a ``Gemm``'s bias is added once, after it), shape constants at the split
axis are divided by the degree, replicated values meeting split ones are sliced, word
embeddings keep the rank's rows (other ids give zeros, then ``AllReduce``) and the outputs
that are not per rank are joined by an ``AllGather``.
"""

from __future__ import annotations

__all__ = ["apply_plan", "lazy_parts", "take_parts", "tensor_parallel_graph"]

import numpy as np
import onnx_ir as ir

from adapter.core.errors import AdapterError
from adapter.passes.sharding import DOMAIN
from adapter.passes.tensor_parallel import TPPlan, attr_of, const_of, dims_of, weight_product


def _initializer(graph: ir.Graph, name: str, array: np.ndarray | ir.TensorProtocol) -> ir.Value:
    tensor = array if isinstance(array, ir.LazyTensor) else ir.tensor(np.ascontiguousarray(array), name=name)
    value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor)
    graph.register_initializer(value)
    return value


def take_parts(array: np.ndarray, axis: int, parts: list[tuple[int, int]]) -> np.ndarray:
    """The ranges ``parts`` of ``axis``, concatenated (a rank's share of every block)."""
    return np.concatenate([np.take(array, np.arange(a, b), axis=axis) for a, b in parts], axis=axis)


def lazy_parts(tensor: ir.TensorProtocol, axis: int, parts: list[tuple[int, int]]) -> ir.LazyTensor:
    """``take_parts`` of ``tensor``, computed when the tensor is saved (then dropped)."""
    dims = list(tensor.shape)
    dims[axis] = sum(b - a for a, b in parts)
    return ir.LazyTensor(lambda: ir.tensor(np.ascontiguousarray(take_parts(tensor.numpy(), axis, parts))),
                         tensor.dtype, ir.Shape(dims))  # fmt: skip


def _sliced(tensor: ir.TensorProtocol, axis: int, parts: list[tuple[int, int]]) -> ir.LazyTensor:
    """``tensor``'s ``parts`` along ``axis``, read when saved: a weight read lazily from a
    checkpoint is read (then sliced, then dropped) only when the rank's file is written; one
    that knows how to read only its slice (``sliced``, a streamed checkpoint's) does that."""
    if hasattr(tensor, "sliced"):
        return tensor.sliced(axis, parts)
    return lazy_parts(tensor, axis, parts)


def _shape_piece(value: ir.Value, index: int) -> tuple[ir.Node | None, int, ir.Value] | None:
    """Where element ``index`` of a shape tensor comes from: (its Concat or None, index in the piece, piece)."""
    if const_of(value) is not None:
        return None, index, value
    producer = value.producer()
    if producer is None or producer.op_type != "Concat":
        return None
    offset = 0
    for piece in producer.inputs:
        array = const_of(piece)
        dims = dims_of(piece) or [1]
        length = array.size if array is not None else (dims[0] if dims else 1)
        if not isinstance(length, int):
            return None
        if offset <= index < offset + length:
            return (producer, index - offset, piece) if array is not None else None
        offset += length
    return None


def apply_plan(model: ir.Model, plan: TPPlan, rank: int) -> ir.Model:
    """Turn ``model`` (a copy of the analysed graph) into tensor-parallel rank ``rank``'s graph, in place.

    Raises:
        AdapterError: A shape element at the split axis is computed at run time (cannot be divided).
    """
    tp = plan.tp
    graph = model.graph
    nodes = {n.name: n for n in graph}
    values = {v.name: v for n in graph for v in n.outputs}
    values.update({v.name: v for v in graph.inputs})
    values.update(graph.initializers)
    serial = iter(range(1 << 30))

    def fresh(stem: str) -> str:
        return f"{stem}__tp{rank}_{next(serial)}"

    def parts_of(name: str) -> list[tuple[int, int]]:
        return plan.layouts[name][1].parts(rank, tp)

    for name, out in plan.columns.items():
        node = nodes[name]
        _, features_axis = weight_product(node)
        parts = parts_of(out)
        node.replace_input_with(1, _initializer(graph, fresh(node.inputs[1].name), _sliced(
            node.inputs[1].const_value, features_axis, parts)))  # fmt: skip
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = node.inputs[2].const_value.numpy()
            if bias.ndim and bias.shape[-1] > 1:
                node.replace_input_with(2, _initializer(graph, fresh(node.inputs[2].name), take_parts(bias, -1, parts)))
    for edit in plan.edits:
        node = nodes[edit[1]]
        if edit[0] == "slice_in":
            _slice_input(graph, node, edit[2], edit[3], edit[4].parts(rank, tp), fresh)
        elif edit[0] == "shape":
            _divide_shape(graph, node, edit[2], edit[3], edit[4], tp, fresh)
        elif edit[0] == "slice_bounds":
            k = edit[2]
            for slot in (1, 2):
                bounds = const_of(node.inputs[slot]).astype(np.int64).copy()
                bounds[k] = bounds[k] // tp if bounds[k] >= 0 else -((-bounds[k]) // tp)
                node.replace_input_with(slot, _initializer(graph, fresh(node.inputs[slot].name), bounds))
        elif edit[0] == "split_sizes":
            sizes = const_of(node.inputs[1]) // tp
            node.replace_input_with(1, _initializer(graph, fresh(node.inputs[1].name), sizes.astype(np.int64)))
    for name, x in plan.rows.items():
        _row(graph, nodes[name], parts_of(x), fresh)
    for name in plan.embeddings:
        _vocab_embedding(graph, nodes[name], rank, tp, fresh)
    for name in plan.gathered:
        value = values[name]
        index = list(graph.outputs).index(value)
        whole = ir.Value(name=name, shape=value.shape, type=value.type)
        value.name = fresh(name)
        gather = ir.Node(DOMAIN, "AllGather", [value], attributes=[ir.AttrInt64("axis", plan.layouts[name][0])],
                         outputs=[whole], name=fresh("allgather"))  # fmt: skip
        graph.insert_after(value.producer(), gather)
        graph.outputs[index] = whole
        values[value.name] = value
    renamed = {name: values[name].name for name in plan.gathered}
    for name, (axis, _layout) in plan.layouts.items():
        value = values.get(renamed.get(name, name))
        if value is None or value.shape is None or value.const_value is not None:
            continue
        dims = list(value.shape)
        if axis < len(dims) and isinstance(dims[axis], int):
            dims[axis] = dims[axis] // tp
            value.shape = ir.Shape(dims)
    model.opset_imports[DOMAIN] = 1
    return model


def _name_outputs(nodes: list[ir.Node], fresh) -> None:
    """Name the outputs of new nodes: segments are cut by value name."""
    for node in nodes:
        for value in node.outputs:
            if value.name is None:
                value.name = fresh(node.name or "tp")


def _slice_input(graph, node: ir.Node, index: int, axis: int, parts: list[tuple[int, int]], fresh) -> None:
    value = node.inputs[index]
    array = const_of(value)
    if array is not None:
        node.replace_input_with(index, _initializer(graph, fresh(value.name), take_parts(array, axis, parts)))
        return
    pieces = []
    nodes = []
    for a, b in parts:
        starts = _initializer(graph, fresh("starts"), np.array([a], np.int64))
        ends = _initializer(graph, fresh("ends"), np.array([b], np.int64))
        axes = _initializer(graph, fresh("axes"), np.array([axis], np.int64))
        piece = ir.Node("", "Slice", [value, starts, ends, axes], name=fresh(f"{node.name}_tp_slice"))
        nodes.append(piece)
        pieces.append(piece.outputs[0])
    if len(pieces) > 1:
        nodes.append(ir.Node("", "Concat", pieces, attributes=[ir.AttrInt64("axis", axis)], name=fresh("tp_cat")))
    nodes[-1].outputs[0].type = value.type
    _name_outputs(nodes, fresh)
    graph.insert_before(node, nodes)
    node.replace_input_with(index, nodes[-1].outputs[0])


def _divide_shape(graph, node: ir.Node, index: int, element: int, size: int, tp: int, fresh) -> None:
    """Element ``element`` of ``node``'s shape input (``size`` in the whole graph) becomes ``size / tp``."""
    found = _shape_piece(node.inputs[index], element)
    if found is None:
        raise AdapterError(f"{node.name}: the shape element at the split axis is computed at run time.")
    concat, local, piece = found
    array = const_of(piece).copy()
    flat = array.reshape(-1)
    if flat[local] in (-1, 0, 1):  # infer, copy, broadcast: already right for the rank
        return
    if flat[local] != size:
        raise AdapterError(f"{node.name}: the shape element at the split axis is {flat[local]}, not {size}.")
    flat[local] = size // tp
    new = _initializer(graph, fresh(piece.name), flat.reshape(array.shape))
    if concat is None:
        node.replace_input_with(index, new)
        return
    slot = list(concat.inputs).index(piece)
    copy = ir.Node("", "Concat", list(concat.inputs), attributes=list(concat.attributes.values()),
                   name=fresh(concat.name))  # fmt: skip
    copy.replace_input_with(slot, new)
    _name_outputs([copy], fresh)
    copy.outputs[0].type = ir.TensorType(ir.DataType.INT64)
    graph.insert_before(node, copy)
    node.replace_input_with(index, copy.outputs[0])


def _row(graph, node: ir.Node, parts: list[tuple[int, int]], fresh) -> None:
    """Keep the weight rows of ``parts``; AllReduce the product, then add a Gemm's bias once."""
    rows_axis = 1 - weight_product(node)[1]
    node.replace_input_with(1, _initializer(graph, fresh(node.inputs[1].name), _sliced(
        node.inputs[1].const_value, rows_axis, parts)))  # fmt: skip
    out = node.outputs[0]
    reduced = ir.Value(name=fresh("allreduce"), shape=out.shape, type=out.type)
    ir.convenience.replace_all_uses_with(out, reduced, replace_graph_outputs=True)
    added = [ir.Node(DOMAIN, "AllReduce", [out], attributes=[ir.AttrInt64("axis", -1)], outputs=[reduced],
                     name=fresh("allreduce"))]  # fmt: skip
    bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    if bias is not None:
        node.replace_input_with(2, None)
        beta = float(attr_of(node, "beta", 1.0))
        if beta != 1.0:
            bias = _initializer(graph, fresh(bias.name), bias.const_value.numpy() * beta)
        biased = ir.Value(name=fresh("bias"), shape=out.shape, type=out.type)
        ir.convenience.replace_all_uses_with(reduced, biased, replace_graph_outputs=True)
        added.append(ir.Node("", "Add", [reduced, bias], outputs=[biased], name=fresh(f"{node.name}_bias")))
    graph.insert_after(node, added)


def _vocab_embedding(graph, node: ir.Node, rank: int, tp: int, fresh) -> None:
    """Rows ``rank``'s share of the table: ids it does not hold give zeros, then AllReduce."""
    table = node.inputs[0].const_value
    share = table.shape[0] // tp
    start = rank * share
    ids = node.inputs[1]
    local_table = _initializer(graph, fresh(node.inputs[0].name), _sliced(table, 0, [(start, start + share)]))
    const = {k: _initializer(graph, fresh(k), np.array(v, np.int64)) for k, v in
             (("start", start), ("share", share), ("zero", 0), ("last", [-1]))}  # fmt: skip
    local = ir.Node("", "Sub", [ids, const["start"]], name=fresh("vocab_local"))
    lower = ir.Node("", "GreaterOrEqual", [local.outputs[0], const["zero"]], name=fresh("vocab_lo"))
    upper = ir.Node("", "Less", [local.outputs[0], const["share"]], name=fresh("vocab_hi"))
    inside = ir.Node("", "And", [lower.outputs[0], upper.outputs[0]], name=fresh("vocab_in"))
    safe = ir.Node("", "Where", [inside.outputs[0], local.outputs[0], const["zero"]], name=fresh("vocab_safe"))
    gather = ir.Node("", "Gather", [local_table, safe.outputs[0]], attributes=[ir.AttrInt64("axis", 0)],
                     name=node.name)  # fmt: skip
    keep = ir.Node("", "Cast", [inside.outputs[0]], attributes=[ir.AttrInt64("to", int(node.inputs[0].const_value.dtype))],
                   name=fresh("vocab_keep"))  # fmt: skip
    expand = ir.Node("", "Unsqueeze", [keep.outputs[0], const["last"]], name=fresh("vocab_keep_axis"))
    out = node.outputs[0]
    masked = ir.Node("", "Mul", [gather.outputs[0], expand.outputs[0]], name=fresh("vocab_mask"),
                     outputs=[ir.Value(name=fresh("vocab_rows"), shape=out.shape, type=out.type)])  # fmt: skip
    reduce_out = ir.Value(name=fresh("vocab_allreduce"), shape=out.shape, type=out.type)
    reduce = ir.Node(DOMAIN, "AllReduce", [masked.outputs[0]], attributes=[ir.AttrInt64("axis", -1)],
                     outputs=[reduce_out], name=fresh("allreduce"))  # fmt: skip
    ir.convenience.replace_all_uses_with(out, reduce_out, replace_graph_outputs=True)
    added = [local, lower, upper, inside, safe, gather, keep, expand, masked, reduce]
    _name_outputs(added, fresh)
    graph.insert_after(node, added)
    graph.remove(node, safe=True)


def tensor_parallel_graph(model: ir.Model, plan: TPPlan, rank: int) -> ir.Model:
    """Rank ``rank``'s graph as a new model (the analysed ``model`` is left as it is; the copy
    shares its tensors, and the rank's slices are read from them only when saved)."""
    return apply_plan(model.clone(), plan, rank)
