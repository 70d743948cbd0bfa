"""Every error class a user can hit: one clear message, non-zero exit, no traceback."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

TESTS = Path(__file__).parent


def _fails(result, code: int, *needles: str) -> str:
    exit_code, out, err = result
    assert exit_code == code, (exit_code, out, err)
    assert "Traceback" not in err + out
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _tiny_onnx(path: Path, domain: str = "", op: str = "Relu", n: int = 1) -> Path:
    nodes = [
        helper.make_node(
            op, ["x" if i == 0 else f"h{i}"], [f"h{i + 1}" if i < n - 1 else "y"], name=f"n{i}", domain=domain
        )
        for i in range(n)
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    opsets = [helper.make_opsetid("", 20)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)
    return path


def test_missing_file(cli, tmp_path):
    _fails(cli("convert", tmp_path / "nope.onnx"), 2, "nope.onnx", "does not exist")


def test_unknown_kind_of_file(cli, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    _fails(cli("convert", notes), 2, "not a model source adapter knows")


def test_file_that_is_not_a_model(cli, tmp_path):
    bad = tmp_path / "random.onnx"
    bad.write_bytes(os.urandom(4096))
    _fails(cli("convert", bad, "-o", tmp_path / "out"), 2, "random.onnx")
    assert not (tmp_path / "out").exists()


def test_truncated_onnx(cli, tmp_path):
    good = _tiny_onnx(tmp_path / "good.onnx", n=3)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _fails(cli("convert", cut, "-o", tmp_path / "out"), 2, "cut.onnx")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("models:nothing", "names no callable"),
        ("models:NOT_CALLABLE", "not a callable"),
        ("models:not_a_tuple", "expected (module, example_inputs)"),
        ("models:raises", "weights file is corrupt"),
        ("no_such_module_xyz:make", "Cannot import module 'no_such_module_xyz'"),
    ],
)
def test_bad_factory(cli, tmp_path, spec, needle):
    _fails(cli("convert", spec, "-o", tmp_path / "out"), 2, needle)


def test_factory_file_missing(cli, tmp_path):
    _fails(cli("convert", f"{tmp_path}/absent.py:make"), 2, "absent.py", "does not exist")


def test_export_failure(cli, tmp_path):
    _fails(cli("convert", "models:data_dependent", "-o", tmp_path / "out"), 3, "torch.export could not trace")


def test_unsupported_torch_ops_listed_at_once(cli, tmp_path):
    err = _fails(
        cli("convert", "models:custom_ops", "-o", tmp_path / "out"),
        4,
        "cannot run 2 node(s)",
        "adapter_tests::mystery",
        "adapter_tests::enigma",
    )
    assert "module 'odd'" in err  # the nn.Module path of the second op


def test_unsupported_onnx_ops_listed_at_once(cli, tmp_path):
    model = _tiny_onnx(tmp_path / "custom.onnx", domain="com.example", op="Mystery", n=3)
    err = _fails(cli("convert", model, "-o", tmp_path / "out"), 4, "cannot run 3 node(s)")
    for node in ("n0", "n1", "n2"):
        assert f"node '{node}'" in err
    assert not (tmp_path / "out").exists()


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".pkl"])
def test_pickle_checkpoint_is_never_opened(cli, tmp_path, suffix):
    marker = tmp_path / "pwned"
    evil = tmp_path / f"model{suffix}"
    evil.write_bytes(pickle.dumps(_Payload(str(marker))))
    _fails(cli("convert", evil), 2, "never unpickles")
    assert not marker.exists()


def _onnx_with_external(folder: Path, location: str) -> Path:
    tensor = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    node = helper.make_node("Add", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [tensor],
    )
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)
    return path


@pytest.mark.parametrize(
    ("location", "needle"),
    [("/etc/passwd", "absolute path"), ("../secret.bin", "climbs out"), ("link.bin", "symbolic link")],
)
def test_external_data_outside_folder_refused(cli, tmp_path, location, needle):
    folder = tmp_path / "m"
    folder.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.zeros(4, np.float32).tobytes())
    (folder / "link.bin").symlink_to(secret)
    model = _onnx_with_external(folder, location)
    _fails(cli("convert", model, "-o", tmp_path / "out"), 2, needle)


def _pt2(tmp_path: Path) -> Path:
    import torch
    from models import mlp

    module, inputs, _ = mlp()
    program = torch.export.export(module, (), inputs)
    path = tmp_path / "mlp.pt2"
    torch.export.save(program, path)
    return path


def _rewrite_zip(src: Path, dst: Path, edit) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            name, data = edit(info.filename, zin.read(info.filename))
            zout.writestr(name, data)


def test_pt2_with_pickled_weights_refused(cli, tmp_path):
    good = _pt2(tmp_path)

    def mark_pickled(name, data):
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            for meta in config["config"].values():
                meta["use_pickle"] = True
            data = json.dumps(config).encode()
        return name, data

    forged = tmp_path / "forged.pt2"
    _rewrite_zip(good, forged, mark_pickled)
    _fails(cli("convert", forged, "-o", tmp_path / "out"), 2, "would unpickle", "--trust-source")


def test_pt2_zip_slip_refused(cli, tmp_path):
    good = _pt2(tmp_path)
    slipped = tmp_path / "slip.pt2"
    _rewrite_zip(good, slipped, lambda n, d: (("../../evil.txt" if n.endswith("byteorder") else n), d))
    _fails(cli("convert", slipped, "-o", tmp_path / "out"), 2, "outside the archive")


def test_bad_dynamic_syntax(cli, tmp_path):
    _fails(cli("convert", "models:mlp", "--dynamic", "x=0:batch"), 2, "in --dynamic 'x=0:batch'")


def test_dynamic_names_unknown_input(cli, tmp_path):
    _fails(cli("convert", "models:mlp", "--dynamic", "y:0=batch", "-o", tmp_path / "o"), 3, "does not take")


def test_unknown_target_lists_known(cli, tmp_path):
    err = _fails(cli("convert", "models:mlp", "--target", "nvidia-z9000"), 8, "nvidia-z9000")
    assert "intel-xeon-spr" in err


def test_info_on_non_artifact(cli, tmp_path):
    _fails(cli("info", tmp_path), 9, "no manifest.json")


def test_output_folder_that_is_not_an_artifact_is_kept(cli, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("do not lose me")
    _fails(cli("convert", "models:mlp", "-o", out, "--no-bench"), 9, "not an engine artifact")
    assert (out / "thesis.txt").read_text() == "do not lose me"


@pytest.fixture(scope="module")
def mlp_artifact(tmp_path_factory):
    from adapter import ConvertOptions, convert

    out = tmp_path_factory.mktemp("mlp") / "engine"
    convert("models:mlp", out, ConvertOptions(benchmark=False))
    return out


@pytest.mark.parametrize(
    ("feed", "needle"),
    [
        ({"input": np.zeros((2, 8), np.float32)}, "unknown input(s) input"),
        ({"x": np.zeros((2, 8), np.float64)}, "dtype float64, expected float32"),
        ({"x": np.zeros((2, 8, 1), np.float32)}, "rank 3"),
        ({"x": np.zeros((2, 5), np.float32)}, "axis 1 is 5, expected 8"),
        ({"x": np.zeros((0, 8), np.float32)}, "outside [1..4096]"),
    ],
)
def test_run_with_wrong_inputs(cli, tmp_path, mlp_artifact, feed, needle):
    path = tmp_path / "in.npz"
    np.savez(path, **feed)
    _fails(cli("run", mlp_artifact, "--inputs", path), 6, needle)
    # the engine stays usable afterwards
    np.savez(path, x=np.ones((3, 8), np.float32))
    code, out, err = cli("run", mlp_artifact, "--inputs", path)
    assert code == 0, err


def test_run_refuses_object_arrays(cli, tmp_path, mlp_artifact):
    path = tmp_path / "in.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    _fails(cli("run", mlp_artifact, "--inputs", path), 2, "not a readable .npz")


def test_real_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "adapter.cli.main", "convert", str(tmp_path / "missing.pt2")],
        capture_output=True,
        text=True,
        cwd=TESTS,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_debug_shows_traceback(cli, tmp_path):
    code, out, err = cli("--debug", "convert", tmp_path / "nope.onnx")
    assert code == 2 and "Traceback" in err
