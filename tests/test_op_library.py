"""The op library: FLOPs formulas, entries for every zoo op, live support columns, ``adapter ops``."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from adapter.backends.documented import DOCUMENTED, MIGRAPHX, TENSORRT, TVM_DOCUMENTED, tvm_differences, tvm_live
from adapter.converter.coverage import ZOO_MODELS, coverage, documented_answer, live_support, zoo_graphs
from adapter.op_library import OPS, lookup, model_cost, node_cost


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


def test_selecting_ops_read_what_they_return():
    """An embedding lookup reads the rows it gathers, not the table; Slice likewise."""
    indices = ir.Value(name="ids", shape=ir.Shape((2, 128)), type=ir.TensorType(ir.DataType.INT64))
    lookup_node = _node("Gather", [_value((30522, 384)), indices], (2, 128, 384))
    assert node_cost(lookup_node).bytes == 8 * 256 + 2 * 4 * (256 * 384)
    whole = _node("Gather", [_value((4, 384)), indices], (2, 128, 384))  # rows re-read: the table is less
    assert node_cost(whole).bytes == 4 * 4 * 384 + 8 * 256 + 4 * 256 * 384
    cut = _node("Slice", [_value((8, 64))], (8, 16))
    assert node_cost(cut).bytes == 2 * 4 * 8 * 16
    add = _node("Add", [_value((30522, 384)), _value((30522, 384))], (30522, 384))  # not a selecting op
    assert node_cost(add).bytes == 3 * 4 * 30522 * 384


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
        # the fp32 weights are read once, except the 30522 x 384 vocabulary table: its lookup
        # reads the rows it gathers (the whole table was charged before: 47 MB per call)
        assert cost["bytes"] > 4 * (22_000_000 - 30522 * 384)


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
    # each backend is measured on the graph its own module's PASSES produce
    pipelines = {name: s["pipeline"] for name, s in data["backends"].items()}
    assert pipelines == {
        "onnxruntime": "fusion-ort",
        "openvino": "fusion-standard",
        "tvm": "canonicalize",
        "tensorrt": "canonicalize",
        "migraphx": "canonicalize",
        "edge": "fusion-ort",
    }
    # TensorRT 10's matrix takes the canonical transformers (LayerNormalization, Gelu): the 8.5 one did not
    trt = data["backends"]["tensorrt"]
    assert trt["node_instances"]["share"] >= 0.95, trt
    assert not {"LayerNormalization", "Gelu"} & set(trt["missing"])
    rows = {r["op"]: r for r in data["ops"]}
    assert rows["LayerNormalization"]["zoo_instances"] > 0 and rows["LayerNormalization"]["support"]["tensorrt"]
    assert rows["MatMulInteger"]["support"]["tensorrt"] is False
    assert rows["com.microsoft::SkipLayerNormalization"]["support"]["tensorrt"] is False
    # MIGraphX's matrix: Range with computed start/limit/delta is refused (the zoo's position ids)
    mgx = data["backends"]["migraphx"]
    assert mgx["refused_by_condition"].get("Range", 0) > 0 and "Range" in mgx["missing"]
    assert mgx["node_instances"]["covered"] == mgx["node_instances"]["total"] - sum(mgx["missing_nodes"].values())


def test_tensorrt_10_list():
    import onnx

    assert TENSORRT.supports("LayerNormalization") and TENSORRT.supports("Gelu") and TENSORRT.supports("Attention")
    for op in ("MatMulInteger", "DynamicQuantizeLinear", "ConvInteger", "QLinearMatMul", "Unique"):
        assert not TENSORRT.supports(op) and op in TENSORRT.refused, op
    assert not TENSORRT.supports("SkipLayerNormalization", "com.microsoft")
    assert not TENSORRT.ops & TENSORRT.refused
    # every name is an ONNX op, except three experimental ops ONNX has since dropped
    unknown = {op for op in TENSORRT.ops | TENSORRT.refused if not onnx.defs.has(op)}
    assert unknown == {"ImageScaler", "ParametricSoftplus", "ScaledTanh"}
    assert "10.15" in TENSORRT.version and "release/10.15-GA" in TENSORRT.source
    # the backend looks these notes up when it refuses a computed input: they must stay
    for op in ("Slice", "Squeeze", "Unsqueeze", "CumSum", "TopK"):
        assert TENSORRT.notes[op], op
    for doc in (TENSORRT, MIGRAPHX):
        for op, indices in doc.constant_inputs.items():
            assert doc.supports(op) and indices and op in doc.notes, (doc.name, op)


def test_documented_constant_inputs():
    x = _value((2, 4), name="x")
    computed = _value((1,), "INT64", name="axes")
    node = ir.node("ReduceMean", [x, computed])
    ok, why = documented_answer("tensorrt", node)
    assert not ok and "input 1" in why and "initializer" in why
    constant = ir.Value(name="c", const_value=ir.tensor(np.array([1], dtype=np.int64)))
    node = ir.node("ReduceMean", [x, constant])
    assert documented_answer("tensorrt", node) == (True, "")
    # TensorRT 10 takes Slice with computed axes; MIGraphX does not
    starts, ends = (ir.Value(name=n, const_value=ir.tensor(np.array([0], dtype=np.int64))) for n in ("s", "e"))
    node = ir.node("Slice", [x, starts, ends, computed])
    assert documented_answer("tensorrt", node)[0]
    assert not documented_answer("migraphx", node)[0]
    node = ir.node("MatMulInteger", [x, x])
    assert documented_answer("tensorrt", node) == (False, "not listed (listed unsupported)")


def test_tvm_list_is_live_where_tvm_imports():
    live = tvm_live()
    if live is None:
        assert DOCUMENTED["tvm"] is TVM_DOCUMENTED
        pytest.skip("TVM does not import here: the documented list stands in")
    from tvm.relax.frontend.onnx import onnx_frontend

    assert DOCUMENTED["tvm"] is live and live.basis == "live converter map"
    assert live.ops == set(onnx_frontend._get_convert_map()) | {"If"}
    diff = tvm_differences()
    assert diff["documented_only"] == []  # the documented list is a subset of the installed map
    assert {"GroupNormalization", "DepthToSpace"} <= set(diff["live_only"])
    assert live.supports("SkipLayerNormalization", "com.microsoft")  # the map ignores domains
    assert not live.supports("QAttention", "com.microsoft")


def test_cli_ops_json_round_trip(cli, data):
    code, out, _ = cli("ops", "--json")
    assert code == 0
    parsed = json.loads(out)
    assert parsed["backends"] == json.loads(json.dumps(data["backends"]))
    assert {r["op"] for r in parsed["ops"]} == set(OPS)
    code, out, _ = cli("ops", "--backend", "tensorrt")
    assert code == 0 and "tensorrt" in out and "Coverage over the zoo" in out
