"""MIGraphX backend: standard-domain ONNX, ONNX Runtime provider configuration, the ROCm run
script, refusals from AMD's operator matrix, and the CPU stand-in's numerics."""

from __future__ import annotations

import ast
import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from adapter.backends import migraphx
from adapter.backends.documented import MIGRAPHX
from adapter.core.errors import AdapterError, UnsupportedOpsError
from adapter.core.specs import Dim, TensorSpec
from adapter.profiles import load_profile

RNG = np.random.default_rng(11)
W = RNG.standard_normal((8, 16)).astype(np.float32)
B = RNG.standard_normal(16).astype(np.float32)
BATCH, SEQ = Dim("batch", 1, 16), Dim("seq", 1, 64)
SPECS = ([TensorSpec("x", "float32", (BATCH, SEQ, 8))], [TensorSpec("y", "float32", (BATCH, SEQ, 16))])
NO_MIGRAPHX = migraphx.PROVIDER not in ort.get_available_providers()
KNOWN_OPTIONS = {
    "device_id", "migraphx_fp16_enable", "migraphx_bf16_enable", "migraphx_fp8_enable", "migraphx_int8_enable",
    "migraphx_exhaustive_tune", "migraphx_mem_limit", "migraphx_model_cache_dir",
}  # fmt: skip
"""Keys ONNX Runtime's MIGraphX provider parses (migraphx_execution_provider_info.h), those adapter writes."""


def _model(nodes=None, domains=(), extra_inits=()) -> ir.Model:
    nodes = nodes or [
        helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "B"], ["a"], name="add"),
        helper.make_node("Tanh", ["a"], ["y"], name="tanh"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B"), *extra_inits],
    )
    opsets = [helper.make_opsetid("", 20)] + [helper.make_opsetid(d, 1) for d in domains]
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets))


def _compile(tmp_path, model=None, **overrides):
    profile = load_profile("amd-mi300x")
    options = migraphx.Options.from_profile(profile, overrides)
    return migraphx.compile(model or _model(), profile, options, SPECS, tmp_path)


def test_onnx_is_checker_valid_standard_domain_and_listed(tmp_path):
    engine = _compile(tmp_path)
    onnx.checker.check_model(str(tmp_path / "model.onnx"), full_check=True)
    written = onnx.load(str(tmp_path / "model.onnx"))
    assert all(n.domain in ("", "ai.onnx") and MIGRAPHX.supports(n.op_type) for n in written.graph.node)
    assert set(engine.files()) == {"model.onnx", "ort_providers.json", "run_on_rocm.py"}


def test_provider_configuration(tmp_path):
    _compile(tmp_path, precision="fp16", exhaustive_tune=True, device_id=1)
    config = json.loads((tmp_path / "ort_providers.json").read_text())
    assert config["providers"] == ["MIGraphXExecutionProvider", "CPUExecutionProvider"]
    options, cpu = config["provider_options"]
    assert cpu == {} and set(options) <= KNOWN_OPTIONS
    assert options["device_id"] == "1" and options["migraphx_fp16_enable"] == "1"
    assert options["migraphx_bf16_enable"] == "0" and options["migraphx_int8_enable"] == "0"
    assert options["migraphx_exhaustive_tune"] == "1"
    assert options["migraphx_model_cache_dir"] == "migraphx-cache"  # inside the artifact, resolved at run time
    assert all(isinstance(v, str) for v in options.values())
    # the engine's own session resolves the cache folder under the artifact
    absolute = migraphx.provider_options(migraphx.Options(), tmp_path)
    assert absolute["migraphx_model_cache_dir"] == str(tmp_path / "migraphx-cache")


def test_run_script_is_valid_python_and_uses_the_providers(tmp_path):
    _compile(tmp_path)
    source = (tmp_path / "run_on_rocm.py").read_text()
    ast.parse(source)
    compile(source, "run_on_rocm.py", "exec")  # the builtin compile: valid Python, not run
    for needed in ("ort.InferenceSession(", "provider_options=options", "ort_providers.json", "allow_pickle=False"):
        assert needed in source, needed


