"""ROCm code objects built with TVM 0.27 on a machine without a GPU (adapter.backends._tvm_rocm).

No GPU runs the kernels here, so the GPU builds are checked structurally (a v5 HSA shared object per device
module, for the requested arch), and the numerics of the same Relax module are checked on the host (``llvm``)
against numpy.  Skips only without TVM or the ROCm device libraries; CI installs both (plus lld-19).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from adapter.backends import _tvm_rocm
from adapter.backends._tvm_rocm import code_object_arch, rocm_build, rocm_path, save_code_objects
from adapter.core.errors import AdapterError, BackendUnavailableError

tvm = pytest.importorskip("tvm", reason="Apache TVM is not installed (pip install 'adapter[tvm]')")
from tvm import relax  # noqa: E402
from tvm.script import relax as R  # noqa: E402

try:
    rocm_path()
except BackendUnavailableError as exc:
    pytest.skip(f"ROCm device libraries not installed: {exc}", allow_module_level=True)

ARCHS = ("gfx90a", "gfx942")
BATCH, IN, OUT = 4, 32, 16


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(0)
    return rng.standard_normal((IN, OUT)).astype("float32"), rng.standard_normal(OUT).astype("float32")


@pytest.fixture(scope="module")
def module(weights):
    """main(x) = softmax(relu(x @ w + b)), one Relax function with the weights as constants."""
    w, b = weights
    builder = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((BATCH, IN), "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            y = builder.emit(relax.op.matmul(x, relax.const(w)))
            y = builder.emit(relax.op.add(y, relax.const(b)))
            y = builder.emit(relax.op.nn.relu(y))
            out = builder.emit_output(relax.op.nn.softmax(y, axis=-1))
        builder.emit_func_output(out)
    return builder.get()


def reference(x, w, b):
    y = np.maximum(x @ w + b, 0.0)
    e = np.exp(y - y.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def rocm_target(arch: str):
    return tvm.target.Target({"kind": "rocm", "mcpu": arch})


@pytest.fixture(scope="module")
def built(module, tmp_path_factory):
    """Per arch: (folder, names written by save_code_objects, the RocmBuild record)."""
    out = {}
    for arch in ARCHS:
        with rocm_build(arch) as record:
            executable = tvm.compile(module, target=rocm_target(arch))
        folder = tmp_path_factory.mktemp(arch)
        out[arch] = (folder, save_code_objects(executable, folder), record)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_code_objects_for_arch(built, arch):
    folder, names, record = built[arch]
    assert names and all(n.startswith("kernels/") and n.endswith(".hsaco") for n in names)
    for name in names:
        data = (folder / name).read_bytes()
        assert data[:4] == b"\x7fELF"
        assert data[7] == 64, "OS/ABI should be AMDGPU HSA"
        assert data[8] == record.code_object_version - 2 == 3, "code object v5 (EI_ABIVERSION 3)"
        assert struct.unpack_from("<H", data, 16)[0] == 3, "a linked shared object (ET_DYN)"
        assert code_object_arch(folder / name) == arch
    # the saved files are the very objects the link step produced
    assert sorted((folder / n).read_bytes() for n in names) == sorted(record.linked)


def test_host_numerics_match_numpy(module, weights):
    executable = tvm.compile(module, target=tvm.target.Target("llvm"))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    x = np.random.default_rng(1).standard_normal((BATCH, IN)).astype("float32")
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, reference(x, *weights), rtol=1e-5, atol=1e-6)
    assert save_code_objects(executable, Path("/nonexistent")) == []  # no device module, nothing written


def test_callbacks_and_env_restored(module):
    import tvm_ffi

    names = (_tvm_rocm.LINK_CALLBACK, _tvm_rocm.BITCODE_CALLBACK)
    before = [tvm_ffi.get_global_func(n).__chandle__() for n in names]
    env = os.environ.get("ROCM_PATH")
    with rocm_build("gfx90a"):
        assert [tvm_ffi.get_global_func(n).__chandle__() for n in names] != before
        assert os.environ["ROCM_PATH"] == str(rocm_path())
    assert [tvm_ffi.get_global_func(n).__chandle__() for n in names] == before
    assert os.environ.get("ROCM_PATH") == env


def test_arch_mismatch_is_reported(module):
    with pytest.raises(AdapterError, match="compiled for gfx942"):
        with rocm_build("gfx90a"):
            tvm.compile(module, target=rocm_target("gfx942"))


def test_bad_arguments():
    with pytest.raises(AdapterError, match="not an AMDGPU architecture"):
        with rocm_build("sm_90"):
            pass
    with pytest.raises(AdapterError, match="code object version 3"):
        with rocm_build("gfx90a", code_object_version=3):
            pass


def test_rocm_path_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("ROCM_PATH", str(tmp_path))
    with pytest.raises(BackendUnavailableError, match="ROCM_PATH") as info:
        rocm_path()
    assert "apt-get install rocm-device-libs" in str(info.value)


def test_code_object_arch_rejects_other_files(tmp_path):
    text = tmp_path / "not-elf.hsaco"
    text.write_text("hello")
    with pytest.raises(AdapterError):
        code_object_arch(text)
    with pytest.raises(AdapterError, match="does not exist"):
        code_object_arch(tmp_path / "missing.hsaco")
