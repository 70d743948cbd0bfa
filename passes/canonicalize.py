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
        before = len(model.graph.initializers)
        nodes = len(list(model.graph.all_nodes()))
        _fold_pass_class()(
            shape_inference=True,
            input_size_limit=self.options.input_size_limit,
            output_size_limit=self.options.output_size_limit,
        )(model)
        common.RemoveUnusedNodesPass()(model)
        return {
            "nodes_folded": max(0, nodes - len(list(model.graph.all_nodes()))),
            "initializers_added": max(0, len(model.graph.initializers) - before),
        }


def _fold_pass_class() -> type:
    """onnxscript's constant-folding pass, minus its SplitToSequence folder where it crashes.

    onnxscript 0.7.2's ``split_to_sequence`` evaluator reads ``split.ndim`` when ``split``
    is a graph input with a known scalar shape but no value (AttributeError on None; ONNX's
    ``test_split_to_sequence_1``). Such a node has nothing to fold anyway: it is left alone.
    """
    from onnxscript.optimizer._constant_folding import FoldConstantsPass

    class _FoldConstants(FoldConstantsPass):
        def process_node(self, node: ir.Node, is_function: bool):  # type: ignore[override]
            if node.op_type == "SplitToSequence" and node.domain in ("", "ai.onnx"):
                split = node.inputs[1] if len(node.inputs) > 1 else None
                if split is not None and split.const_value is None:
                    return None
            return super().process_node(node, is_function)

    return _FoldConstants


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
        names = {id(g): [v.name for v in g.outputs] for g in model.graphs()}
        common.IdentityEliminationPass()(model)
        restored = sum(_split_repeated_outputs(g, names[id(g)]) for g in model.graphs())
        after = sum(1 for n in model.graph.all_nodes() if n.op_type == "Identity" and n.domain == "")
        return {"identities_removed": before - after, "identities_kept_for_outputs": restored}


def _split_repeated_outputs(graph: ir.Graph, original: list[str | None]) -> int:
    """Give each output slot its own value again, with its original name.

    onnx-ir 1.1's IdentityEliminationPass removes ``b = Identity(a)`` when ``a`` and ``b``
    are both outputs of the same (sub)graph, leaving one value listed twice under the
    second name: ONNX Runtime's Scan then returns garbage (ONNX's ``test_scan_sum``), and a
    main graph loses an output name. An Identity per repeated slot puts it back.
    """
    seen: set[int] = set()
    added = 0
    for index, value in enumerate(list(graph.outputs)):
        if id(value) not in seen:
            seen.add(id(value))
            continue
        node = ir.node("Identity", [value], num_outputs=1)
        copy = node.outputs[0]
        copy.name = original[index] if index < len(original) else None
        copy.dtype, copy.shape, copy.type = value.dtype, value.shape, value.type
        graph.append(node)
        graph.outputs[index] = copy
        added += 1
    if added:  # the first slot of each repeated value takes its own original name back
        taken = {v.name for v in graph.outputs}
        for index, value in enumerate(graph.outputs):
            name = original[index] if index < len(original) else None
            if name and value.name != name and name not in taken and value.producer() is not None:
                value.name = name
    return added


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
        if _sequences_in_control_flow(model):
            # onnx's shape inference types a Loop body's If-produced sequence as a tensor
            # (ONNX's test_loop16_seq_none), which ONNX Runtime then refuses; such graphs keep
            # the types they came with
            return {"shapes_inferred": 0, "skipped": "sequence or optional values inside Loop/Scan/If"}
        common.ShapeInferencePass(strict_mode=False)(model)
        return {"shapes_inferred": max(0, before - unknown())}


_SEQUENCE_OPS = ("Sequence", "SplitToSequence", "ConcatFromSequence", "Optional")


def _sequences_in_control_flow(model: ir.Model) -> bool:
    """Whether a Loop/Scan/If body makes or reads sequence or optional values."""
    for graph in model.graphs():
        if graph is model.graph:
            continue
        for node in graph:
            if node.op_type.startswith(_SEQUENCE_OPS):
                return True
            for value in (*node.inputs, *node.outputs):
                if value is not None and isinstance(value.type, (ir.SequenceType, ir.OptionalType)):
                    return True
    return False


class TopologicalSort(CountedPass):
    """Sort nodes so every producer precedes its consumers."""

    name = "topological-sort"

    def apply(self, model: ir.Model) -> dict[str, Any]:
        order = [id(n) for n in model.graph]
        common.TopologicalSortPass()(model)
        return {"nodes_moved": sum(a != id(b) for a, b in zip(order, model.graph))}
