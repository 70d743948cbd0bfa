"""Tensor parallelism found in the exported graph: Megatron pairs by sharding propagation.

One rule for every architecture, no module names. A *weight product* is a ``MatMul`` or
``Gemm`` whose weight is a constant matrix. Every weight product whose input is the same
on every rank (replicated) is tried as **column-parallel**: each rank keeps a slice of its
output features, so its output is *split* along its last axis. The split is then followed
through the graph node by node (sharding propagation): element-wise ops, reshapes into heads,
transposes, rotary slices, the attention products, softmax and the KV-cache ``Concat`` keep
a tensor split along one axis (its heads); a weight product whose input arrives split along
the contracted axis is **row-parallel**: it keeps the matching rows of its weight and is
followed by an ``AllReduce``, after which the value is whole again and re-enters the
residual stream. Where a replicated value meets a split one (a bias, a KV cache a rank
does not own) the rank takes its slice; a graph input concatenated with a split value (the
past keys and values) becomes a per-rank input, so each rank holds only its heads' cache.

A column whose split cannot be followed to a row-parallel product (it reaches a
normalization over the split axis, a reshape that would cut a head, a dynamic shape at the
split axis, ...) is kept replicated and the nodes that broke the pattern are reported:
that is how GQA's key/value projections stay whole when their heads do not divide by the
degree (the keys are then sliced to each rank's query heads after the cache). A model in
which no pair could be split is refused with those nodes.

Where a split reaches a graph output that is not per-rank (the language-model head's
logits), an ``AllGather`` joins it. The word embedding (a ``Gather`` from a constant table)
is split by vocabulary: each rank looks up the ids it holds, zeros elsewhere, then an
``AllReduce``. Collectives are nodes of the ``adapter.dist`` domain, as in
:mod:`adapter.passes.sharding`, whose segmenting and runtime run them.

:func:`analyse` works on the unsharded graph once;
:func:`adapter.passes.tensor_parallel_ranks.apply_plan` writes rank *r*'s graph from it
(weights sliced, shape constants divided, collectives inserted).
"""

from __future__ import annotations

__all__ = ["TPPlan", "analyse", "const_of", "dims_of", "attr_of", "weight_product"]

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from adapter.core.errors import AdapterError

UNARY = {
    "Neg", "Sigmoid", "Tanh", "Erf", "Relu", "Gelu", "Cast", "Sqrt", "Reciprocal", "Exp", "Log", "Abs",
    "Identity", "Softplus", "Sin", "Cos", "Not", "Floor", "Ceil", "Round", "Sign", "Dropout", "HardSigmoid",
    "LeakyRelu", "Elu", "Selu", "Softsign", "CastLike", "Clip",
}  # fmt: skip
BINARY = {
    "Add", "Sub", "Mul", "Div", "Pow", "Where", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual",
    "And", "Or", "Xor", "Max", "Min", "Mod", "BitShift", "PRelu",
}  # fmt: skip
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceSumSquare"}


class _Broken(Exception):
    """A split cannot pass this node; ``reason`` says why."""


class _Layout:
    """How one family of values is split: its global size on the split axis and its blocks.

    Values derived element-wise share a layout (union-find), so blocks found late (a ``Split``
    of a fused Q/K/V output into three) still reach the column whose weight they slice.
    """

    def __init__(self, size: int, origins: set[str]) -> None:
        self.size = size
        self.cuts: set[int] = set()
        self.origins = set(origins)
        self.parent: _Layout | None = None

    def root(self) -> _Layout:
        node = self
        while node.parent is not None:
            node = node.parent
        return node

    def union(self, other: _Layout) -> _Layout:
        a, b = self.root(), other.root()
        if a is b:
            return a
        if a.size != b.size:
            raise _Broken(f"split sizes {a.size} and {b.size} meet")
        a.cuts |= b.cuts
        a.origins |= b.origins
        b.parent = a
        return a

    def cut(self, *points: int) -> None:
        """Blocks end at ``points`` (a Split or a Slice of the split axis): each block splits on its own."""
        root = self.root()
        root.cuts |= {p for p in points if 0 < p < root.size}

    @property
    def blocks(self) -> list[int]:
        edges = [0, *sorted(self.root().cuts), self.root().size]
        return [b - a for a, b in zip(edges, edges[1:])]

    def parts(self, rank: int, tp: int) -> list[tuple[int, int]]:
        """Rank's [start, stop) ranges along the global axis: its share of every block."""
        parts, offset = [], 0
        for block in self.blocks:
            share = block // tp
            parts.append((offset + rank * share, offset + (rank + 1) * share))
            offset += block
        return parts


