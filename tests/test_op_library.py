"""The op library: FLOPs formulas, entries for every zoo op, live support columns, ``adapter ops``."""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest
from adapter.op_library import OPS, lookup, model_cost, node_cost
from adapter.op_library.coverage import ZOO_MODELS, coverage, live_support, zoo_graphs


def _value(shape, dtype="FLOAT", name=None):
    return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType[dtype]))


def _node(op_type, inputs, out_shape, domain="", **attrs):
    node = ir.node(op_type, inputs, attributes=attrs, domain=domain)
    node.outputs[0].shape = ir.Shape(out_shape)
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    return node


@pytest.fixture(scope="module")
def data():
    """Coverage over the whole zoo (exports each model once per test session)."""
    return coverage()


def test_matmul_flops_by_hand():
    node = _node("MatMul", [_value((2, 3, 4)), _value((4, 5))], (2, 3, 5))
    assert node_cost(node).flops == 2 * (2 * 3 * 5) * 4  # 240
    # bytes: inputs + output, fp32
    assert node_cost(node).bytes == 4 * (24 + 20 + 30)


def test_gemm_flops_by_hand():
    plain = _node("Gemm", [_value((3, 4)), _value((4, 5)), _value((5,))], (3, 5))
    assert node_cost(plain).flops == 2 * 3 * 5 * 4 + 3 * 5  # 135: MACs plus the bias add
    transposed = _node("Gemm", [_value((3, 4)), _value((5, 4))], (3, 5), transB=1)
    assert node_cost(transposed).flops == 120


def test_conv_flops_by_hand():
    conv = _node("Conv", [_value((1, 3, 8, 8)), _value((16, 3, 3, 3)), _value((16,))], (1, 16, 8, 8), pads=[1, 1, 1, 1])
    assert node_cost(conv).flops == 2 * (16 * 8 * 8) * (3 * 3 * 3) + 16 * 8 * 8  # 56320
    depthwise = _node("Conv", [_value((1, 8, 8, 8)), _value((8, 1, 3, 3))], (1, 8, 8, 8), group=8, pads=[1, 1, 1, 1])
    assert node_cost(depthwise).flops == 2 * 512 * 9  # 9216


def test_attention_flops_by_hand():
    x, w, b = _value((1, 4, 8)), _value((8, 24)), _value((24,))
    node = _node("Attention", [x, w, b], (1, 4, 8), domain="com.microsoft", num_heads=2)
    projection = 2 * 1 * 4 * 8 * 24 + 4 * 24  # input·W_qkv + bias
    scores = 1 * 2 * 4 * 4  # batch·heads·S·L
    assert node_cost(node).flops == projection + 2 * scores * 4 + 2 * scores * 4 + 8 * scores  # 2400
    mha = _node(
        "MultiHeadAttention",
        [_value((1, 4, 8)), _value((1, 6, 8)), _value((1, 6, 8))],
        (1, 4, 8),
        domain="com.microsoft",
        num_heads=2,
    )
    scores = 1 * 2 * 4 * 6
    assert node_cost(mha).flops == 2 * scores * 4 * 2 + 8 * scores


def test_symbolic_dims_resolve_from_size_map():
    node = _node("MatMul", [_value((ir.SymbolicDim("batch"), ir.SymbolicDim("seq"), 4)), _value((4, 5))], (1, 1, 5))
    node.outputs[0].shape = ir.Shape([ir.SymbolicDim("batch"), ir.SymbolicDim("seq"), 5])
    assert node_cost(node, {"batch": 2, "seq": 3}).flops == 2 * 2 * 3 * 5 * 4
    assert node_cost(node).bytes is None  # unresolved without sizes


def test_every_zoo_op_has_an_entry():
    missing = {
        f"{n.domain}::{n.op_type}" if n.domain else n.op_type
        for per_model in zoo_graphs().values()
        for model in per_model.values()
        for n in model.graph.all_nodes()
        if lookup(n.op_type, n.domain) is None
    }
    assert not missing, f"ops with no op-library entry: {sorted(missing)}"


def test_every_entry_is_well_formed():
    for key, entry in OPS.items():
        assert entry.precisions and set(entry.precisions) <= {"fp32", "fp16", "bf16", "int8", "fp8", "int4"}, key
        assert entry.spec.startswith("https://"), key
        assert entry.formula, key


def test_minilm_flops_match_torch_flop_counter():
    """Library total over the exported graph vs FlopCounterMode on eager MiniLM, batch 1, seq 128."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from adapter.zoo import minilm

    module, inputs, _ = minilm()
    feed = {name: torch.ones(1, 128, dtype=torch.int64) for name in inputs}
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(**feed)
    measured = counter.get_total_flops()
    assert 2.7e9 < measured < 3.0e9  # the peer benchmark's 2.87 GFLOP
    graphs = zoo_graphs(("minilm",))["minilm"]
    for pipeline in ("canonicalize", "fusion-ort", "fusion-standard"):
        cost = model_cost(graphs[pipeline], {"batch": 1, "seq": 128})
        assert not cost["unknown_ops"], cost["unknown_ops"]
        assert abs(cost["flops"] - measured) / measured < 0.05, (pipeline, cost["flops"], measured)
        assert cost["bytes"] > 4 * 22_000_000  # at least the fp32 weights are read once


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_live_columns_agree_with_supports_on_tiny_graphs(data, backend):
    rows = {r["op"]: r for r in data["ops"]}
    for key in ("MatMul", "Add", "Softmax", "LayerNormalization", "com.microsoft::QAttention", "MatMulInteger", "Erf"):
        ok, reason = live_support(backend, OPS[key])
        assert rows[key]["support"][backend] == ok, (backend, key, reason)
    if backend == "openvino":  # OpenVINO's ONNX frontend has no QAttention: the column must say so
        assert rows["com.microsoft::QAttention"]["support"]["openvino"] is False


def test_coverage_shares(data):
    assert data["models"] == list(ZOO_MODELS)
    assert not data["missing_entries"]
    for name, summary in data["backends"].items():
        for kind in ("distinct_ops", "node_instances"):
            share = summary[kind]
            assert 0 <= share["covered"] <= share["total"] and share["total"] > 0, (name, kind)
    for live in ("onnxruntime", "openvino"):
        assert data["backends"][live]["node_instances"]["share"] >= 0.95, live
    # TensorRT's documented matrix (8.5) lacks LayerNormalization and opset-20 Gelu
    assert {"LayerNormalization", "Gelu"} <= set(data["backends"]["tensorrt"]["missing"])


def test_cli_ops_json_round_trip(cli, data):
    code, out, _ = cli("ops", "--json")
    assert code == 0
    parsed = json.loads(out)
    assert parsed["backends"] == json.loads(json.dumps(data["backends"]))
    assert {r["op"] for r in parsed["ops"]} == set(OPS)
    code, out, _ = cli("ops", "--backend", "tensorrt")
    assert code == 0 and "tensorrt" in out and "Coverage over the zoo" in out
