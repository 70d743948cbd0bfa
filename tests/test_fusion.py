"""Fusion passes, tested three ways (CONVENTIONS.md): the op types after the pass, numerical
equality with the graph before it (ONNX Runtime, fresh random inputs at shapes other than
the export's, so the dynamic dims are exercised), and cases where a rule must not fire.

The zoo models are imported once per module exactly as ``convert`` does (export, then
``canonicalize``); each test fuses its own copy.
"""

from __future__ import annotations

import collections
import gc
import importlib
import pkgutil
import weakref

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxscript.rewriter import RewriteRuleSet

from adapter.converter.coverage import zoo_graphs
from adapter.converter.importer import prepare_source
from adapter.passes import build_pipeline, fusion, run_pipeline
from adapter.passes.fusion import (
    ConvBatchNormFusion,
    FusionOptions,
    FusionPass,
    GeluFusion,
    GemmUnfold,
    LayerNormFusion,
    MatMulAddGemmFusion,
    OrtAttentionFusion,
    OrtGeluFusion,
    OrtRotaryFusion,
    OrtSkipLayerNormFusion,
)
from adapter.passes.pipeline import PASSES, PIPELINES

RNG = np.random.default_rng(11)
RTOL = ATOL = 1e-4


# --- helpers -------------------------------------------------------------------------


def _session(model: ir.Model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # compare graphs, not ORT's fusions
    options.log_severity_level = 3
    return ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _feed(model: ir.Model, batch: int = 3, seq: int = 11) -> dict[str, np.ndarray]:
    """Fresh random inputs; symbolic dims become ``batch`` (first) and ``seq``."""
    feed = {}
    for value in model.graph.inputs:
        dims = [d if isinstance(d, int) else (batch if i == 0 else seq) for i, d in enumerate(value.shape)]
        if value.name == "input_ids":
            feed[value.name] = RNG.integers(0, 256, dims).astype(np.int64)
        elif value.name == "attention_mask":
            mask = np.ones(dims, np.int64)
            mask[-1, -3:] = 0  # a right-padded row
            feed[value.name] = mask
        else:
            feed[value.name] = RNG.standard_normal(dims).astype(value.dtype.numpy())
    return feed


def _assert_same(before: ir.Model, after: ir.Model, feeds) -> None:
    reference, fused = _session(before), _session(after)
    for feed in feeds:
        for want, got in zip(reference.run(None, feed), fused.run(None, feed)):
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def _ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph)


def _check(make, pass_, *, fires: bool, shape=(3, 11)) -> tuple[ir.Model, ir.Model]:
    """Apply ``pass_`` to a fresh model; check ``modified`` and numerics; return (before, after)."""
    before = make()
    after = ir.serde.deserialize_model(ir.serde.serialize_model(before))
    result = pass_(after)
    assert result.modified is fires
    assert pass_.record.modified is fires
    _assert_same(before, after, [_feed(before, *shape)])
    return before, after


