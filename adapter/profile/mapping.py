"""The profiler's map from backend kernels to the artifact's ONNX nodes, and their costs.

Each backend reports its own kernels; this module finds the ONNX nodes each one ran
(through tensor names, OpenVINO's ``originalLayersNames``, or by module for the MatMuls a
fused kernel leaves out of its name list), fills the gaps left by kernels that name
nothing, and costs node sets with the op library (FLOPs summed; bytes crossing the set's
boundary, views free). Used by :mod:`adapter.profile.profiler`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from adapter.backends.base import module_of
from adapter.backends.profiling import Capture as _Capture
from adapter.backends.profiling import Kernel as _Kernel
from adapter.op_library import node_cost
from adapter.op_library._schema import tensor_of

ROOT_MODULE = "(root)"
"""Module label of nodes that belong to the top-level module itself (pooling, masks)."""

VIEW_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}
"""ONNX ops whose output is their input seen with another shape: ONNX Runtime and OpenVINO
alias it, so no bytes are charged for them (OpenVINO's Reshape kernels and the Convert that
gap filling handed the shape subgraph read up to 87x the memory bandwidth when they were)."""


class _Graph:
    """The artifact's ONNX graph: nodes by name, producers, topological positions, costs."""

    def __init__(self, model, sizes: dict[str, int]) -> None:
        self.model = model
        self.sizes = sizes
        self.nodes = list(model.graph.all_nodes())
        self.by_name = {n.name: n for n in self.nodes if n.name}
        self.position = {n.name: i for i, n in enumerate(self.nodes)}
        self.producer = {v.name: n for n in self.nodes for v in n.outputs if v is not None}

    def cost(self, names: list[str]) -> tuple[int | None, int | None]:
        """Summed FLOPs and boundary bytes of a set of ONNX nodes (None when unknown)."""
        every = [self.by_name[n] for n in names if n in self.by_name]
        if not every:
            return None, None
        nodes = [n for n in every if n.op_type not in VIEW_OPS]
        if not nodes:  # only views: the engines alias them, nothing is computed or moved
            return 0, 0
        flops, known, summed_bytes = 0, len(nodes) < len(every), 0  # views: known, 0 FLOPs
        for node in nodes:
            try:
                cost = node_cost(node, self.sizes)
            except KeyError:
                continue
            known = True
            flops += cost.flops or 0
            summed_bytes += cost.bytes or 0
        inside = {id(n) for n in nodes}
        crossing: dict[str, Any] = {}
        for node in nodes:
            for value in node.inputs:
                if value is not None and (value.producer() is None or id(value.producer()) not in inside):
                    crossing[value.name] = value
            for value in node.outputs:
                if value is None:
                    continue
                outside = any(id(use[0]) not in inside for use in value.uses()) or value.is_graph_output()
                if outside:
                    crossing[value.name] = value
        tensors = [tensor_of(v, self.sizes) for v in crossing.values()]
        boundary = sum(t.nbytes for t in tensors if t is not None) if all(t is not None for t in tensors) else None
        if len(nodes) == 1 or boundary is None:
            boundary = summed_bytes if known else boundary
        return (flops if known else None), boundary

    def module(self, names: list[str]) -> str | None:
        """The module most of the covered work belongs to (by FLOPs, then bytes, then count)."""
        weight: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
        for name in names:
            node = self.by_name.get(name)
            if node is None:
                continue
            flops, nbytes = self.cost([name])
            entry = weight[module_of(node) or ROOT_MODULE]
            entry[0] += flops or 0
            entry[1] += nbytes or 0
            entry[2] += 1
        if not weight:
            return None
        return max(weight.items(), key=lambda kv: kv[1])[0]


def _map_tensors(capture: _Capture, graph: _Graph) -> None:
    """ONNX Runtime: a node kept by name is itself; a fused one covers the ONNX nodes between
    its output tensors and the tensors that still exist in the graph ONNX Runtime ran."""
    structure, boundary = capture.structure, capture.boundary
    taken: set[str] = set()
    for kernel in capture.kernels:
        if kernel.name in graph.by_name:
            kernel.claims = [kernel.name]
            taken.add(kernel.name)
    for kernel in capture.kernels:
        if kernel.name in graph.by_name:
            continue
        _, outputs = structure.get(kernel.name, ([], []))
        todo = [graph.producer[t] for t in outputs if t in graph.producer]
        claims: list[str] = []
        while todo:
            node = todo.pop()
            if node.name in taken:
                continue
            taken.add(node.name)
            claims.append(node.name)
            for value in node.inputs:
                if value is None or value.name in boundary:
                    continue
                producer = graph.producer.get(value.name)
                if producer is not None:
                    todo.append(producer)
        kernel.claims = claims


_MATMUL_KERNELS = {"FullyConnected"}
"""OpenVINO node types built around a MatMul/Gemm of the ONNX graph."""
_MOVEMENT_KERNELS = {"Convert", "Reorder", "Reshape", "Transpose", "Concatenation", "Broadcast"}
"""OpenVINO node types that only move or convert data: never charged FLOPs by gap filling."""
_COMPUTE_KERNELS = {"FullyConnected", "MatMul", "Subgraph", "Convolution", "Gemm"}
"""OpenVINO node types that do matrix products (Subgraph: its fused attention kernels)."""


