"""TVM backend: x86 engines that run here, and aarch64 / CUDA / ROCm builds checked with the targets' tools.

Engines for another machine are verified through a build of the same graph for this CPU
(the stand-in); their kernels are checked with cuobjdump / llvm-readelf / readelf, and the
aarch64 library also runs under qemu on an arm64 root filesystem (marker ``arm64``).
"""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest
import torch

from adapter import ConvertOptions, convert, load
from adapter.backends import _arm64
from adapter.core.errors import AdapterError, InputMismatchError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tvm") is None, reason="apache-tvm is not installed (pip install 'adapter[tvm]')"
)
ARM64_ROOTFS = _arm64.default_rootfs()
"""The user's arm64 root filesystem, resolved at import: the tests here run with a fresh engine
cache each (``_own_cache``), and resolved there it would be built anew (about a minute) every session."""
ARM64_MISSING = _arm64.available()


@pytest.fixture(autouse=True)
def _own_cache(fresh_cache):
    return fresh_cache


def _eager(x: np.ndarray) -> np.ndarray:
    from models import mlp

    module, _, _ = mlp()
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


def _convert(tmp_path, target: str, name: str = "e"):
    options = ConvertOptions(benchmark=False, backend="tvm", target=target)
    return convert("models:mlp", tmp_path / name, options)


