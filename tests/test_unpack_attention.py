"""Unpacking ONNX Runtime's Attention (with a mask bias) so INT8 dynamic quantizes its QKV.

The three parts: the rewrite computes what the fused op computed (FP32, to float
rounding); under an INT8 dynamic plan the QKV projection is quantized and the padding
mask still holds; nodes the rewrite cannot express exactly stay as they are.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from adapter.passes.precision import PrecisionPlan, apply_plan, candidate_nodes
from adapter.passes.unpack_attention import UnpackAttention, unpack

BATCH, SEQ, HIDDEN, HEADS = 2, 8, 64, 4


def _model(extra_inputs=("", "", "bias"), **attributes) -> ir.Model:
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((HIDDEN, 3 * HIDDEN)) / np.sqrt(HIDDEN)).astype(np.float32)
    bias = (rng.standard_normal(3 * HIDDEN) * 0.1).astype(np.float32)
    node = helper.make_node(
        "Attention", ["x", "w", "b", *extra_inputs], ["y"], domain="com.microsoft", name="layer0/attention",
        num_heads=HEADS, **attributes,
    )  # fmt: skip
    node.metadata_props.add(key="adapter.module", value="encoder.layer.0.attention")
    graph = helper.make_graph(
        [node],
        "attention",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, SEQ, HIDDEN]),
            *[
                helper.make_tensor_value_info("bias", TensorProto.FLOAT, [BATCH, 1, SEQ, SEQ])
                for _ in ["bias"]
                if _ in extra_inputs
            ],
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, SEQ, HIDDEN])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets, ir_version=9))


def _feed(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, SEQ, HIDDEN)).astype(np.float32)
    mask = np.ones((BATCH, SEQ), dtype=bool)
    mask[1, 5:] = False  # the second sequence is padded after 5 tokens
    bias = np.where(mask[:, None, None, :], 0.0, np.finfo(np.float32).min).astype(np.float32)
    return {"x": x, "bias": np.broadcast_to(bias, (BATCH, 1, SEQ, SEQ)).copy()}


def _run(model: ir.Model, feed: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(["y"], {k: v for k, v in feed.items() if k in {i.name for i in session.get_inputs()}})[0]


def test_unpacked_attention_computes_the_same():
    model = _model()
    want = _run(model, _feed())
    unpacked = model.clone()
    assert unpack(unpacked, ["layer0/attention"]) == {"layer0/attention": "layer0/attention/qkv_MatMul"}
    onnx.checker.check_model(ir.serde.serialize_model(unpacked))
    assert [n.op_type for n in unpacked.graph] == ["MatMul", "Split", "MultiHeadAttention"]
    assert [n.op_type for n in model.graph] == ["Attention"]  # the clone was rewritten, not the model
    assert {n.metadata_props.get("adapter.module") for n in unpacked.graph} == {"encoder.layer.0.attention"}
    assert [o.name for o in unpacked.graph.outputs] == ["y"]
    got = _run(unpacked, _feed())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_int8_dynamic_quantizes_the_qkv_projection_and_keeps_the_mask():
    model = _model()
    names, modules = candidate_nodes(model, "int8-dynamic")
    assert names == ["layer0/attention"] and modules == {"layer0/attention": "encoder.layer.0.attention"}
    plan = PrecisionPlan(mode="int8-dynamic", nodes=names, modules=modules, options={"per_channel": True})
    quantized = apply_plan(model, plan)
    ops = [n.op_type for n in quantized.graph]
    assert "Attention" not in ops and "MatMul" not in ops and "MatMulInteger" in ops and "MultiHeadAttention" in ops
    assert plan.measured["attention_unpacked"] == 1
    feed = _feed()
    want, got = _run(model, feed), _run(quantized, feed)
    cosine = np.sum(got * want, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    assert cosine.min() > 0.99, cosine.min()
    # the padding mask still holds: what the padded positions hold does not reach the real
    # tokens (their channels reversed: the same set of values, so the per-tensor range and
    # with it the dynamic quantization of every other value stay the same)
    changed = {**feed, "x": feed["x"].copy()}
    changed["x"][1, 5:] = feed["x"][1, 5:, ::-1]
    np.testing.assert_allclose(_run(quantized, changed)[1, :5], got[1, :5], rtol=1e-5, atol=1e-5)
    assert not np.allclose(_run(quantized, changed)[1, 5:], got[1, 5:])


@pytest.mark.parametrize(
    "extra, attributes",
    [
        (("mask", "", "bias"), {}),  # a mask_index as well
        (("", "past", "bias"), {}),  # a KV cache
        (("", "", "bias"), {"unidirectional": 1}),  # causal: MultiHeadAttention has no such flag
        (("", "", "bias"), {"do_rotary": 1}),
    ],
)
def test_attention_the_rewrite_cannot_express_stays_fp32(extra, attributes):
    """With a mask bias and anything MultiHeadAttention cannot take, the node is no candidate
    (QAttention would drop the mask): it stays in FP32 and is not rewritten."""
    model = _model(extra_inputs=extra, **attributes)
    assert candidate_nodes(model, "int8-dynamic")[0] == []
    assert unpack(model, ["layer0/attention"]) == {}
    assert [n.op_type for n in model.graph] == ["Attention"]
    unpacking = UnpackAttention()
    assert not unpacking(model).modified and unpacking.record.counters == {"attention_unpacked": 0}
    assert [n.op_type for n in model.graph] == ["Attention"]


def test_attention_without_a_mask_bias_goes_to_qattention():
    """No attention_bias: ONNX Runtime's own QAttention takes the node, as before."""
    model = _model(extra_inputs=())
    names, modules = candidate_nodes(model, "int8-dynamic")
    quantized = apply_plan(model, PrecisionPlan(mode="int8-dynamic", nodes=names, modules=modules))
    assert [n.op_type for n in quantized.graph if n.domain == "com.microsoft"] == ["QAttention"]
    feed = {"x": _feed()["x"]}
    want, got = _run(model, feed), _run(quantized, feed)
    cosine = np.sum(got * want, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    assert cosine.min() > 0.99, cosine.min()


def test_the_unpack_pass_rewrites_every_masked_attention_and_only_those():
    """As a pass (no names: every Attention with an attention_bias): the op types after it,
    the same outputs as before it on fresh inputs, and nothing to do without a mask bias."""
    model = _model()
    feed = _feed(seed=5)
    want = _run(model, feed)
    unpacking = UnpackAttention()
    result = unpacking(model)
    assert result.model is model and result.modified
    assert [n.op_type for n in model.graph] == ["MatMul", "Split", "MultiHeadAttention"]
    assert unpacking.record.counters == {"attention_unpacked": 1}
    assert unpacking.renamed == {"layer0/attention": "layer0/attention/qkv_MatMul"}
    np.testing.assert_allclose(_run(model, feed), want, rtol=1e-5, atol=1e-5)

    plain = _model(extra_inputs=())  # no mask bias: QAttention takes it, nothing to unpack
    assert not UnpackAttention()(plain).modified
    assert [n.op_type for n in plain.graph] == ["Attention"]