@dataclass
class TPPlan:
    """What :func:`analyse` found: the pairs, what stays replicated and the edits per rank."""

    tp: int
    columns: dict[str, str] = field(default_factory=dict)
    """Column-parallel weight product → the value whose layout slices its weight."""
    rows: dict[str, str] = field(default_factory=dict)
    """Row-parallel weight product → its (split) input."""
    embeddings: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    """Weight products tried as columns and kept replicated → the node and reason that broke the split."""
    layouts: dict[str, tuple[int, _Layout]] = field(default_factory=dict)
    """Every split value → (axis, layout)."""
    edits: list[tuple[Any, ...]] = field(default_factory=list)
    """Structural edits: ('slice_in', node, input, axis, layout) / ('shape', node, input, element, global size) /
    ('split_sizes', node)."""
    split_inputs: list[str] = field(default_factory=list)
    gathered: list[str] = field(default_factory=list)
    modules: dict[str, str] = field(default_factory=dict)
    """The module path (``adapter.module``) of each product named above, where the export kept it."""

    def report(self) -> dict[str, Any]:
        return {
            "tp": self.tp,
            "column_parallel": sorted(self.columns),
            "row_parallel": sorted(self.rows),
            "vocab_parallel_embeddings": self.embeddings,
            "replicated": self.kept,
            "per_rank_inputs": self.split_inputs,
            "gathered_outputs": self.gathered,
            "modules": self.modules,
        }


# --------------------------------------------------------------------------- helpers


def const_of(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].value.numpy()
    return None