def _hand_model(nodes, inputs, outputs=("y",), initializers=(), opset=20) -> ir.Model:
    """A small graph; ``inputs`` maps name to shape (strings are symbolic dims)."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(np.asarray(v, np.float32) if v.dtype.kind == "f" else v, k) for k, v in initializers],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))
    run_pipeline(model, build_pipeline("shape-inference"))
    return model


def _const(name: str, value) -> tuple[str, np.ndarray]:
    return name, np.asarray(value)


def _weights(name: str, *shape: int) -> tuple[str, np.ndarray]:
    return name, RNG.standard_normal(shape).astype(np.float32) * 0.3


# --- zoo models ----------------------------------------------------------------------


class Zoo:
    """A canonicalized zoo model (kept serialized; fresh copies deserialized) and its transformer layer count."""

    def __init__(self, name: str) -> None:
        prepared = prepare_source(f"adapter.zoo:{name}")
        inner = getattr(prepared.module, "model", None)
        self.layers = getattr(getattr(inner, "config", None), "num_hidden_layers", None)
        # the canonical graph the op library's coverage exports too: one export per test session
        self.proto = ir.serde.serialize_model(zoo_graphs((name,))[name]["canonicalize"])

    def fresh(self) -> ir.Model:
        return ir.serde.deserialize_model(self.proto)


@pytest.fixture(scope="module")
def zoo():
    cache: dict[str, Zoo] = {}

    def get(name: str) -> Zoo:
        if name not in cache:
            cache[name] = Zoo(name)
        return cache[name]

    return get


def _fuse(model: ir.Model, pipeline: str) -> dict[str, dict]:
    return {r.name: r.counters for r in run_pipeline(model, build_pipeline(pipeline))}


# What fusion-ort must produce per transformer layer (L): attention, both norms (+1 for the
# embedding norm; their residual Add stays apart, see normalization.ORT_STAGES), and the GELU.
ORT_EXPECTED = {
    "minilm": {
        "com.microsoft::Attention": 1,
        "LayerNormalization": (2, 1),
        "com.microsoft::BiasGelu": 1,
    },
    "vit": {
        "com.microsoft::Attention": 1,
        "LayerNormalization": (2, 1),
        "com.microsoft::BiasGelu": 1,
    },
    "gpt2": {
        "com.microsoft::Attention": 1,
        "LayerNormalization": (2, 1),
        "com.microsoft::FastGelu": 1,
    },
}


@pytest.mark.parametrize("name", ["minilm", "gpt2", "vit"])
def test_fusion_ort_fuses_every_attention_block(zoo, name):
    model = zoo(name)
    layers = model.layers
    before, after = model.fresh(), model.fresh()
    counters = _fuse(after, "fusion-ort")

    ops = _ops(after)
    for op, per_layer in ORT_EXPECTED[name].items():
        scale, extra = per_layer if isinstance(per_layer, tuple) else (per_layer, 0)
        assert ops[op] == scale * layers + extra, (op, dict(ops))
    assert ops["Softmax"] == 0 and ops["Gelu"] == 0 and ops["ReduceMean"] == 0
    assert ops["com.microsoft::MultiHeadAttention"] == 0  # all the way to Attention
    assert ops["com.microsoft::SkipLayerNormalization"] == 0
    attention = counters["fuse-ort-attention"]
    assert attention["sdpa"] == attention["mha"] == layers
    assert attention["attention" if name != "gpt2" else "attention_packed_qkv"] == layers
    # Dynamic dims survive: still symbolic, and two other shapes run.
    assert isinstance(after.graph.inputs[0].shape[0], ir.SymbolicDim)
    _assert_same(before, after, [_feed(before, 3, 11), _feed(before, 1, 5)])


def test_fusion_ort_llama_rotary_and_rms(zoo):
    model = zoo("llama")
    layers = model.layers
    before, after = model.fresh(), model.fresh()
    counters = _fuse(after, "fusion-ort")
    ops = _ops(after)
    assert ops["com.microsoft::RotaryEmbedding"] == 2 * layers  # query and key
    assert ops["com.microsoft::MultiHeadAttention"] == layers  # via SDPA (K/V heads repeated)
    assert ops["com.microsoft::SkipSimplifiedLayerNormalization"] == 2 * layers
    assert ops["SimplifiedLayerNormalization"] == 0 and ops["Softmax"] == 0  # the lone final norm is unfused
    assert counters["fuse-ort-rotary"]["cos_sin_cache_broadcast"] == 2 * layers
    _assert_same(before, after, [_feed(before, 3, 11), _feed(before, 2, 30)])


def test_fusion_ort_t5_reassociates_the_position_bias(zoo):
    model = zoo("t5_encoder")
    before, after = model.fresh(), model.fresh()
    counters = _fuse(after, "fusion-ort")
    assert counters["fuse-ort-attention"]["mask_add_reassociation"] == model.layers
    assert _ops(after)["com.microsoft::MultiHeadAttention"] == model.layers
    _assert_same(before, after, [_feed(before, 3, 11)])


@pytest.mark.parametrize("name", ["minilm", "gpt2", "vit", "resnet"])
def test_fusion_standard_stays_in_the_standard_domain(zoo, name):
    model = zoo(name)
    before, after = model.fresh(), model.fresh()
    counters = _fuse(after, "fusion-standard")
    ops = _ops(after)
    assert all("::" not in op for op in ops), dict(ops)
    expected = {
        # The exporter already writes LayerNormalization and Gelu for these two: nothing to do.
        "minilm": {},
        "vit": {},
        "gpt2": {"fuse-gelu": {"gelu": model.layers}},  # NewGELUActivation, decomposed tanh form
        "resnet": {"fuse-conv-batchnorm": {"conv_batchnorm": 6}},
    }[name]
    fired = {p: {k: v for k, v in c.items() if v} for p, c in counters.items() if p.startswith("fuse-")}
    assert {p: c for p, c in fired.items() if c} == expected
    if name == "gpt2":
        gelus = [n for n in after.graph if n.op_type == "Gelu"]
        assert len(gelus) == model.layers and all(n.attributes.get_string("approximate") == "tanh" for n in gelus)
    if name == "resnet":
        assert ops["BatchNormalization"] == 0 and ops["Conv"] == 6
    _assert_same(before, after, [_feed(before, 3, 11)])


def test_fusion_ort_leaves_learned_positions_alone(zoo):
    """GPT-2 has no rotary embedding: the rotary pass must not touch it."""
    model = zoo("gpt2").fresh()
    ops = _ops(model)
    rotary = OrtRotaryFusion()
    assert rotary(model).modified is False
    assert _ops(model) == ops


def test_pipelines_are_registered():
    assert PIPELINES["fusion-ort"][-3:] == ("constant-folding", "lift-constants", "topological-sort")
    names = [p.name for p in build_pipeline(["canonicalize", "fusion-standard"])]
    assert names[-5:] == [
        "fuse-conv-batchnorm",
        "fuse-layer-norm",
        "fuse-gelu",
        "fuse-matmul-add-gemm",
        "topological-sort",
    ]


RULE_FILES = [
    importlib.import_module(f"{fusion.__name__}.{m.name}")
    for m in pkgutil.iter_modules(fusion.__path__)
    if not m.name.startswith("_")
]
"""Every rule file of ``passes/fusion`` (each ends with its ``rules``)."""


def _applied_rules(pass_: FusionPass) -> list:
    """Every rule object ``pass_`` applies, in order, at each opset where a family's stages change."""
    applied: dict[int, object] = {}
    for opset in (17, 20, 23):
        model = ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": opset}), ir_version=10)
        for stage in pass_.stages(model):
            for rule in stage.rules:
                applied.setdefault(id(rule), rule)
    return list(applied.values())


