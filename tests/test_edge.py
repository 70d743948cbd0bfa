"""The edge backend: ORT format (ONNX Runtime Mobile) engines for ARM boards.

Small onnx.helper graphs imported with onnx_ir, compiled for the Raspberry Pi 5 profile,
checked through the x86 stand-in against numpy (FP32 to 1e-5; INT8 dynamic by cosine and
a loose elementwise bound) and, marked ``arm64``, under qemu-aarch64 on the same ``.ort``.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest

from adapter.backends import _arm64, edge
from adapter.core.errors import AdapterError
from adapter.core.specs import Dim, TensorSpec
from adapter.profiles import load_profile

RNG = np.random.default_rng(7)
W = RNG.standard_normal((64, 32)).astype(np.float32) * 0.2
B = RNG.standard_normal(32).astype(np.float32) * 0.1
ARM64_ROOTFS = _arm64.default_rootfs()  # the user's cache, resolved before conftest's per-session one


def _proto(act: str = "Relu", domain: str = ""):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"], name="matmul"),
            helper.make_node("Add", ["xw", "b"], ["pre"], name="add"),
            helper.make_node(act, ["pre"], ["y"], name="act", domain=domain),
        ],
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        [numpy_helper.from_array(W, "w"), numpy_helper.from_array(B, "b")],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    if not domain:
        onnx.checker.check_model(model)
    return model


def _specs():
    batch = Dim("batch", 1, 64)
    return [TensorSpec("x", "float32", (batch, 64))], [TensorSpec("y", "float32", (batch, 32))]


def _compile(proto, workdir, **overrides):
    profile = load_profile("arm-cortex-a76")
    options = edge.Options.from_profile(profile, overrides)
    return edge.compile(ir.serde.deserialize_model(proto), profile, options, _specs(), workdir)


def _quantized_proto(tmp_path):
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx.save(_proto(), tmp_path / "fp32.onnx")
    quantize_dynamic(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", weight_type=QuantType.QInt8)
    return onnx.load(tmp_path / "int8.onnx")


def _x(rows: int = 5) -> np.ndarray:
    return np.random.default_rng(rows).standard_normal((rows, 64)).astype(np.float32)


def _relu_ref(x):
    return np.maximum(x @ W + B, 0)


def _cosine(a, b) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_options_come_from_the_profile():
    options = edge.Options.from_profile(load_profile("arm-cortex-a76"))
    assert (options.format, options.optimization_style, options.target_platform) == ("ort", "Fixed", "arm")


def test_compile_writes_ort_and_operator_config(tmp_path):
    engine = _compile(_proto(), tmp_path / "e")
    folder = tmp_path / "e"
    assert sorted(engine.files()) == sorted([edge.ORT_FILE, edge.CONFIG_FILE])
    assert (folder / "model.ort").read_bytes()[4:8] == b"ORTM"
    text = (folder / edge.CONFIG_FILE).read_text()
    ops = [line for line in text.splitlines() if not line.startswith("#")]
    assert ops == engine.config["operators"] and all(line.count(";") == 2 for line in ops)  # domain;opset;ops
    assert str(tmp_path) not in text  # no build paths kept
    assert not list(folder.glob(".edge-*")) and not (folder / "model.onnx").exists()
    config = engine.config
    assert config["ort_version"] == edge.version() and config["target_platform"] == "arm"
    assert config["arch"] == "aarch64" and config["operators"]
    sizes = config["sizes"]
    assert sizes["weights_bytes"] == W.nbytes + B.nbytes
    assert sizes["ort_bytes"] == (folder / "model.ort").stat().st_size and sizes["onnx_bytes"] > sizes["weights_bytes"]


def test_engine_does_not_run_here_and_its_stand_in_matches_numpy(tmp_path):
    engine = _compile(_proto(), tmp_path / "e")
    assert engine.runs_here is False
    with pytest.raises(AdapterError, match="built for aarch64"):
        engine.run({"x": _x()})
    stand_in, description = engine.stand_in()
    assert "same .ort file" in description and edge.version() in description
    x = _x()
    (out,) = stand_in.run({"x": x}).values()
    np.testing.assert_allclose(out, _relu_ref(x), rtol=1e-5, atol=1e-5)
    assert np.abs(out - np.maximum(x @ W, 0)).max() > 1e-2  # a wrong graph would be caught


def test_saved_engine_reopens(tmp_path):
    engine = _compile(_proto(), tmp_path / "build")
    engine.save(tmp_path / "artifact")
    reopened = edge.Engine(tmp_path / "artifact", engine.inputs, engine.outputs, engine.config)
    x = _x(3)
    (out,) = reopened.stand_in()[0].run({"x": x}).values()
    np.testing.assert_allclose(out, _relu_ref(x), rtol=1e-5, atol=1e-5)


def test_com_microsoft_ops_survive_the_conversion(tmp_path):
    engine = _compile(_proto("Gelu", "com.microsoft"), tmp_path / "e")
    assert "com.microsoft;1;Gelu" in engine.config["operators"]
    x = _x()
    pre = x @ W + B
    expected = 0.5 * pre * (1 + np.vectorize(math.erf)(pre / math.sqrt(2)))
    (out,) = engine.stand_in()[0].run({"x": x}).values()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_int8_dynamic_model_converts_and_stays_close(tmp_path):
    proto = _quantized_proto(tmp_path)
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {n.op_type for n in proto.graph.node}
    engine = _compile(proto, tmp_path / "e")
    assert any("DynamicQuantize" in op or "MatMulInteger" in op for op in engine.config["operators"])
    assert engine.config["sizes"]["ort_bytes"] < W.nbytes  # int8 weights
    x = _x(16)
    (out,) = engine.stand_in()[0].run({"x": x}).values()
    ref = _relu_ref(x)
    assert np.isfinite(out).all()
    assert _cosine(out, ref) > 0.999
    np.testing.assert_allclose(out, ref, rtol=1e-2, atol=0.05)


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(AdapterError, match="optimization_style 'Fast'"):
        _compile(_proto(), tmp_path / "e", optimization_style="Fast")
    with pytest.raises(AdapterError, match="format 'tflite'"):
        _compile(_proto(), tmp_path / "e", format="tflite")


def test_supports_follows_onnxruntime():
    model = ir.serde.deserialize_model(_proto())
    assert all(edge.supports(node, model) for node in model.graph)
    odd = ir.node("NoSuchOp", [model.graph.inputs[0]], domain="com.example")
    assert not edge.supports(odd, model)


def test_non_ort_file_is_refused(tmp_path):
    (tmp_path / "model.ort").write_bytes(b"\x00" * 16)
    with pytest.raises(AdapterError, match="not an ORT format model"):
        edge.HostEngine(tmp_path, *_specs(), {"ort_file": "model.ort"})


@pytest.mark.arm64
@pytest.mark.skipif(_arm64.available() is not None, reason=str(_arm64.available()))
def test_ort_file_runs_on_emulated_arm64(tmp_path):
    rootfs = _arm64.ensure_rootfs(ARM64_ROOTFS)
    x = _x(6)
    for name, proto in (("fp32", _proto()), ("int8", _quantized_proto(tmp_path))):
        engine = _compile(proto, tmp_path / name)
        info: dict = {}
        (on_arm,) = engine.run_arm64({"x": x}, rootfs=rootfs, info=info).values()
        (here,) = engine.stand_in()[0].run({"x": x}).values()
        assert info["machine"] == "aarch64" and info["onnxruntime"] == edge.version()
        assert info["qemu_cpu"] == "cortex-a76"  # the profile's core (QEMU's default "max" has SVE)
        if name == "fp32":
            np.testing.assert_allclose(on_arm, _relu_ref(x), rtol=1e-5, atol=1e-5)
        else:  # ARM's int8 kernels may round differently from x86's
            assert _cosine(on_arm, _relu_ref(x)) > 0.999 and _cosine(on_arm, here) > 0.9999
            np.testing.assert_allclose(on_arm, here, rtol=1e-2, atol=0.05)