def weight_product(node: ir.Node) -> tuple[int, int] | None:
    """(weight input index, axis of the weight's output features) of a weight product, else None."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2:
        return None
    if node.op_type == "Gemm":
        if attr_of(node, "transA", 0):
            return None
        return 1, 0 if attr_of(node, "transB", 0) else 1
    return 1, 1


def attr_of(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def dims_of(value: ir.Value) -> list[Any] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else d) for d in value.shape]


def _embedding(node: ir.Node) -> bool:
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or attr_of(node, "axis", 0) != 0:
        return False
    table = node.inputs[0]
    ids = node.inputs[1]
    return (
        table is not None and table.const_value is not None and len(table.const_value.shape) == 2
        and ids is not None and ids.const_value is None and table.const_value.shape[0] >= 16
    )  # fmt: skip


# --------------------------------------------------------------------------- analysis


class _Propagation:
    """One pass of sharding propagation over the graph with a given set of column candidates."""

    def __init__(self, model: ir.Model, tp: int, columns: set[str], embeddings: set[str], keep: set[str]):
        self.model = model
        self.tp = tp
        self.candidates = columns
        self.embeddings = embeddings
        self.keep = keep
        self.split: dict[str, tuple[int, _Layout]] = {}
        self.plan = TPPlan(tp)
        self.failures: list[tuple[str, str, set[str]]] = []
        self.graph_inputs = {v.name for v in model.graph.inputs}

    def run(self) -> None:
        for node in self.model.graph:
            try:
                self._node(node)
            except _Broken as broken:
                origins = set().union(*(self.split[v.name][1].root().origins for v in node.inputs
                                        if v is not None and v.name in self.split))  # fmt: skip
                self.failures.append((node.name, str(broken), origins))
        for value in self.model.graph.outputs:
            if value.name not in self.split:
                continue
            axis, layout = self.split[value.name]
            if value.name in self.keep:
                continue
            if len(layout.blocks) > 1:
                self.failures.append((value.name, "a graph output split in several blocks", layout.root().origins))
            self.plan.gathered.append(value.name)
        for name, (_axis, layout) in self.split.items():
            root = layout.root()
            if any(b % self.tp for b in layout.blocks):
                self.failures.append((name, f"{root.size} features do not split {self.tp} ways", root.origins))
        self.plan.layouts = self.split

    # -- per node

    def _set(self, value: ir.Value, axis: int, layout: _Layout) -> None:
        self.split[value.name] = (axis, layout)

    def _node(self, node: ir.Node) -> None:
        inputs = [v if v is not None and v.name in self.split else None for v in node.inputs]
        product = weight_product(node)
        if product is not None:
            x = node.inputs[0]
            if x.name in self.split:
                axis, layout = self.split[x.name]
                rank = len(dims_of(x) or [])
                if axis != rank - 1:
                    raise _Broken(f"the product's input is split on axis {axis}, not on the contracted one")
                self.plan.rows[node.name] = x.name
            elif node.name in self.candidates:
                weight = node.inputs[1].const_value
                out = node.outputs[0]
                rank = len(dims_of(out) or [])
                if rank == 0:
                    raise _Broken("the product's output has no known rank")
                self._set(out, rank - 1, _Layout(int(weight.shape[product[1]]), {node.name}))
                self.plan.columns[node.name] = out.name
            return
        if node.name in self.embeddings and _embedding(node) and not any(inputs):
            self.plan.embeddings.append(node.name)
            return
        if not any(inputs):
            return
        rule = getattr(self, f"_op_{node.op_type}", None)
        if node.op_type in UNARY:
            rule = self._unary
        elif node.op_type in BINARY:
            rule = self._broadcast
        elif node.op_type in REDUCE:
            rule = self._reduce
        if rule is None or node.domain not in ("", "ai.onnx"):
            raise _Broken(f"{node.op_type} has no sharding rule")
        rule(node)

    def _in(self, node: ir.Node, index: int) -> tuple[int, _Layout, list[Any]]:
        value = node.inputs[index]
        axis, layout = self.split[value.name]
        return axis, layout, dims_of(value) or []

    def _unary(self, node: ir.Node) -> None:
        axis, layout, _ = self._in(node, 0)
        self._set(node.outputs[0], axis, layout)

    def _match_replicated(self, node: ir.Node, index: int, out_axis: int, out_rank: int, layout: _Layout) -> None:
        """A replicated input meeting a split one at ``out_axis``: broadcast, or take the rank's slice."""
        value = node.inputs[index]
        dims = dims_of(value)
        if dims is None:
            raise _Broken(f"input '{value.name}' has no known shape")
        axis = out_axis - (out_rank - len(dims))
        if axis < 0 or dims[axis] == 1:
            return
        if dims[axis] != layout.root().size:
            raise _Broken(f"input '{value.name}' has {dims[axis]} on the split axis, not {layout.root().size} or 1")
        if value.name in self.graph_inputs and value.const_value is None:
            self._set(value, axis, layout)  # a per-rank input: each rank holds its part (the KV cache)
            if value.name not in self.plan.split_inputs:
                self.plan.split_inputs.append(value.name)
            return
        self.plan.edits.append(("slice_in", node.name, index, axis, layout))

    def _broadcast(self, node: ir.Node) -> None:
        out = node.outputs[0]
        out_rank = len(dims_of(out) or [])
        axis_out, layout = None, None
        for index, value in enumerate(node.inputs):
            if value is None or value.name not in self.split:
                continue
            axis, this, dims = self._in(node, index)
            here = axis + out_rank - len(dims)
            if axis_out is not None and here != axis_out:
                raise _Broken(f"inputs split on different axes ({axis_out}, {here})")
            axis_out = here
            layout = this if layout is None else layout.union(this)
        for index, value in enumerate(node.inputs):
            if value is not None and value.name not in self.split:
                self._match_replicated(node, index, axis_out, out_rank, layout)
        for value in node.inputs:  # a graph input made per-rank above
            if value is not None and value.name in self.split:
                layout = layout.union(self.split[value.name][1])
        self._set(out, axis_out, layout)

    def _op_Transpose(self, node: ir.Node) -> None:
        axis, layout, dims = self._in(node, 0)
        perm = list(attr_of(node, "perm", None) or reversed(range(len(dims))))
        self._set(node.outputs[0], perm.index(axis), layout)

    def _axes(self, node: ir.Node, rank: int) -> list[int] | None:
        axes = const_of(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if axes is None and "axes" in node.attributes:
            axes = np.array(attr_of(node, "axes", []))
        return None if axes is None else [int(a) % rank for a in np.asarray(axes).reshape(-1)]

    def _op_Unsqueeze(self, node: ir.Node) -> None:
        axis, layout, dims = self._in(node, 0)
        out_rank = len(dims_of(node.outputs[0]) or [])
        axes = self._axes(node, out_rank)
        if axes is None:
            raise _Broken("Unsqueeze axes are not constant")
        kept = [p for p in range(out_rank) if p not in axes]
        self._set(node.outputs[0], kept[axis], layout)

    def _op_Squeeze(self, node: ir.Node) -> None:
        axis, layout, dims = self._in(node, 0)
        axes = self._axes(node, len(dims))
        if axes is None:
            axes = [i for i, d in enumerate(dims) if d == 1]
        if axis in axes:
            raise _Broken("Squeeze removes the split axis")
        self._set(node.outputs[0], axis - sum(a < axis for a in axes), layout)

    def _op_Softmax(self, node: ir.Node) -> None:
        axis, layout, dims = self._in(node, 0)
        if int(attr_of(node, "axis", -1)) % len(dims) == axis:
            raise _Broken(f"{node.op_type} over the split axis")
        self._set(node.outputs[0], axis, layout)

    _op_LogSoftmax = _op_Softmax

    def _reduce(self, node: ir.Node) -> None:
        axis, layout, dims = self._in(node, 0)
        axes = self._axes(node, len(dims))
        if axes is None:
            if attr_of(node, "noop_with_empty_axes", 0):
                axes = []
            else:
                raise _Broken(f"{node.op_type} over every axis")
        if axis in axes:
            raise _Broken(f"{node.op_type} over the split axis")
        keep = attr_of(node, "keepdims", 1)
        self._set(node.outputs[0], axis if keep else axis - sum(a < axis for a in axes), layout)

    def _op_LayerNormalization(self, node: ir.Node) -> None:
        if node.inputs[0].name not in self.split:
            raise _Broken("a split scale or bias")
        axis, layout, dims = self._in(node, 0)
        if axis >= int(attr_of(node, "axis", -1)) % len(dims):
            raise _Broken("LayerNormalization over the split axis")
        self._set(node.outputs[0], axis, layout)

    _op_SimplifiedLayerNormalization = _op_LayerNormalization
    _op_RMSNormalization = _op_LayerNormalization

    def _op_Concat(self, node: ir.Node) -> None:
        out = node.outputs[0]
        out_rank = len(dims_of(out) or [])
        concat_axis = int(attr_of(node, "axis", 0)) % out_rank
        self._broadcast_like(node, out_rank, concat_axis)

    def _broadcast_like(self, node: ir.Node, out_rank: int, forbidden: int) -> None:
        axis_out, layout = None, None
        for index, value in enumerate(node.inputs):
            if value is not None and value.name in self.split:
                axis, this, _dims_ = self._in(node, index)
                if axis_out is not None and axis != axis_out:
                    raise _Broken("inputs split on different axes")
                axis_out, layout = axis, this if layout is None else layout.union(this)
        if axis_out == forbidden:
            raise _Broken("Concat along the split axis")
        for index, value in enumerate(node.inputs):
            if value is not None and value.name not in self.split:
                self._match_replicated(node, index, axis_out, out_rank, layout)
                if value.name in self.split:
                    layout = layout.union(self.split[value.name][1])
        self._set(node.outputs[0], axis_out, layout)

    def _op_Slice(self, node: ir.Node) -> None:
        axis, layout, dims = self._in(node, 0)
        starts, ends = const_of(node.inputs[1]), const_of(node.inputs[2])
        axes = const_of(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        steps = const_of(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
        if starts is None or ends is None or (len(node.inputs) > 3 and node.inputs[3] is not None and axes is None):
            raise _Broken("Slice bounds are not constant")
        axes = np.arange(len(starts)) if axes is None else axes
        size = layout.root().size
        for k, a in enumerate(np.asarray(axes).reshape(-1)):
            if int(a) % len(dims) != axis:
                continue
            step = 1 if steps is None else int(steps[k])
            start, stop = (int(v) + size if int(v) < 0 else int(v) for v in (starts[k], ends[k]))
            start, stop = min(max(start, 0), size), min(max(stop, 0), size)
            if step != 1 or stop <= start:
                raise _Broken("a strided or empty Slice along the split axis")
            if (start, stop) == (0, size):
                break
            layout.cut(start, stop)  # a block of the features (fused Q/K/V, gate/up): each rank its share
            self.plan.edits.append(("slice_bounds", node.name, k))
            self._set(node.outputs[0], axis, _Layout(stop - start, layout.root().origins))
            return
        self._set(node.outputs[0], axis, layout)

    def _op_Split(self, node: ir.Node) -> None:
        axis, layout, dims = self._in(node, 0)
        if int(attr_of(node, "axis", 0)) % len(dims) != axis:
            for out in node.outputs:
                self._set(out, axis, layout)
            return
        sizes = const_of(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        root = layout.root()
        if sizes is None:
            if len(node.inputs) > 1 and node.inputs[1] is not None:
                raise _Broken("Split sizes are not constant")
            sizes = [root.size // len(node.outputs)] * len(node.outputs)
        sizes = [int(s) for s in np.asarray(sizes).reshape(-1)]
        layout.cut(*np.cumsum(sizes)[:-1].tolist())
        for out, size in zip(node.outputs, sizes):
            self._set(out, axis, _Layout(size, root.origins))
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            self.plan.edits.append(("split_sizes", node.name))

    def _op_Reshape(self, node: ir.Node) -> None:
        self._reshape_like(node, expand=False)

    def _op_Expand(self, node: ir.Node) -> None:
        self._reshape_like(node, expand=True)

    def _reshape_like(self, node: ir.Node, expand: bool) -> None:
        axis, layout, dims = self._in(node, 0)
        out_dims = dims_of(node.outputs[0])
        if out_dims is None:
            raise _Broken("output shape unknown")
        size = layout.root().size
        if expand:
            b = axis + len(out_dims) - len(dims)
            new = layout
        elif dims[:axis] == out_dims[:axis] and axis < len(out_dims):
            b = axis
            new = self._regroup(size, out_dims[b], dims[axis + 1 :], out_dims[b + 1 :], layout)
        elif (
            dims[axis + 1 :] == out_dims[len(out_dims) - len(dims) + axis + 1 :]
            and dims[axis] == out_dims[len(out_dims) - len(dims) + axis]
        ):
            b = len(out_dims) - len(dims) + axis
            new = layout
        else:
            raise _Broken(f"a reshape of {dims} to {out_dims} moves the split axis {axis}")
        if out_dims[b] != (new.root().size if new is not layout else size):
            raise _Broken(f"dimension {out_dims[b]} at the split axis")
        target = (dims_of(node.inputs[1]) or [len(out_dims)])[0] if expand else len(out_dims)
        element = b - (len(out_dims) - target) if isinstance(target, int) else b
        if element >= 0:
            self.plan.edits.append(("shape", node.name, 1, element, out_dims[b]))
        self._set(node.outputs[0], b, new)

    def _regroup(self, size: int, out: Any, inner_in: list[Any], inner_out: list[Any], layout: _Layout) -> _Layout:
        if out == size:
            return layout
        if not isinstance(out, int):
            raise _Broken(f"dimension {out} at the split axis")
        if size % out == 0 or out % size == 0:  # heads factored out of the features, or merged back
            if out % self.tp:
                raise _Broken(f"{out} heads do not split {self.tp} ways")
            if len(layout.blocks) > 1:
                raise _Broken("a reshape of a value split in several blocks")
            return _Layout(out, layout.root().origins)
        raise _Broken(f"{size} features regrouped into {out}")

    def _op_MatMul(self, node: ir.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        out = node.outputs[0]
        out_rank = len(dims_of(out) or [])
        targets: list[tuple[int, _Layout]] = []
        for value, contracted, kept in ((a, -1, -2), (b, -2, -1)):
            if value.name not in self.split:
                continue
            axis, layout = self.split[value.name]
            rank = len(dims_of(value) or [])
            if axis == rank + contracted:
                raise _Broken("a product over the split axis (partial sums)")
            targets.append((out_rank + kept if axis == rank + kept else axis + out_rank - rank, layout))
        axes = {t[0] for t in targets}
        if len(axes) > 1:
            raise _Broken("operands split on different axes")
        axis_out = axes.pop()
        layout = targets[0][1]
        for _, other in targets[1:]:
            layout = layout.union(other)
        if len(targets) == 1 and axis_out < out_rank - 2:  # a batch axis: the other operand broadcasts or slices
            index = 1 if a.name in self.split else 0
            self._match_replicated(node, index, axis_out, out_rank, layout)
        self._set(out, axis_out, layout)

    def _op_Gather(self, node: ir.Node) -> None:
        if node.inputs[1].name in self.split:
            raise _Broken("split gather indices")
        axis, layout, dims = self._in(node, 0)
        along = int(attr_of(node, "axis", 0)) % len(dims)
        if along == axis:
            raise _Broken("Gather along the split axis")
        indices = len(dims_of(node.inputs[1]) or [])
        self._set(node.outputs[0], axis if axis < along else axis + indices - 1, layout)

    def _op_Shape(self, node: ir.Node) -> None:
        return  # local sizes: every later use computes with the rank's own shapes


def analyse(model: ir.Model, tp: int, keep_split: set[str] | frozenset[str] = frozenset()) -> TPPlan:
    """Find the column/row pairs of ``model`` for ``tp`` ranks (the graph is not changed).

    ``keep_split`` names graph outputs that stay per rank (the present keys and values).

    Raises:
        AdapterError: No pair of the graph can be split ``tp`` ways (the reasons, by node).
    """
    columns = {n.name for n in model.graph if weight_product(n) is not None}
    embeddings = {n.name for n in model.graph if _embedding(n) and n.inputs[0].const_value.shape[0] % tp == 0}
    kept: dict[str, str] = {}
    for _ in range(len(columns) + 2):
        run = _Propagation(model, tp, columns, embeddings, set(keep_split))
        run.run()
        if not run.failures:
            break
        for where, reason, origins in run.failures:
            for origin in origins:
                kept.setdefault(origin, f"{where}: {reason}")
            columns -= origins
        if not any(origins for *_, origins in run.failures):
            broken = "; ".join(f"{w}: {r}" for w, r, _ in run.failures[:6])
            raise AdapterError(f"Tensor parallelism cannot follow the graph: {broken}.")
    plan = run.plan
    plan.kept = {name: why for name, why in kept.items() if name not in plan.columns and name not in plan.rows}
    plan.modules = {n.name: n.metadata_props.get("adapter.module", "") for n in model.graph
                    if n.name in plan.kept or n.name in plan.columns or n.name in plan.rows}  # fmt: skip
    if not plan.rows and not plan.embeddings:
        broken = "; ".join(f"{name}: {why}" for name, why in list(kept.items())[:8])
        raise AdapterError(
            f"No column/row-parallel pair of this graph splits {tp} ways (the nodes that broke the pattern: "
            f"{broken or 'no weight products'}).",
            "Use pipeline parallelism only (--tp 1), or another degree.",
        )
    return plan
