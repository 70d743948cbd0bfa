"""Canonicalisation: constant folding, identity and dead-code elimination, CSE, shapes.

Each pass wraps the maintained implementation (onnxscript's constant folder, onnx-ir's
common passes) and reports what it changed.
"""

from __future__ import annotations

__all__ = [
    "ConstantFolding",
    "LiftConstants",
    "IdentityElimination",
    "DeadCodeElimination",
    "CommonSubexpressionElimination",
    "ShapeInference",
    "TopologicalSort",
]

from dataclasses import dataclass
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common as common
from adapter.passes.base import CountedPass


@dataclass(frozen=True)
class FoldOptions:
    """Limits of constant folding."""

    input_size_limit: int = 8 * 1024 * 1024
    """Largest constant input (elements) an op may be folded over."""
    output_size_limit: int = 8 * 1024 * 1024
    """Largest folded result (elements) kept as an initializer."""


class ConstantFolding(CountedPass):
    """Evaluate nodes whose inputs are all constant; replace them with initializers."""

    name = "constant-folding"

    def __init__(self, options: FoldOptions | None = None) -> None:
        super().__init__()
        self.options = options or FoldOptions()

    def apply(self, model: ir.Model) -> dict[str, Any]:
        from onnxscript.optimizer._constant_folding import FoldConstantsPass

        before = len(model.graph.initializers)
        nodes = len(list(model.graph.all_nodes()))
        FoldConstantsPass(
            shape_inference=True,
            input_size_limit=self.options.input_size_limit,
            output_size_limit=self.options.output_size_limit,
        )(model)
        common.RemoveUnusedNodesPass()(model)
        return {
            "nodes_folded": max(0, nodes - len(list(model.graph.all_nodes()))),
            "initializers_added": max(0, len(model.graph.initializers) - before),
        }


class LiftConstants(CountedPass):
    """Turn ``Constant`` nodes into graph initializers (one form for every constant)."""

    name = "lift-constants"

    def apply(self, model: ir.Model) -> dict[str, Any]:
        before = sum(1 for n in model.graph if n.op_type == "Constant" and n.domain == "")
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        after = sum(1 for n in model.graph if n.op_type == "Constant" and n.domain == "")
        return {"constants_lifted": before - after}


class IdentityElimination(CountedPass):
    """Remove ``Identity`` nodes, rewiring their consumers to the input."""

    name = "identity-elimination"

    def apply(self, model: ir.Model) -> dict[str, Any]:
        before = sum(1 for n in model.graph.all_nodes() if n.op_type == "Identity" and n.domain == "")
        common.IdentityEliminationPass()(model)
        after = sum(1 for n in model.graph.all_nodes() if n.op_type == "Identity" and n.domain == "")
        return {"identities_removed": before - after}


class DeadCodeElimination(CountedPass):
    """Remove nodes, initializers, functions and opset imports nothing uses."""

    name = "dead-code-elimination"

    def apply(self, model: ir.Model) -> dict[str, Any]:
        nodes = len(list(model.graph.all_nodes()))
        inits = len(model.graph.initializers)
        functions = len(model.functions)
        common.RemoveUnusedNodesPass()(model)
        common.RemoveUnusedFunctionsPass()(model)
        common.RemoveUnusedOpsetsPass()(model)
        return {
            "nodes_removed": nodes - len(list(model.graph.all_nodes())),
            "initializers_removed": inits - len(model.graph.initializers),
            "functions_removed": functions - len(model.functions),
        }


class CommonSubexpressionElimination(CountedPass):
    """Merge nodes computing the same op on the same inputs with the same attributes."""

    name = "cse"

    def apply(self, model: ir.Model) -> dict[str, Any]:
        nodes = len(list(model.graph.all_nodes()))
        common.CommonSubexpressionEliminationPass()(model)
        return {"nodes_merged": nodes - len(list(model.graph.all_nodes()))}


class ShapeInference(CountedPass):
    """Run ONNX shape inference; count values whose type or shape became known."""

    name = "shape-inference"

    def apply(self, model: ir.Model) -> dict[str, Any]:
        def unknown() -> int:
            return sum(1 for n in model.graph.all_nodes() for v in n.outputs if v.shape is None or v.dtype is None)

        before = unknown()
        common.ShapeInferencePass(strict_mode=False)(model)
        return {"shapes_inferred": max(0, before - unknown())}


class TopologicalSort(CountedPass):
    """Sort nodes so every producer precedes its consumers."""

    name = "topological-sort"

    def apply(self, model: ir.Model) -> dict[str, Any]:
        order = [id(n) for n in model.graph]
        common.TopologicalSortPass()(model)
        return {"nodes_moved": sum(a != id(b) for a, b in zip(order, model.graph))}
