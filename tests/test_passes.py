"""Canonicalisation passes, each tested three ways (CONVENTIONS.md): op types after the
pass, numerical equality with the graph before it (through ONNX Runtime, fresh random
inputs), and a case where it must not fire."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from adapter.core.errors import PassFailedError
from adapter.passes import (
    CommonSubexpressionElimination,
    ConstantFolding,
    DeadCodeElimination,
    IdentityElimination,
    LiftConstants,
    ShapeInference,
    TopologicalSort,
    build_pipeline,
    run_pipeline,
)

RNG = np.random.default_rng(7)


def _model(nodes, inputs=("x",), outputs=("y",), initializers=()) -> ir.Model:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3, 4]) for n in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        list(initializers),
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    return ir.serde.deserialize_model(proto)


def _run(model: ir.Model, feed):
    session = ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, feed)


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def _check(make, pass_, expected_ops, *, fires=True):
    """Apply the pass to a fresh model; compare op types and numerics with the original."""
    before = make()
    after = make()
    feed = {v.name: RNG.standard_normal((3, 4)).astype(np.float32) for v in before.graph.inputs}
    reference = _run(before, feed)
    result = pass_(after)
    assert result.modified is fires
    assert pass_.record.modified is fires
    assert _ops(after) == expected_ops
    for got, want in zip(_run(after, feed), reference):
        np.testing.assert_allclose(got, want, rtol=1.3e-6, atol=1e-6)
    return pass_.record


def _const(name, value):
    return helper.make_node(
        "Constant", [], [name], value=helper.make_tensor(name + "_t", TensorProto.FLOAT, [], [value])
    )


def test_constant_folding_fires():
    make = lambda: _model(
        [
            _const("a", 2.0),
            _const("b", 3.0),
            helper.make_node("Mul", ["a", "b"], ["c"]),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ]
    )
    record = _check(make, ConstantFolding(), ["Add"])
    assert record.counters["nodes_folded"] == 3


def test_constant_folding_leaves_dynamic_math():
    make = lambda: _model([helper.make_node("Mul", ["x", "z"], ["y"])], inputs=("x", "z"))
    _check(make, ConstantFolding(), ["Mul"], fires=False)


def test_lift_constants_fires():
    make = lambda: _model([_const("a", 2.0), helper.make_node("Mul", ["x", "a"], ["y"])])
    record = _check(make, LiftConstants(), ["Mul"])
    assert record.counters["constants_lifted"] == 1


def test_lift_constants_without_constants():
    make = lambda: _model([helper.make_node("Relu", ["x"], ["y"])])
    _check(make, LiftConstants(), ["Relu"], fires=False)


def test_identity_elimination_fires():
    make = lambda: _model(
        [
            helper.make_node("Identity", ["x"], ["a"]),
            helper.make_node("Relu", ["a"], ["b"]),
            helper.make_node("Identity", ["b"], ["y"]),
        ]
    )
    record = _check(make, IdentityElimination(), ["Relu"])
    assert record.counters["identities_removed"] == 2


def test_identity_between_graph_input_and_output_is_kept():
    make = lambda: _model([helper.make_node("Identity", ["x"], ["y"])])
    _check(make, IdentityElimination(), ["Identity"], fires=False)


def test_identity_between_two_graph_outputs_keeps_both_outputs():
    """onnx-ir 1.1 merges ``b = Identity(a)`` into ``a`` when both are graph outputs; the pass
    puts an Identity back so each output keeps its own value and name (ONNX's test_scan_sum)."""
    make = lambda: _model(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Identity", ["a"], ["b"])], outputs=("a", "b")
    )
    after = make()
    record = _check(make, IdentityElimination(), ["Relu", "Identity"], fires=True)
    IdentityElimination()(after)
    assert [v.name for v in after.graph.outputs] == ["a", "b"]
    assert len({id(v) for v in after.graph.outputs}) == 2
    assert record.counters["identities_kept_for_outputs"] == 1


def test_cse_merges_duplicates():
    make = lambda: _model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Relu", ["x"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ]
    )
    record = _check(make, CommonSubexpressionElimination(), ["Relu", "Add"])
    assert record.counters["nodes_merged"] == 1


def test_cse_keeps_different_inputs():
    make = lambda: _model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Relu", ["z"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ],
        inputs=("x", "z"),
    )
    _check(make, CommonSubexpressionElimination(), ["Relu", "Relu", "Add"], fires=False)


def test_dead_code_elimination_fires():
    unused = helper.make_tensor("w", TensorProto.FLOAT, [4], [1.0] * 4)
    make = lambda: _model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Add", ["x", "w"], ["dead"])], initializers=[unused]
    )
    record = _check(make, DeadCodeElimination(), ["Relu"])
    assert record.counters == {"nodes_removed": 1, "initializers_removed": 1, "functions_removed": 0}


def test_dead_code_elimination_keeps_live_nodes():
    make = lambda: _model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"])])
    _check(make, DeadCodeElimination(), ["Relu", "Neg"], fires=False)


def test_shape_inference_fills_shapes():
    make = lambda: _model(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Transpose", ["a"], ["y"], perm=[1, 0])]
    )
    model = make()
    shape_pass = ShapeInference()
    record = _check(make, shape_pass, ["Relu", "Transpose"])
    assert record.counters["shapes_inferred"] >= 1
    shape_pass(model)
    assert list(model.graph.outputs[0].shape) == [4, 3]


def test_shape_inference_on_a_typed_graph_changes_nothing():
    def make():
        model = _model([helper.make_node("Relu", ["x"], ["y"])])
        ShapeInference()(model)
        return model

    _check(make, ShapeInference(), ["Relu"], fires=False)


def _unsorted():
    proto = helper.make_model(
        helper.make_graph(
            [helper.make_node("Neg", ["a"], ["y"]), helper.make_node("Relu", ["x"], ["a"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        ),
        opset_imports=[helper.make_opsetid("", 20)],
    )
    return ir.serde.deserialize_model(proto)


def test_topological_sort_orders_producers_first():
    model = _unsorted()
    TopologicalSort()(model)
    assert _ops(model) == ["Relu", "Neg"]
    feed = {"x": RNG.standard_normal((3, 4)).astype(np.float32)}
    np.testing.assert_allclose(_run(model, feed)[0], -np.maximum(feed["x"], 0))


def test_topological_sort_keeps_sorted_graph():
    make = lambda: _model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"])])
    _check(make, TopologicalSort(), ["Relu", "Neg"], fires=False)


def test_canonicalize_pipeline_records_every_pass():
    model = _model(
        [_const("a", 2.0), helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Mul", ["i", "a"], ["y"])]
    )
    records = run_pipeline(model, build_pipeline("canonicalize"))
    assert [r.name for r in records] == [
        "constant-folding",
        "lift-constants",
        "identity-elimination",
        "cse",
        "dead-code-elimination",
        "shape-inference",
        "topological-sort",
    ]
    assert _ops(model) == ["Mul"]
    feed = {"x": RNG.standard_normal((3, 4)).astype(np.float32)}
    np.testing.assert_allclose(_run(model, feed)[0], feed["x"] * 2, rtol=1e-6)


def test_unknown_pass_name():
    with pytest.raises(PassFailedError, match="Unknown pass or pipeline 'fuse-everything'"):
        build_pipeline(["fuse-everything"])
