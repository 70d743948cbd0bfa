"""The emulated ARM64 machine: an arm64 Debian root filesystem run through qemu-aarch64.

Builds the root filesystem once (about a minute; reused from the user's cache or
``$ADAPTER_ARM64_ROOTFS``), then runs small engines in it and compares with numpy.
Skipped with the reason when qemu-aarch64 or debootstrap is missing.
"""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest

from adapter.backends import _arm64
from adapter.core.errors import AdapterError

pytestmark = [pytest.mark.arm64, pytest.mark.skipif(_arm64.available() is not None, reason=str(_arm64.available()))]

ROOTFS = _arm64.default_rootfs()
"""Resolved at import, before conftest points ADAPTER_CACHE_DIR at a per-session folder,
so every session reuses one root filesystem instead of building its own."""


@pytest.fixture(scope="module")
def rootfs():
    return _arm64.ensure_rootfs(ROOTFS)


def dense_relu(path, w: np.ndarray, b: np.ndarray) -> None:
    """Save ``relu(x @ w + b)`` as an ONNX file (opset 17)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["pre"]),
            helper.make_node("Relu", ["pre"], ["y"]),
        ],
        "dense_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, w.shape[1]])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def test_onnx_model_runs_as_aarch64_and_matches_numpy(rootfs, tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    x = rng.standard_normal((4, 16)).astype(np.float32)
    engine = tmp_path / "engine"
    engine.mkdir()
    dense_relu(engine / "model.onnx", w, b)
    info: dict = {}
    spec = {"kind": "ort", "model": "model.onnx", "inputs": ["x"], "outputs": ["y"]}
    out = _arm64.run_artifact(rootfs, engine, spec, {"x": x}, info=info)

    assert info["machine"] == "aarch64" and info["uname"] == "aarch64"
    assert info["onnxruntime"] == "1.32.0" and info["qemu_cpu"] == _arm64.CPU == "cortex-a76"
    expected = np.maximum(x @ w + b, 0)
    assert set(out) == {"y"} and out["y"].shape == (4, 8) and out["y"].dtype == np.float32
    np.testing.assert_allclose(out["y"], expected, rtol=1e-5, atol=1e-5)
    # The comparison can fail: Relu zeroed some entries and kept others, and another
    # bias gives an answer the engine's output is far from.
    assert (out["y"] == 0).any() and (out["y"] > 0).any()
    assert np.abs(out["y"] - np.maximum(x @ w + b + 0.5, 0)).max() > 0.1


def test_rootfs_is_reused(rootfs):
    messages: list[str] = []
    assert _arm64.ensure_rootfs(ROOTFS, say=messages.append) == rootfs
    assert messages == []  # nothing built
    assert (rootfs / _arm64.STAMP).is_file()
    assert not list(rootfs.parent.glob(f".{rootfs.name}.build-*"))


def test_failing_run_reports_the_runtime_error(rootfs, tmp_path):
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "model.onnx").write_bytes(b"not an onnx model")
    spec = {"kind": "ort", "model": "model.onnx", "inputs": ["x"], "outputs": ["y"]}
    # the root filesystem is shared between sessions: folders a killed session left are not this run's
    before = set((rootfs / "tmp").glob("adapter-run-*"))
    with pytest.raises(AdapterError, match="arm64 run of 'engine' failed"):
        _arm64.run_artifact(rootfs, engine, spec, {"x": np.zeros((1, 2), np.float32)})
    assert not set((rootfs / "tmp").glob("adapter-run-*")) - before  # work folder removed


@pytest.mark.parametrize(
    "spec, problem",
    [
        ({"kind": "coreml", "model": "model.onnx", "inputs": []}, "Unknown artifact kind"),
        ({"kind": "ort", "model": "../model.onnx", "inputs": []}, "not a file inside"),
        ({"kind": "ort", "model": "model.onnx", "inputs": ["x", "z"]}, "Inputs missing .*z"),
    ],
)
def test_bad_spec_is_refused_before_running(rootfs, tmp_path, spec, problem):
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(AdapterError, match=problem):
        _arm64.run_artifact(rootfs, tmp_path, spec, {"x": np.zeros(1, np.float32)})


def _tvm_library(path) -> None:
    """Cross-compile a tiny Relax function (relu(x @ w) and that plus one) for aarch64."""
    import tvm
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((4, 16), "float32"), w: R.Tensor((16, 8), "float32")):
            with R.dataflow():
                y = R.nn.relu(R.matmul(x, w))
                z = R.add(y, R.const(1.0, "float32"))
                R.output(y, z)
            return (y, z)

    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"})
    tvm.compile(Module, target=target).export_library(str(path), cc="aarch64-linux-gnu-g++")


@pytest.mark.skipif(
    importlib.util.find_spec("tvm") is None or shutil.which("aarch64-linux-gnu-g++") is None,
    reason="needs apache-tvm and aarch64-linux-gnu-g++ (Debian package g++-aarch64-linux-gnu)",
)
def test_tvm_library_runs_as_aarch64_and_matches_numpy(rootfs, tmp_path):
    engine = tmp_path / "engine"
    engine.mkdir()
    _tvm_library(engine / "lib.so")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 16)).astype(np.float32)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    info: dict = {}
    spec = {"kind": "tvm", "model": "lib.so", "inputs": ["x", "w"], "outputs": ["y", "z"]}
    out = _arm64.run_artifact(rootfs, engine, spec, {"x": x, "w": w}, info=info)
    assert info["machine"] == "aarch64" and info["apache-tvm"] == "0.27.0.post1"
    y = np.maximum(x @ w, 0)
    np.testing.assert_allclose(out["y"], y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["z"], y + 1, rtol=1e-5, atol=1e-5)
    assert np.abs(out["y"] - x @ w).max() > 0.1  # Relu did something: a plain MatMul would fail
