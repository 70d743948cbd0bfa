"""Decoder attention with a KV cache to ONNX Runtime's ``GroupQueryAttention`` over one buffer.

An exported decoder (``adapter.llm.export``) concatenates each layer's past keys/values
with the new ones (``present = Concat(past, new)``, a graph output), repeats the KV heads
for grouped-query attention and attends; after ``fuse-ort-attention`` that attention is a
``MultiHeadAttention`` whose key and value are the repeated, re-laid-out concatenation.
This pass replaces, per layer, the ``Concat`` + head repeat + ``MultiHeadAttention`` with
one ``com.microsoft::GroupQueryAttention`` that reads the layer's new keys/values in
``(batch, seq, kv_heads * head_dim)``, writes them into the cache at positions
``[T - seq, T)`` (``T``: the attention-mask width, past + new) and attends over ``[0, T)``.

Why: the concatenation copies the whole cache every step and the head repeat copies it
again ``heads / kv_heads`` times; ``GroupQueryAttention`` reads the KV heads where they
are. When the runtime binds the same buffer as a layer's ``past`` input and ``present``
output, ONNX Runtime writes in place: the cache is allocated once for the whole context
(``past`` then has the buffer's capacity as its length, not the past length).

What stays as it was:

* rotary embedding: already applied to the queries and keys (``RotaryEmbedding`` ops fed
  by ``position_ids``), so ``do_rotary`` is 0 and left-padded rows keep their positions;
* the mask: the model's own additive mask (causal and padding, ``(B, 1, S, T)``) becomes
  the op's ``attention_bias``; ``seqlens_k`` is ``T - 1`` for every row (the rows of a
  batch stay aligned, padding is masked, not skipped).

Because ``past`` may then be longer than the past, every other read of a past input's
shape (the exporter derives the past length from it for the mask) is rewritten to
``T - seq`` from the ``attention_mask`` and ``input_ids`` inputs. The pass is all or
nothing: if one layer's attention or one read of a past input does not fit, the graph is
left unchanged and ``refused`` says why (a partly fused graph could not share buffers).
"""

from __future__ import annotations

__all__ = ["OrtGroupQueryAttentionFusion"]

from typing import Any

import numpy as np
import onnx_ir as ir

from adapter.passes.base import CountedPass

_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Expand", "Unsqueeze", "Squeeze", "Slice"})
"""Ops between a layer's concatenated cache and its attention: head repeat and re-layout."""


def _const(name: str, array: np.ndarray) -> tuple[ir.Node, ir.Value]:
    node = ir.node("Constant", [], attributes={"value": ir.tensor(array, name=name)}, name=name)
    return node, node.outputs[0]


class _Match:
    """One layer's attention as found: the MultiHeadAttention and where its cache comes from.

    Either the exporter's form (``key_concat`` / ``value_concat``: ``Concat(past, new)``
    graph outputs re-laid out into the attention's key and value), or a MultiHeadAttention
    that took the past in itself (onnxscript's ``mha`` rule, e.g. GPT-2): ``past`` and
    ``present`` are then its own inputs 6-7 and outputs 1-2, and its key/value are new only.
    """

    def __init__(self, attention: ir.Node, key_concat: ir.Node | None = None, value_concat: ir.Node | None = None):
        self.attention = attention
        self.key_concat = key_concat
        self.value_concat = value_concat

    @property
    def own_past(self) -> bool:
        return self.key_concat is None

    def pasts(self) -> tuple[ir.Value, ir.Value]:
        if self.own_past:
            return self.attention.inputs[6], self.attention.inputs[7]
        return self.key_concat.inputs[0], self.value_concat.inputs[0]

    def presents(self) -> tuple[ir.Value, ir.Value]:
        if self.own_past:
            return self.attention.outputs[1], self.attention.outputs[2]
        return self.key_concat.outputs[0], self.value_concat.outputs[0]

    def readers(self) -> list[ir.Node]:
        """The nodes allowed to read a past input besides ``Shape``."""
        return [self.attention] if self.own_past else [self.key_concat, self.value_concat]