def test_each_rule_file_declares_exactly_the_rules_its_passes_apply():
    """A file's ``rules`` (onnxscript's convention) and the stages its passes apply hold the same rules."""
    exported = [getattr(fusion, name) for name in fusion.__all__]
    fusion_passes = {c for c in exported if isinstance(c, type) and issubclass(c, FusionPass) and c is not FusionPass}
    assert fusion_passes == {p for p in PASSES.values() if isinstance(p, type) and issubclass(p, FusionPass)}

    owner = {}  # id(rule) -> the file that declares it
    for module in RULE_FILES:
        assert isinstance(module.rules, RewriteRuleSet), module.__name__
        for rule in module.rules.rules:
            assert id(rule) not in owner, f"{rule.name} declared twice ({owner.get(id(rule))}, {module.__name__})"
            owner[id(rule)] = module

    applied_ids: set[int] = set()
    for cls in sorted(fusion_passes, key=lambda c: c.name):
        applied = _applied_rules(cls())
        assert applied, cls.name
        undeclared = sorted({r.name for r in applied if id(r) not in owner})
        assert not undeclared, f"{cls.name} applies rules no file declares: {undeclared}"
        (module, *others) = {owner[id(r)] for r in applied}
        assert not others, f"{cls.name} applies the rules of several files"
        ids = {id(r) for r in applied}
        assert [r for r in module.rules.rules if id(r) in ids] == applied, f"{cls.name} applies them out of order"
        applied_ids |= ids
    unapplied = sorted(f"{m.__name__}: {r.name}" for m in RULE_FILES for r in m.rules.rules if id(r) not in applied_ids)
    assert not unapplied, f"declared rules no pass applies: {unapplied}"


def _openvino_default_precision(features: set[str]) -> str:
    """The inference precision OpenVINO's CPU plugin runs when no hint is given, from the
    host's ISA features as the probe read them: BF16 where an x86 CPU computes it natively
    (AVX512_BF16: AMD Zen 4, Intel Cooper Lake; AMX: Sapphire Rapids on), FP16 on Arm
    CPUs with half-precision arithmetic, FP32 otherwise (AVX2, AVX-512 without BF16)."""
    if features & {"avx512_bf16", "amx_bf16"}:
        return "bf16"
    if "asimdhp" in features:
        return "f16"
    return "f32"