def test_host_engine_runs_here_at_its_fixed_shape_and_matches_eager(tmp_path):
    result = _convert(tmp_path, "host")
    manifest = result.manifest
    config = manifest["backend"]["config"]
    assert manifest["backend"]["name"] == "tvm" and config["kernels"]["lib.so"] == "Advanced Micro Devices X86-64"
    assert manifest["verification"]["passed"] and "engine_ran" not in manifest["verification"]
    assert [s["shape"] for s in manifest["inputs"]] == [[2, 8]]  # the example's shape, declared
    engine = load(tmp_path / "e")
    assert engine.runs_here
    x = np.random.default_rng(5).standard_normal((2, 8)).astype(np.float32)
    (out,) = engine.run({"x": x}).values()
    np.testing.assert_allclose(out, _eager(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(InputMismatchError, match="x"):
        engine.run({"x": np.zeros((3, 8), np.float32)})  # another batch: refused before TVM sees it


def test_a_cpu_target_with_instructions_this_host_lacks_is_verified_through_the_stand_in(tmp_path):
    from adapter.backends import tvm as tvm_backend

    missing = tvm_backend._missing_features({"kind": "llvm", "mcpu": "sapphirerapids"})
    result = _convert(tmp_path, "intel-xeon-spr")
    ver = result.manifest["verification"]
    if missing:  # this CPU lacks AVX-512/AMX: running the library would be an illegal instruction
        assert ver["engine_ran"] is False and "llvm build of the same graph" in ver["verified_with"]
        assert not load(tmp_path / "e").runs_here
    else:
        assert "engine_ran" not in ver
    assert ver["passed"]


@pytest.mark.parametrize(("target", "arch"), [("nvidia-a100", "sm_80"), ("nvidia-h100", "sm_90")])
def test_cuda_kernels_are_cubins_for_the_targets_architecture(tmp_path, target, arch):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc (CUDA toolkit) is not on PATH")
    from adapter.backends.tvm import cuda_architectures

    result = _convert(tmp_path, target)
    config, ver = result.manifest["backend"]["config"], result.manifest["verification"]
    cubin = f"kernels/cuda0.{arch}.cubin"
    fatbin = f"kernels/cuda0.{arch}.fatbin"
    assert cubin in config["files"] and fatbin in config["files"]
    # read again with cuobjdump here, not only the figures the build recorded
    assert cuda_architectures(tmp_path / "e" / cubin) == {"elf": [arch], "ptx": []}
    fat = cuda_architectures(tmp_path / "e" / fatbin)
    assert fat["elf"] == [arch] and fat["ptx"], fat
    assert config["kernels"][cubin]["elf"] == [arch]
    assert ver["passed"] and ver["engine_ran"] is False and result.manifest["latency"] is None
    engine = load(tmp_path / "e")
    assert not engine.runs_here
    with pytest.raises(AdapterError, match="not this machine"):
        engine.run({"x": np.zeros((2, 8), np.float32)})


@pytest.mark.parametrize(("target", "arch"), [("amd-mi250x", "gfx90a"), ("amd-mi300x", "gfx942")])
def test_rocm_code_objects_are_for_the_targets_gfx(tmp_path, target, arch):
    from adapter.backends import _tvm_rocm

    try:
        _tvm_rocm.rocm_path()
        _tvm_rocm.find_lld()
    except AdapterError as exc:
        pytest.skip(str(exc))
    result = convert("models:mlp", tmp_path / "e", ConvertOptions(benchmark=False, target=target))  # default: tvm
    config = result.manifest["backend"]["config"]
    assert result.manifest["backend"]["name"] == "tvm"
    objects = [f for f in config["files"] if f.endswith(".hsaco")]
    assert objects and all(_tvm_rocm.code_object_arch(tmp_path / "e" / f) == arch for f in objects)
    assert config["triton_kernels"] == []  # an MLP has no pattern the Triton kernels serve
    assert result.manifest["verification"]["passed"] and result.manifest["verification"]["engine_ran"] is False


def test_aarch64_library_is_cross_compiled_for_arm(tmp_path):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ is not installed (apt-get install g++-aarch64-linux-gnu)")
    from adapter.backends.tvm import elf_machine

    result = _convert(tmp_path, "arm-cortex-a76")
    assert elf_machine(tmp_path / "e" / "lib.so") == "AArch64"
    assert result.manifest["backend"]["config"]["kernels"]["lib.so"] == "AArch64"
    assert result.manifest["verification"]["engine_ran"] is False


@pytest.mark.arm64
def test_aarch64_library_runs_under_qemu_and_matches_eager(tmp_path):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ is not installed (apt-get install g++-aarch64-linux-gnu)")
    if ARM64_MISSING is not None:
        pytest.skip(str(ARM64_MISSING))
    _convert(tmp_path, "arm-cortex-a76")
    engine = load(tmp_path / "e")
    x = np.random.default_rng(6).standard_normal((2, 8)).astype(np.float32)
    spec = {"kind": "tvm", "model": "lib.so", "inputs": engine.config["input_order"], "outputs": [o.name for o in engine.outputs]}
    info: dict = {}
    (out,) = _arm64.run_artifact(_arm64.ensure_rootfs(ARM64_ROOTFS), tmp_path / "e", spec, {"x": x}, info=info).values()
    assert info["machine"] == "aarch64"
    expected = _eager(x)
    cosine = float(np.dot(out.ravel(), expected.ravel()) / np.linalg.norm(out) / np.linalg.norm(expected))
    assert cosine >= 0.9999 and np.abs(out - expected).max() <= 1e-4


def test_fixed_shapes_must_cover_every_input():
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from adapter.backends.base import fix_shapes

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    with pytest.raises(InputMismatchError) as caught:
        fix_shapes(model, {"a": [2, 4, 1]})
    assert "'a' has rank 2" in str(caught.value) and "'b' has no fixed shape" in str(caught.value)
    fixed = fix_shapes(model, {"a": [2, 4], "b": [2, 4]})
    assert [list(v.shape) for v in fixed.graph.inputs] == [[2, 4], [2, 4]]
    assert [str(d) for d in model.graph.inputs[0].shape] == ["n", "4"]  # the original is untouched


def test_tuning_runs_apart_and_a_crash_is_a_clear_error(tmp_path):
    """MetaSchedule runs in a child process; apache-tvm 0.27.0.post1 crashes there on this machine.

    Either the records land in the artifact, or the error says how the tuner died; the
    converting process survives both.
    """
    overrides = (("tuning_trials", 4), ("tuning_timeout_s", 120))
    options = ConvertOptions(benchmark=False, backend="tvm", backend_options=overrides)
    try:
        result = convert("models:mlp", tmp_path / "e", options)
    except AdapterError as exc:
        assert "MetaSchedule tuning (4 trials)" in str(exc) and "tuning_trials" in str(exc)
        return
    assert any(f.startswith("tuning/") for f in result.manifest["backend"]["config"]["files"])
    assert result.manifest["verification"]["passed"]