def _claim_matmuls(capture: _Capture, graph: _Graph) -> None:
    """Give a MatMul-based backend node the MatMul it fused when its name list lost it.

    OpenVINO's FullyConnected for ``MatMul → Add(bias) → Gelu`` lists only the Add and
    the Gelu in ``originalLayersNames``; the MatMul left over would otherwise be handed to
    a neighbouring node (a Convert then "did" 151 MFLOP at 400x the machine's peak).
    """
    claimed = {n for k in capture.kernels for n in k.claims}
    for kernel in capture.kernels:
        if kernel.op_type not in _MATMUL_KERNELS:
            continue
        nodes = [graph.by_name[n] for n in kernel.claims if n in graph.by_name]
        if any(n.op_type in ("MatMul", "Gemm") for n in nodes):
            continue
        for node in sorted(nodes, key=lambda n: graph.position[n.name]):
            producers = [v.producer() for v in node.inputs if v is not None and v.producer() is not None]
            found = [p for p in producers if p.op_type in ("MatMul", "Gemm") and p.name and p.name not in claimed]
            if found:
                kernel.claims = [found[0].name, *kernel.claims]
                claimed.add(found[0].name)
                break
    # Matrix products still unclaimed (attention's Q·Kᵀ inside a Subgraph that names only
    # some of its nodes) go to a compute kernel of the same module, not to whatever
    # backend node happens to sit in the gap around them; so do the transposes of Q and K
    # the Subgraph fused (given to a Convert, 1.5 MB each made it read 119x the bandwidth).
    by_module: dict[str, _Kernel] = {}
    for kernel in capture.kernels:
        if kernel.op_type in _COMPUTE_KERNELS:
            for name in kernel.claims:
                if name in graph.by_name:
                    by_module.setdefault(module_of(graph.by_name[name]), kernel)
    for node in graph.nodes:
        if node.op_type in ("MatMul", "Gemm", "Transpose") and node.name and node.name not in claimed:
            host = by_module.get(module_of(node))
            if host is not None:
                host.claims = [*host.claims, node.name]
                claimed.add(node.name)


def _fill_gaps(capture: _Capture, graph: _Graph, idle: Iterable[str] = ()) -> None:
    """Give ONNX nodes no backend node claims to the unmapped backend nodes that ran between
    the neighbours' ONNX nodes (OpenVINO's MVN for a LayerNormalization, and the like)."""
    claimed = {n for k in capture.kernels for n in k.claims if n in graph.position} | set(idle)
    kernels = capture.kernels
    for kernel in kernels:
        kernel.claims = [n for n in kernel.claims if n in graph.position]
    index = 0
    while index < len(kernels):
        if kernels[index].claims:
            index += 1
            continue
        end = index
        while end < len(kernels) and not kernels[end].claims:
            end += 1
        low = max((graph.position[n] for n in kernels[index - 1].claims), default=-1) if index else -1
        high = (
            min((graph.position[n] for n in kernels[end].claims), default=len(graph.nodes))
            if end < len(kernels)
            else len(graph.nodes)
        )
        free = [n.name for n in graph.nodes[low + 1 : high] if n.name and n.name not in claimed]
        gap = kernels[index:end]
        if not any(k.op_type in _COMPUTE_KERNELS for k in gap):
            # matrix products left over go to the nearest compute kernel, not to a Convert
            heavy = [n for n in free if graph.by_name[n].op_type in ("MatMul", "Gemm")]
            near = [k for k in (kernels[index - 1] if index else None, kernels[end] if end < len(kernels) else None)]
            host = next((k for k in near if k is not None and k.op_type in _COMPUTE_KERNELS), None)
            if heavy and host is not None:
                host.claims = [*host.claims, *heavy]
                claimed.update(heavy)
                free = [n for n in free if n not in heavy]
        for i, kernel in enumerate(gap):  # split the free nodes in order over the gap's kernels
            share = free[i * len(free) // len(gap) : (i + 1) * len(free) // len(gap)]
            if kernel.op_type in _MOVEMENT_KERNELS:  # a Convert or Reorder does no arithmetic
                share = [n for n in share if not graph.cost([n])[0]]
            kernel.claims = share
            claimed.update(share)
        index = end


def _tvm_cost(kernel: _Kernel) -> tuple[int | None, int | None]:
    shapes = kernel.arg_shapes
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int8": 1, "uint8": 1, "bool": 1}
    nbytes = sum(math.prod(s) * itemsize.get(d, 4) for s, d in shapes)
    flops = None
    if ("matmul" in kernel.op_type or "dense" in kernel.op_type) and len(shapes) >= 2 and shapes[0][0]:
        k = shapes[0][0][-1]
        flops = 2 * math.prod(shapes[-1][0]) * k
    return flops, nbytes


# ----------------------------------------------------------------------------- report rows