def test_fusion_standard_compiles_in_openvino(zoo, tmp_path):
    """The fused graph compiles in OpenVINO and computes what the unfused graph does in ONNX
    Runtime: at the fusion tolerance with the f32 hint pinned, on every host; without a
    hint OpenVINO runs the precision the host's class implies (BF16 on AVX512_BF16 / AMX
    hosts) and stays within that precision's tolerance."""
    from adapter.core.verify import Tolerance, compare
    from adapter.profiles import load_profile

    ov = pytest.importorskip("openvino", reason="OpenVINO is not installed")
    model = zoo("gpt2")
    before, after = model.fresh(), model.fresh()
    _fuse(after, "fusion-standard")
    path = tmp_path / "gpt2.onnx"
    ir.save(after, path)
    feed = _feed(before, 2, 9)
    want = _session(before).run(None, feed)[0]
    core = ov.Core()

    pinned = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert pinned.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    exact = pinned(feed)[pinned.outputs[0]]
    np.testing.assert_allclose(exact, want, rtol=RTOL, atol=ATOL)

    host = load_profile("host")
    expected = _openvino_default_precision(set(host.features))
    default = core.compile_model(str(path), "CPU")
    ran = default.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    assert ran == expected, f"OpenVINO's default precision is {ran}; host features {host.features}"
    got = default(feed)[default.outputs[0]]
    if expected == "f32":
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
        return
    # Reduced precision: SECURITY.md's tolerances (bf16 rtol 1.6e-2 / atol 1e-3, fp16 1e-3 /
    # 1e-3) as the project's verifier applies them (rtol of the output's largest magnitude),
    # plus the cosine the precision step demands of BF16 / FP16 (0.999). Elementwise they are
    # PyTorch's per-op figures: through this whole model, torch's CPU autocast to BF16 broke
    # them near zero in 92 of 200 random feeds (worst 1.5x) while using at most 0.29 of this
    # bound, cosine >= 0.99999 (fully BF16 torch: 0.39 of it).
    tolerance = {"bf16": Tolerance(atol=1e-3, rtol=1.6e-2, min_cosine=0.999),
                 "f16": Tolerance(atol=1e-3, rtol=1e-3, min_cosine=0.999)}[expected]  # fmt: skip
    figures = compare(got, want, tolerance)
    assert figures["passed"], f"OpenVINO {expected} vs ONNX Runtime FP32: {figures}"
    assert not np.array_equal(got, exact), f"the default compile computed exactly what f32 did, not {expected}"


# --- hand-built graphs: each rule fires on its pattern, and not on a near miss ------------


