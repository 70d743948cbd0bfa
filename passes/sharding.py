"""Tensor- and pipeline-parallel passes: one ONNX graph per rank, cut into segments at collective points.

Tensor parallelism is found in the exported graph (:mod:`adapter.passes.tensor_parallel`);
its collectives are nodes of the ``adapter.dist`` domain: ``AllReduce`` and ``AllGather``.

Pipeline parallelism cuts each rank graph, in topological order, into stages of balanced
cost (the op library's FLOPs at the example shapes); every value a later stage needs is sent
on explicitly. Each stage is then split at its collective nodes into segments;
``adapter.runtime.shard`` compiles each with a backend and writes the sharded artifact, which
``adapter.runtime.worker`` runs under ``torchrun``.
"""

from __future__ import annotations

__all__ = [
    "DOMAIN",
    "ShardSpec",
    "stage_bounds",
    "weight_costs",
    "split_rank",
    "consumers_after",
    "segment_model",
]

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from adapter.core.errors import AdapterError
from adapter.op_library import node_cost

DOMAIN = "adapter.dist"
"""Domain of the collective nodes the tensor-parallel export writes."""
COLLECTIVES = {"AllReduce": "all_reduce", "AllGather": "all_gather"}
SHARDED_ATOL = 1e-5
"""Largest difference allowed between the sharded run and the unsharded engine (FP32)."""
UNSHARDED = "unsharded"
"""Folder of the whole model's engine inside a sharded artifact (what the ranks must reproduce)."""


# --------------------------------------------------------------------------- stages and segments


def weight_costs(model: ir.Model) -> list[float]:
    """Per node: the bytes of the constant tensors it reads (a decode step reads every weight once)."""
    return [
        float(sum(v.const_value.nbytes for v in node.inputs if v is not None and v.const_value is not None))
        for node in model.graph
    ]


def stage_bounds(model: ir.Model, pp: int, sizes: dict[str, int], costs: list[float] | None = None) -> list[int]:
    """Node indices where stages 1..pp-1 start, balancing ``costs`` per node (default: the op
    library's FLOPs at ``sizes``, bytes when no FLOPs)."""
    nodes = list(model.graph)
    if pp > max(1, len(nodes)):
        raise AdapterError(f"{pp} pipeline stages for a graph of {len(nodes)} nodes.")
    if costs is not None:
        return _bounds(np.cumsum(costs), pp, len(nodes))
    costs = []
    for node in nodes:
        try:
            cost = node_cost(node, sizes)
            costs.append(float(cost.flops or 0) + 1e-3 * float(cost.bytes or 0))
        except KeyError:
            costs.append(0.0)
    return _bounds(np.cumsum(costs), pp, len(nodes))


def _bounds(cumulative: np.ndarray, pp: int, count: int) -> list[int]:
    total = cumulative[-1] if len(cumulative) else 0.0
    bounds: list[int] = []
    for stage in range(1, pp):
        index = int(np.searchsorted(cumulative, total * stage / pp)) + 1
        index = min(max(index, (bounds[-1] + 1) if bounds else 1), count - (pp - stage))
        bounds.append(index)
    return bounds


@dataclass
class ShardSpec:
    """One rank's part: its stage's nodes split into steps, and what crosses the stage boundary."""

    rank: int
    stage: int
    tp_rank: int
    steps: list[dict[str, Any]] = field(default_factory=list)
    recv: list[str] = field(default_factory=list)
    send: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def consumers_after(model: ir.Model) -> dict[str, int]:
    """For each value name: the index of the last node that reads it (graph outputs: infinity)."""
    last: dict[str, int] = {}
    for index, node in enumerate(model.graph):
        for value in node.inputs:
            if value is not None:
                last[value.name] = index
    for value in model.graph.outputs:
        last[value.name] = 1 << 60
    return last