class OrtGroupQueryAttentionFusion(CountedPass):
    """Per layer, cache concat + head repeat + MultiHeadAttention to one GroupQueryAttention."""

    name = "fuse-ort-gqa"

    def __init__(self, input_ids: str = "input_ids", attention_mask: str = "attention_mask") -> None:
        super().__init__()
        self.input_ids = input_ids
        self.attention_mask = attention_mask

    # --- finding ---------------------------------------------------------------------------

    @staticmethod
    def _cache_concat(value: ir.Value | None, graph: ir.Graph) -> ir.Node | None:
        """The ``Concat(past input, new)`` that ``value`` re-lays out, if it is one."""
        while value is not None:
            node = value.producer()
            if node is None:
                return None
            if node.op_type == "Concat" and node.domain == "":
                past = node.inputs[0]
                if (
                    len(node.inputs) == 2
                    and past in graph.inputs
                    and node.outputs[0] in graph.outputs
                    and node.attributes.get_int("axis", 0) in (2, -2)
                ):
                    return node
                return None
            if node.op_type not in _LAYOUT_OPS or node.domain != "":
                return None
            value = node.inputs[0]
        return None

    def _matches(self, graph: ir.Graph) -> tuple[list[_Match], str | None]:
        matches: list[_Match] = []
        for node in graph:
            if node.op_type != "MultiHeadAttention" or node.domain != "com.microsoft":
                continue
            inputs = list(node.inputs) + [None] * (8 - len(node.inputs))
            if inputs[3] is not None or inputs[4] is not None:
                return [], f"{node.name}: MultiHeadAttention with a bias or a key padding mask"
            if inputs[6] is not None or inputs[7] is not None:
                outputs = list(node.outputs)
                if not (
                    inputs[6] in graph.inputs and inputs[7] in graph.inputs and len(outputs) == 3
                    and outputs[1] in graph.outputs and outputs[2] in graph.outputs
                ):  # fmt: skip
                    return [], f"{node.name}: MultiHeadAttention whose past/present are not the graph's cache"
                matches.append(_Match(node))
                continue
            key, value = self._cache_concat(inputs[1], graph), self._cache_concat(inputs[2], graph)
            if key is None or value is None:
                return [], f"{node.name}: its key/value are not a layer's concatenated cache"
            matches.append(_Match(node, key, value))
        return matches, None

    # --- rewriting -------------------------------------------------------------------------

    def _lengths(self, graph: ir.Graph) -> tuple[list[ir.Node], dict[str, ir.Value]]:
        """Nodes computing T (int32 scalar), seqlens_k (int32 [B]) and the past length (int64 [1])."""
        ids = next(v for v in graph.inputs if v.name == self.input_ids)
        mask = next(v for v in graph.inputs if v.name == self.attention_mask)
        nodes: list[ir.Node] = []

        def add(op: str, inputs: list, **attrs: Any) -> ir.Value:
            node = ir.node(op, inputs, attributes=attrs or None, name=f"kv_{op.lower()}_{len(nodes)}")
            nodes.append(node)
            return node.outputs[0]

        one_node, one = _const("kv_one_i32", np.array(1, np.int32))
        nodes.append(one_node)
        total_1d = add("Shape", [mask], start=1, end=2)
        seq_1d = add("Shape", [ids], start=1, end=2)
        batch_1d = add("Shape", [ids], start=0, end=1)
        past_1d = add("Sub", [total_1d, seq_1d])
        total = add("Cast", [add("Squeeze", [total_1d])], to=ir.DataType.INT32)
        seqlens = add("Expand", [add("Sub", [total, one]), batch_1d])
        return nodes, {"total": total, "seqlens_k": seqlens, "past_1d": past_1d, "batch_1d": batch_1d}

    @staticmethod
    def _bsd(node_name: str, new_bhsd: ir.Value) -> tuple[list[ir.Node], ir.Value]:
        """``(B, H, S, D)`` new keys/values to GroupQueryAttention's ``(B, S, H * D)``."""
        shape_node, shape = _const(f"{node_name}_bsd_shape", np.array([0, 0, -1], np.int64))
        transpose = ir.node("Transpose", [new_bhsd], attributes={"perm": [0, 2, 1, 3]}, name=f"{node_name}_bshd")
        reshape = ir.node("Reshape", [transpose.outputs[0], shape], name=f"{node_name}_bsd")
        return [shape_node, transpose, reshape], reshape.outputs[0]

    @staticmethod
    def _bias(mask: ir.Value | None) -> ir.Value | None:
        """The model's additive mask before it was broadcast over the heads."""
        if mask is None:
            return None
        producer = mask.producer()
        if producer is not None and producer.op_type == "Expand":
            source = producer.inputs[0]
            dims = source.shape.dims if source is not None and source.shape is not None else None
            if dims is not None and len(dims) == 4 and dims[1] == 1:
                return source
        return mask

    def apply(self, model: ir.Model) -> dict[str, Any]:
        graph = model.graph
        names = {v.name for v in graph.inputs}
        if self.input_ids not in names or self.attention_mask not in names:
            return {"gqa": 0, "refused": f"no '{self.input_ids}' / '{self.attention_mask}' graph input"}
        matches, reason = self._matches(graph)
        if reason is not None or not matches:
            return {"gqa": 0, "refused": reason or "no MultiHeadAttention over a KV cache"}
        fused_pasts = {id(past) for m in matches for past in m.pasts()}
        pasts = [v for v in graph.inputs if id(v) in fused_pasts]
        readers = {id(node) for m in matches for node in m.readers()}
        shape_reads = []
        for past in pasts:
            for user, _ in past.uses():
                if user.op_type == "Shape" and user.domain == "":
                    shape_reads.append((user, past))
                elif id(user) not in readers:
                    return {"gqa": 0, "refused": f"{past.name} is read by {user.op_type} '{user.name}'"}
        for past in pasts:
            dims = past.shape.dims if past.shape is not None else ()
            if len(dims) != 4 or not isinstance(dims[1], int) or not isinstance(dims[3], int):
                return {"gqa": 0, "refused": f"{past.name} has no static (heads, head_dim): {past.shape}"}

        first = graph.node(0)
        length_nodes, lengths = self._lengths(graph)
        graph.insert_before(first, length_nodes)
        for index, (read, past) in enumerate(shape_reads):
            self._rewrite_shape_read(graph, read, past, lengths, f"kv_past_shape_{index}")
        for match in matches:
            self._fuse(graph, match, lengths)
        for past in pasts:  # the buffer's length is its capacity, not the past length
            dims = list(past.shape.dims)
            past.shape = ir.Shape([dims[0], dims[1], "kv_capacity", dims[3]])
        return {"gqa": len(matches), "past_shape_reads": len(shape_reads)}

    @staticmethod
    def _rewrite_shape_read(
        graph: ir.Graph, read: ir.Node, past: ir.Value, lengths: dict[str, ir.Value], base: str
    ) -> None:
        """``Shape(past)[start:end]`` from (B, kv heads, T - seq, head_dim) without reading the buffer."""
        dims = past.shape.dims
        heads_node, heads = _const(f"{base}_kv_heads", np.array([dims[1]], np.int64))
        dim_node, head_dim = _const(f"{base}_head_dim", np.array([dims[3]], np.int64))
        full = ir.node("Concat", [lengths["batch_1d"], heads, lengths["past_1d"], head_dim], attributes={"axis": 0},
                       name=f"{base}_past_shape")  # fmt: skip
        start = read.attributes.get_int("start", 0)
        end = read.attributes.get_int("end", 4)
        starts_node, starts = _const(f"{base}_start", np.array([start], np.int64))
        ends_node, ends = _const(f"{base}_end", np.array([end], np.int64))
        cut = ir.node("Slice", [full.outputs[0], starts, ends], name=f"{base}_past_dims")
        new_nodes = [heads_node, dim_node, full, starts_node, ends_node, cut]
        ir.convenience.replace_nodes_and_values(graph, read, [read], new_nodes, [read.outputs[0]], [cut.outputs[0]])

    def _fuse(self, graph: ir.Graph, match: _Match, lengths: dict[str, ir.Value]) -> None:
        attention = match.attention
        past_key, past_value = match.pasts()
        base = attention.name or past_key.name
        inputs = list(attention.inputs) + [None] * (8 - len(attention.inputs))
        if match.own_past:  # key and value are already the new positions in (B, S, kv heads * D)
            layout_nodes, key, value = [], inputs[1], inputs[2]
        else:
            key_nodes, key = self._bsd(f"{base}_key", match.key_concat.inputs[1])
            value_nodes, value = self._bsd(f"{base}_value", match.value_concat.inputs[1])
            layout_nodes = [*key_nodes, *value_nodes]
        attrs: dict[str, Any] = {
            "num_heads": attention.attributes.get_int("num_heads"),
            "kv_num_heads": past_key.shape.dims[1],
            "do_rotary": 0,
        }
        scale = attention.attributes.get_float("scale", None)
        if scale is not None:
            attrs["scale"] = scale
        gqa = ir.node(
            "GroupQueryAttention",
            [inputs[0], key, value, past_key, past_value, lengths["seqlens_k"], lengths["total"],
             None, None, None, self._bias(inputs[5])],
            attributes=attrs, domain="com.microsoft", num_outputs=3, name=f"{base}_gqa",
        )  # fmt: skip
        graph.insert_before(attention, [*layout_nodes, gqa])
        out, present_key, present_value = gqa.outputs
        ir.convenience.replace_all_uses_with(attention.outputs[0], out)
        for old, present in zip(match.presents(), (present_key, present_value)):
            index = next(i for i, v in enumerate(graph.outputs) if v is old)
            name, dims = old.name, list(old.shape.dims) if old.shape is not None else None
            old.name = None
            present.name = name
            present.type = old.type
            if dims is not None and len(dims) == 4:
                present.shape = ir.Shape([dims[0], dims[1], "kv_capacity", dims[3]])
            graph.outputs[index] = present
        graph.remove(attention, safe=True)
