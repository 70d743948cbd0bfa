"""What the sharding planner reads from a graph: blocks, heads, vocabulary, splits, weights.

:func:`analyze` groups a canonical onnx-ir graph's nodes into transformer blocks (by their
``adapter.module`` paths) and marks, by data flow, which nodes Megatron-style tensor
parallelism splits and where an all-reduce or all-gather follows (see
:mod:`adapter.passes.sharding_plan` for the rules).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from adapter.op_library import node_cost
from adapter.op_library._schema import tensor_of

FLOATS = {"FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE"}
"""Element types whose weights and activations scale with the precision."""
PRE, POST = -1, 1 << 30
"""Part of a node before the first block (embedding) and after the last (head)."""
_NORMS = {"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "SkipLayerNormalization"}
_LAYER = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")

# --------------------------------------------------------------------------- graph facts


@dataclass
class ModelFacts:
    """What the planner knows about a graph (sizes in bytes at the graph's own dtypes)."""

    layers: list[str]
    """Module path of each transformer block, in order."""
    heads: int
    hidden: int
    heads_source: str
    """Where ``heads`` came from: ``graph``, ``argument`` or ``heuristic``."""
    vocab: int | None
    embedding_bytes: int
    """The vocabulary table (split by vocabulary when tp > 1)."""
    lm_head: bool
    weight_bytes: int
    layer_weight_bytes: list[int]
    unknown_ops: list[str]
    nodes: list[Any] = field(repr=False, default_factory=list)
    part: list[int] = field(repr=False, default_factory=list)
    """Per node: block index, or PRE / POST."""
    split: list[bool] = field(repr=False, default_factory=list)
    reduce_after: list[bool] = field(repr=False, default_factory=list)
    """Per node: row-parallel (or vocabulary embedding): all-reduce of its output when tp > 1."""
    gather_after: list[bool] = field(repr=False, default_factory=list)
    weights: list[tuple[int, int, bool, bool]] = field(repr=False, default_factory=list)
    """(node index of first use, bytes, split by tp, floating) per initializer."""
    weight_inputs: list[int] = field(repr=False, default_factory=list)
    """Per node: bytes of its initializer inputs (fp32 as stored)."""
    sharded_values: set[int] = field(repr=False, default_factory=set)

    def summary(self) -> dict[str, Any]:
        return {
            "layers": len(self.layers),
            "layer_paths": [self.layers[0], self.layers[-1]] if self.layers else [],
            "heads": self.heads,
            "heads_source": self.heads_source,
            "hidden": self.hidden,
            "vocab": self.vocab,
            "embedding_bytes": self.embedding_bytes,
            "lm_head": self.lm_head,
            "weight_bytes": self.weight_bytes,
            "unknown_ops": self.unknown_ops,
        }


def _const(value: Any) -> bool:
    return value is not None and (value.is_initializer() or value.const_value is not None)


def nbytes(value: Any, sizes: dict[str, int] | None = None) -> int:
    tensor = tensor_of(value, sizes or {})
    return tensor.nbytes if tensor is not None else 0


def _block_of(path: str) -> tuple[str, int] | None:
    match = _LAYER.match(path)
    return (match.group(1), int(match.group(2))) if match else None


def _weight_producer(value: Any) -> Any:
    """The Transpose/Cast that turns a constant into this value (a tied or unfolded weight), else None."""
    node = value.producer() if value is not None else None
    if node is not None and node.op_type in ("Transpose", "Cast") and _const(node.inputs[0]):
        return node
    return None


def _is_weight_matmul(node: Any) -> bool:
    if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return False
    weight = node.inputs[1]
    if not (_const(weight) or _weight_producer(weight) is not None):
        return False
    return weight.shape is not None and len(weight.shape) == 2


def analyze(model: Any, heads: int | None = None) -> ModelFacts:
    """Read blocks, heads, hidden size, vocabulary and weights from a canonical onnx-ir model."""
    nodes = list(model.graph)
    paths = [node.metadata_props.get("adapter.module", "") for node in nodes]
    blocks = [_block_of(p) for p in paths]
    counts: dict[str, set[int]] = {}
    for block in filter(None, blocks):
        counts.setdefault(block[0], set()).add(block[1])
    container = max(counts, key=lambda k: (len(counts[k]), -len(k)), default=None)
    indices = sorted(counts.get(container, ()))
    layers = [f"{container}.{i}" for i in indices]
    rank = {i: n for n, i in enumerate(indices)}
    part = [rank[b[1]] if b and b[0] == container else None for b in blocks]
    first = next((i for i, p in enumerate(part) if p is not None), len(nodes))
    last = max((i for i, p in enumerate(part) if p is not None), default=-1)
    current = PRE
    for i in range(len(nodes)):  # nodes without a block: before the first, after the last, or the block before
        if part[i] is None:
            part[i] = PRE if i < first else POST if i > last else current
        current = part[i]
    if not layers:  # no block structure (a graph without module metadata): one block, pp = 1 only
        layers, part = ["<graph>"], [0] * len(nodes)

    inits: dict[int, tuple[int, int, bool]] = {}  # id(value) -> (first user, bytes, floating)
    weight_inputs = [0] * len(nodes)
    for i, node in enumerate(nodes):
        for value in node.inputs:
            if _const(value):
                weight_inputs[i] += nbytes(value)
                if id(value) not in inits:
                    floating = getattr(value.dtype, "name", "") in FLOATS
                    inits[id(value)] = (i, nbytes(value), floating)

    # embedding table: the largest 2-D constant a Gather in the embedding part reads
    embed_node, embed_bytes, vocab, hidden = None, 0, None, 0
    for i, node in enumerate(nodes):
        if part[i] == PRE and node.op_type == "Gather" and _const(node.inputs[0]):
            shape = node.inputs[0].shape
            if shape is not None and len(shape) == 2 and nbytes(node.inputs[0]) > embed_bytes:
                embed_node, embed_bytes, vocab, hidden = i, nbytes(node.inputs[0]), int(shape[0]), int(shape[1])

    split = [False] * len(nodes)
    reduce_after = [False] * len(nodes)
    gather_after = [False] * len(nodes)
    sharded: set[int] = set()
    position = {id(n): i for i, n in enumerate(nodes)}

    def split_weight(node: Any) -> None:
        producer = _weight_producer(node.inputs[1])
        if producer is not None and id(producer) in position:  # the weight's Transpose is split with it
            split[position[id(producer)]] = True
            sharded.update(id(v) for v in producer.outputs)

    for i, node in enumerate(nodes):
        if part[i] in (PRE, POST):
            continue
        fed_sharded = any(v is not None and id(v) in sharded for v in node.inputs if _weight_producer(v) is None)
        if _is_weight_matmul(node):
            split[i] = True
            split_weight(node)
            if fed_sharded:
                reduce_after[i] = True  # row-parallel: partial sums, all-reduced
            else:
                sharded.update(id(v) for v in node.outputs)  # column-parallel
            if not hidden:
                hidden = int(node.inputs[1].shape[0])
        elif fed_sharded and node.op_type not in _NORMS:
            split[i] = True
            sharded.update(id(v) for v in node.outputs)
    lm_head = False
    if vocab is not None:
        split[embed_node] = reduce_after[embed_node] = True
        for i, node in enumerate(nodes):
            if part[i] == POST and _is_weight_matmul(node) and vocab in tuple(node.inputs[1].shape):
                split[i] = gather_after[i] = lm_head = True
                split_weight(node)
                sharded.update(id(v) for v in node.outputs)

    heads_source = "argument"
    if heads is None:
        heads, heads_source = _heads_from_graph(nodes, part, hidden), "graph"
        if heads is None:
            heads, heads_source = max(1, hidden // 64) if hidden % 64 == 0 else 1, "heuristic"
    weights = [(i, size, split[i], floating) for i, size, floating in inits.values()]
    layer_weights = [0] * len(layers)
    for i, size, _, _ in weights:
        if part[i] not in (PRE, POST):
            layer_weights[part[i]] += size
    unknown = set()
    for node in nodes:
        try:
            node_cost(node, {})
        except KeyError as exc:
            unknown.add(str(exc.args[0]))
        except Exception:  # noqa: BLE001 - shapes are resolved later, only unknown ops matter here
            pass
    return ModelFacts(
        layers=layers,
        heads=int(heads),
        hidden=hidden,
        heads_source=heads_source,
        vocab=vocab,
        embedding_bytes=embed_bytes,
        lm_head=lm_head,
        weight_bytes=sum(w[1] for w in weights),
        layer_weight_bytes=layer_weights,
        unknown_ops=sorted(unknown),
        nodes=nodes,
        part=part,
        split=split,
        reduce_after=reduce_after,
        gather_after=gather_after,
        weights=weights,
        weight_inputs=weight_inputs,
        sharded_values=sharded,
    )


def _heads_from_graph(nodes: list[Any], part: list[int], hidden: int) -> int | None:
    """Heads from a block's Reshape to (batch, seq, heads, head_dim) with heads * head_dim == hidden."""
    found: Counter = Counter()
    for i, node in enumerate(nodes):
        if node.op_type != "Reshape" or part[i] in (PRE, POST) or node.outputs[0].shape is None:
            continue
        shape = node.outputs[0].shape
        if len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
            continue
        h, d = int(shape[2]), int(shape[3])
        if h * d == hidden and h > 0:
            found[h] += 1
    return found.most_common(1)[0][0] if found else None