def test_ops_outside_the_matrix_and_other_domains_are_refused(tmp_path):
    model = _model(
        nodes=[
            helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
            helper.make_node("Einsum", ["m"], ["e"], name="einsum", equation="bsk->bsk"),
            helper.make_node("FastGelu", ["e", "B"], ["y"], name="gelu", domain="com.microsoft"),
        ],
        domains=("com.microsoft",),
    )
    nodes = {n.name: n for n in model.graph}
    einsum = migraphx.supports(nodes["einsum"], model)
    assert not einsum and "Einsum" in einsum.reason and "AMDMIGraphX" in einsum.reason
    gelu = migraphx.supports(nodes["gelu"], model)
    assert not gelu and "com.microsoft" in gelu.reason
    with pytest.raises(UnsupportedOpsError) as caught:
        _compile(tmp_path, model=model)
    assert "node 'einsum'" in str(caught.value) and "node 'gelu'" in str(caught.value)


def test_a_slice_with_run_time_bounds_is_refused():
    model = _model(
        nodes=[
            helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
            helper.make_node("Shape", ["m"], ["s"], name="shape", start=1, end=2),
            helper.make_node("Slice", ["m", "zero", "s", "one"], ["y"], name="slice"),
        ],
        extra_inits=[numpy_helper.from_array(np.array([0], np.int64), "zero"),
                     numpy_helper.from_array(np.array([1], np.int64), "one")],
    )  # fmt: skip
    answer = migraphx.supports(next(n for n in model.graph if n.op_type == "Slice"), model)
    assert not answer and "variable inputs" in answer.reason


def test_a_topk_with_run_time_k_is_refused_and_constant_axes_pass():
    """The matrix's constant inputs are read from op_library (its TopK/CumSum/Trilu/Reduce* notes too),
    so supports() and `adapter ops` give the same answer."""
    model = _model(
        nodes=[
            helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
            helper.make_node("Shape", ["m"], ["s"], name="shape", start=1, end=2),
            helper.make_node("TopK", ["m", "s"], ["y", "i"], name="topk"),
            helper.make_node("ReduceSum", ["m", "one"], ["r"], name="reduce"),
        ],
        extra_inits=[numpy_helper.from_array(np.array([1], np.int64), "one")],
    )  # fmt: skip
    topk = migraphx.supports(next(n for n in model.graph if n.op_type == "TopK"), model)
    assert not topk and "input 1 is computed at run time" in topk.reason and "dynamic `k`" in topk.reason
    assert migraphx.supports(next(n for n in model.graph if n.op_type == "ReduceSum"), model)


@pytest.mark.skipif(not NO_MIGRAPHX, reason="this onnxruntime has MIGraphXExecutionProvider: the engine runs here")
def test_without_the_provider_the_stand_in_matches_numpy(tmp_path):
    engine = _compile(tmp_path)
    assert not engine.runs_here and not engine.config["session_here"]
    assert (
        engine.config["note"].startswith("No MIGraphX session was created")
        and "run_on_rocm.py" in engine.config["note"]
    )
    with pytest.raises(AdapterError, match="No MIGraphX session"):
        engine.run({"x": np.zeros((1, 1, 8), np.float32)})
    stand_in, description = engine.stand_in()
    assert "ONNX Runtime" in description and "MIGraphXExecutionProvider" in description
    for shape in [(1, 1, 8), (4, 9, 8), (16, 64, 8)]:
        x = RNG.standard_normal(shape).astype(np.float32)
        (y,) = stand_in.run({"x": x}).values()
        np.testing.assert_allclose(y, np.tanh(x @ W + B), rtol=1.3e-6, atol=1e-6)


def test_unknown_precision_hint_is_refused(tmp_path):
    with pytest.raises(AdapterError, match="precision hint 'int4'"):
        _compile(tmp_path, precision="int4")