def _attention_block(softmax_axis: int) -> ir.Model:
    """Eager attention over x [B, S, 8] with 2 heads of 4, as the exporter writes it."""
    nodes, inits = [], [_const("heads", [0, 0, 2, 4]), _const("merged", [0, 0, 8]), _const("scale", 0.5)]
    for p in "qkv":
        inits += [_weights(f"w{p}", 8, 8), _weights(f"b{p}", 8)]
        nodes += [
            helper.make_node("MatMul", ["x", f"w{p}"], [f"{p}0"]),
            helper.make_node("Add", [f"{p}0", f"b{p}"], [f"{p}1"]),
            helper.make_node("Reshape", [f"{p}1", "heads"], [f"{p}2"]),
            helper.make_node("Transpose", [f"{p}2"], [f"{p}3"], perm=[0, 2, 1, 3]),
        ]
    nodes += [
        helper.make_node("Transpose", ["k3"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q3", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["s1"]),
        helper.make_node("Softmax", ["s1"], ["p"], axis=softmax_axis),
        helper.make_node("MatMul", ["p", "v3"], ["o"]),
        helper.make_node("Transpose", ["o"], ["o1"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["o1", "merged"], ["y"]),
    ]
    return _hand_model(nodes, {"x": ["B", "S", 8]}, initializers=inits)


def test_attention_fuses_hand_built_block():
    _, after = _check(lambda: _attention_block(-1), OrtAttentionFusion(), fires=True)
    ops = _ops(after)
    assert ops["com.microsoft::Attention"] == 1 and ops["Softmax"] == 0 and ops["MatMul"] == 0


def test_a_fused_graph_is_freed_once_its_owner_lets_go():
    """The rules live as long as their module; the graph they last matched must not (it
    holds every weight of the model: a decoder's fused FP32 weights stayed alive after its
    engine was built). The fusion still fires and keeps the numbers."""
    before = _attention_block(-1)
    after = ir.serde.deserialize_model(ir.serde.serialize_model(before))
    assert OrtAttentionFusion()(after).modified
    _assert_same(before, after, [_feed(before)])
    gone = weakref.ref(after.graph)  # the matcher held the graph (and its weights), not the model
    del after
    gc.collect()
    assert gone() is None


def test_attention_not_fused_when_softmax_is_on_the_wrong_axis():
    pass_ = OrtAttentionFusion(FusionOptions(explain_misses=True))
    before, after = _check(lambda: _attention_block(2), pass_, fires=False)
    assert _ops(after) == _ops(before)
    assert "sdpa" in pass_.misses  # the tracer says why the SDPA pattern was refused


def _layer_norm(eps_inside_sqrt: bool) -> ir.Model:
    """Decomposed layer norm over the last axis of x [B, S, 8]."""
    std = (
        [helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"])]
        if eps_inside_sqrt
        else [helper.make_node("Sqrt", ["var"], ["sd0"]), helper.make_node("Add", ["sd0", "eps"], ["sd"])]
    )
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["mean"]),
        helper.make_node("Sub", ["x", "mean"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["d2"]),
        helper.make_node("ReduceMean", ["d2", "axes"], ["var"]),
        *std,
        helper.make_node("Div", ["d", "sd"], ["n"]),
        helper.make_node("Mul", ["n", "gamma"], ["ns"]),
        helper.make_node("Add", ["ns", "beta"], ["y"]),
    ]
    inits = [
        _const("axes", np.array([-1], np.int64)), _const("two", 2.0), _const("eps", 1e-5),
        _weights("gamma", 8), _weights("beta", 8),
    ]  # fmt: skip
    return _hand_model(nodes, {"x": ["B", "S", 8]}, initializers=inits)


def test_layer_norm_fuses():
    _, after = _check(lambda: _layer_norm(True), LayerNormFusion(), fires=True)
    assert list(_ops(after)) == ["LayerNormalization"]
    assert next(iter(after.graph)).attributes.get_float("epsilon") == pytest.approx(1e-5)


def test_layer_norm_not_fused_when_epsilon_is_added_after_the_sqrt():
    before, after = _check(lambda: _layer_norm(False), LayerNormFusion(), fires=False)
    assert _ops(after) == _ops(before)


def _skip_norm(skip_shape) -> ir.Model:
    nodes = [
        helper.make_node("Add", ["x", "skip"], ["sum"]),
        helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5),
    ]
    return _hand_model(
        nodes, {"x": ["B", "S", 8], "skip": skip_shape}, initializers=[_weights("gamma", 8), _weights("beta", 8)]
    )


def test_skip_layer_norm_with_a_broadcast_position_term():
    _, after = _check(lambda: _skip_norm([1, "S", 8]), OrtSkipLayerNormFusion(), fires=True)
    assert list(_ops(after)) == ["com.microsoft::SkipLayerNormalization"]


def test_skip_layer_norm_not_fused_when_skip_broadcasts_over_the_sequence():
    before, after = _check(lambda: _skip_norm(["B", 1, 8]), OrtSkipLayerNormFusion(), fires=False)
    assert _ops(after) == _ops(before)


def _gelu(tanh: bool, divisor: float = float(np.sqrt(2.0)), opset: int = 20) -> ir.Model:
    """GPT-2's association ``(x * 0.5) * (t + 1)``, constants last."""
    if tanh:
        core = [
            helper.make_node("Pow", ["x", "three"], ["x3"]),
            helper.make_node("Mul", ["x3", "c"], ["x3c"]),
            helper.make_node("Add", ["x", "x3c"], ["inner"]),
            helper.make_node("Mul", ["inner", "k"], ["ik"]),
            helper.make_node("Tanh", ["ik"], ["t"]),
        ]
    else:
        core = [helper.make_node("Div", ["x", "root2"], ["xr"]), helper.make_node("Erf", ["xr"], ["t"])]
    nodes = [
        helper.make_node("Mul", ["x", "half"], ["hx"]),
        *core,
        helper.make_node("Add", ["t", "one"], ["t1"]),
        helper.make_node("Mul", ["hx", "t1"], ["y"]),
    ]
    inits = [
        _const("three", 3.0), _const("c", 0.044715), _const("k", float(np.sqrt(2 / np.pi))),
        _const("root2", divisor), _const("half", 0.5), _const("one", 1.0),
    ]  # fmt: skip
    return _hand_model(nodes, {"x": ["B", "S", 8]}, initializers=inits, opset=opset)


@pytest.mark.parametrize("tanh", [True, False], ids=["tanh", "erf"])
def test_gelu_fuses_to_onnx_gelu(tanh):
    _, after = _check(lambda: _gelu(tanh), GeluFusion(), fires=True)
    assert list(_ops(after)) == ["Gelu"]
    assert next(iter(after.graph)).attributes.get_string("approximate", "none") == ("tanh" if tanh else "none")


@pytest.mark.parametrize("tanh", [True, False], ids=["tanh", "erf"])
def test_gelu_fuses_to_ort_gelu(tanh):
    _, after = _check(lambda: _gelu(tanh), OrtGeluFusion(), fires=True)
    assert list(_ops(after)) == ["com.microsoft::FastGelu" if tanh else "com.microsoft::Gelu"]


def test_gelu_not_fused_when_the_erf_argument_is_not_x_over_sqrt2():
    before, after = _check(lambda: _gelu(False, divisor=2.0), GeluFusion(), fires=False)
    assert _ops(after) == _ops(before)


def test_gelu_not_fused_to_onnx_gelu_below_opset_20():
    before, after = _check(lambda: _gelu(True, opset=18), GeluFusion(), fires=False)
    assert _ops(after) == _ops(before)


def _matmul_add(bias_shape, a_shape=(3, 4)) -> ir.Model:
    nodes = [helper.make_node("MatMul", ["a", "w"], ["p"]), helper.make_node("Add", ["p", "b"], ["y"])]
    return _hand_model(nodes, {"a": list(a_shape)}, initializers=[_weights("w", 4, 5), _weights("b", *bias_shape)])


@pytest.mark.parametrize("bias_shape", [[5], [3, 1], [1, 5], [3, 5]])
def test_matmul_add_to_gemm(bias_shape):
    _, after = _check(lambda: _matmul_add(bias_shape), MatMulAddGemmFusion(), fires=True, shape=(3, 4))
    assert list(_ops(after)) == ["Gemm"]


@pytest.mark.parametrize(
    "bias_shape, a_shape", [([2, 3, 5], (3, 4)), ([5], (2, 3, 4))], ids=["rank3-bias", "3d-matmul"]
)
def test_matmul_add_not_fused_when_gemm_cannot_express_it(bias_shape, a_shape):
    before, after = _check(
        lambda: _matmul_add(bias_shape, a_shape), MatMulAddGemmFusion(), fires=False, shape=a_shape[:2]
    )
    assert _ops(after) == _ops(before)


def _flat_gemm(out_shape) -> ir.Model:
    nodes = [
        helper.make_node("Reshape", ["x", "flat"], ["x2"]),
        helper.make_node("Gemm", ["x2", "w", "b"], ["g"]),
        helper.make_node("Reshape", ["g", "back"], ["y"]),
    ]
    inits = [
        _const("flat", np.array([6, 4], np.int64)), _const("back", np.array(out_shape, np.int64)),
        _weights("w", 4, 5), _weights("b", 5),
    ]  # fmt: skip
    return _hand_model(nodes, {"x": [2, 3, 4]}, initializers=inits)


def test_flat_gemm_unfolds_to_matmul_add():
    _, after = _check(lambda: _flat_gemm([2, 3, 5]), GemmUnfold(), fires=True, shape=(2, 3))
    assert list(_ops(after)) == ["MatMul", "Add"]


def test_flat_gemm_kept_when_the_output_is_not_the_input_layout():
    before, after = _check(lambda: _flat_gemm([3, 2, 5]), GemmUnfold(), fires=False, shape=(2, 3))
    assert _ops(after) == _ops(before)


def _conv_bn(weight_is_input: bool) -> ir.Model:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], epsilon=1e-5),
    ]
    inits = [
        ("gamma", RNG.uniform(0.5, 1.5, 4).astype(np.float32)), ("beta", RNG.uniform(-0.5, 0.5, 4).astype(np.float32)),
        ("mean", RNG.uniform(-0.5, 0.5, 4).astype(np.float32)), ("var", RNG.uniform(0.5, 1.5, 4).astype(np.float32)),
    ]  # fmt: skip
    inputs = {"x": ["B", 3, 6, 6]}
    if weight_is_input:
        inputs["w"] = [4, 3, 3, 3]
    else:
        inits.append(_weights("w", 4, 3, 3, 3))
    return _hand_model(nodes, inputs, initializers=inits)


def test_conv_batchnorm_folds():
    _, after = _check(lambda: _conv_bn(False), ConvBatchNormFusion(), fires=True)
    assert list(_ops(after)) == ["Conv"]


def test_conv_batchnorm_kept_when_the_weight_is_not_constant():
    before, after = _check(lambda: _conv_bn(True), ConvBatchNormFusion(), fires=False)
    assert _ops(after) == _ops(before)