def split_rank(
    model: ir.Model, bounds: list[int], inputs_everywhere: bool = False
) -> list[tuple[list[tuple[str, list[int]]], list[str], list[str]]]:
    """Per stage: its steps as (kind, node indices), the values it receives and the values it sends on.

    kind is ``segment`` (run by an engine) or a collective op name; values received by stage s
    are every graph input or earlier-produced value read at stage s or later. With
    ``inputs_everywhere`` (generation: every stage knows the step's ids, mask and positions and
    holds its own layers' cache) graph inputs are given to every stage, never sent.
    """
    nodes = list(model.graph)
    starts = [0, *bounds]
    ends = [*bounds, len(nodes)]
    produced_at: dict[str, int] = {}
    for value in model.graph.inputs:
        produced_at[value.name] = -1
    for index, node in enumerate(nodes):
        for value in node.outputs:
            produced_at[value.name] = index
    last = consumers_after(model)
    if inputs_everywhere:  # a graph output (a present key or value) stays with the stage that makes it
        outputs = {v.name for v in model.graph.outputs}
        read = {v.name: i for i, n in enumerate(nodes) for v in n.inputs if v is not None}
        last = {name: (read.get(name, -1) if name in outputs else at) for name, at in last.items()}
    initializers = set(model.graph.initializers)
    stages = []
    for start, end in zip(starts, ends):
        steps: list[tuple[str, list[int]]] = []
        current: list[int] = []
        for index in range(start, end):
            node = nodes[index]
            if node.domain == DOMAIN:
                if current:
                    steps.append(("segment", current))
                    current = []
                steps.append((node.op_type, [index]))
            else:
                current.append(index)
        if current:
            steps.append(("segment", current))
        floor = 0 if inputs_everywhere else -1
        live_in = sorted(
            name
            for name, at in produced_at.items()
            if floor <= at < start and name not in initializers and last.get(name, -1) >= start
        )
        live_out = sorted(
            name
            for name, at in produced_at.items()
            if floor <= at < end and name not in initializers and last.get(name, -1) >= end
        )
        stages.append((steps, live_in if start > 0 else [], live_out if end < len(nodes) else []))
    return stages


def segment_model(model: ir.Model, indices: list[int], needed_after: set[str]) -> ir.Model:
    """The nodes at ``indices`` as a model of their own: inputs are what they read from outside.

    Built in ``onnx_ir`` with the same tensor objects as ``model`` (nothing is serialized or
    copied: weights that are read lazily from a checkpoint stay unread until the segment is
    saved). Graphs with subgraphs (If/Loop bodies) go through ONNX's extractor instead.
    """
    nodes = list(model.graph)
    chosen = [nodes[i] for i in indices]
    if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for n in chosen
           for attr in n.attributes.values()):  # fmt: skip
        return _extracted_segment(model, chosen, needed_after)
    values: dict[str, ir.Value] = {}
    inputs: list[ir.Value] = []
    initializers: list[ir.Value] = []

    def copy_of(value: ir.Value) -> ir.Value:
        return ir.Value(name=value.name, shape=value.shape, type=value.type, const_value=value.const_value)

    new_nodes = []
    for node in chosen:
        ins: list[ir.Value | None] = []
        for value in node.inputs:
            if value is None:
                ins.append(None)
                continue
            if value.name not in values:
                values[value.name] = copy_of(value)
                (initializers if value.is_initializer() else inputs).append(values[value.name])
            ins.append(values[value.name])
        outs = [copy_of(v) for v in node.outputs]
        values.update({v.name: v for v in outs})
        clone = ir.Node(node.domain, node.op_type, ins, attributes=list(node.attributes.values()), outputs=outs,
                        name=node.name, overload=node.overload, version=node.version)  # fmt: skip
        clone.metadata_props.update(node.metadata_props)
        new_nodes.append(clone)
    outputs = [values[v.name] for n in chosen for v in n.outputs if v.name in needed_after]
    opsets = {k: v for k, v in model.opset_imports.items() if k != DOMAIN}
    graph = ir.Graph(inputs, outputs, nodes=new_nodes, initializers=initializers, opset_imports=opsets,
                     name=model.graph.name)  # fmt: skip
    return ir.Model(graph, ir_version=model.ir_version, producer_name=model.producer_name)


def _extracted_segment(model: ir.Model, chosen: list[ir.Node], needed_after: set[str]) -> ir.Model:
    import onnx
    import onnx.utils

    produced = {v.name for n in chosen for v in n.outputs}
    inputs: list[str] = []
    for node in chosen:
        for value in node.inputs:
            if value is None or value.name in produced or value.is_initializer() or value.name in inputs:
                continue
            inputs.append(value.name)
    outputs = [v.name for n in chosen for v in n.outputs if v.name in needed_after]
    proto = ir.serde.serialize_model(model)
    extracted = onnx.utils.Extractor(proto).extract_model(inputs, outputs)
    segment = ir.serde.deserialize_model(extracted)
    segment.opset_imports.pop(DOMAIN, None)  # collectives run between segments, never inside one
    return segment
