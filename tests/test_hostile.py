"""Hostile and malformed model files (issue 8, point 1).

Every case goes through the CLI in-process (``convert`` and ``check``) and must end with
one clear message naming the file and the problem, a non-zero exit, no traceback, and
nothing written: no artifact folder, no staging folder, no cache entry. Payloads that
would run code leave a marker file if they ever run; it must not exist afterwards.
``tests/test_errors.py`` covers the simpler cases (missing file, random bytes, pickled
checkpoints through ``convert``, the basic external-data escapes); this file goes further.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper


@pytest.fixture(autouse=True)
def _own_cache(fresh_cache):
    return fresh_cache


def _refused(cli, tmp_path: Path, model: Path, *needles: str, code: int = 2, commands=("convert", "check")) -> str:
    """Run convert and check on ``model``; both must fail cleanly and write nothing."""
    from adapter.core import artifact

    message = ""
    for command in commands:
        args = [command, model] + (["-o", tmp_path / "out", "--no-bench"] if command == "convert" else [])
        exit_code, out, err = cli(*args)
        assert exit_code == code, (command, exit_code, out, err)
        assert "Traceback" not in out + err and "internal error" not in err, err
        assert model.name in err, (model.name, err)
        for needle in needles:
            assert needle in err, (needle, err)
        message = " ".join(err.split())
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "staging folder left behind"
    engines = artifact.cache_root() / "engines"
    assert not engines.exists() or not any(engines.iterdir()), "a cache entry was written"
    print(f"\n  refused {model.name}: {message}")
    return message


class _System:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Open:
    """Unpickling this creates a file through ``open``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# --- pickled checkpoints -------------------------------------------------------------------


@pytest.mark.parametrize("payload", [_System, _Open], ids=["os.system", "open"])
@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_code_running_checkpoint(cli, tmp_path, suffix, payload):
    marker = tmp_path / "marker"
    evil = tmp_path / f"evil{suffix}"
    evil.write_bytes(pickle.dumps(payload(marker)))
    _refused(cli, tmp_path, evil, "never unpickles")
    assert not marker.exists()


def test_code_running_checkpoint_in_torch_zip_format(cli, tmp_path):
    import torch

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({"state": _System(marker)}, evil)
    _refused(cli, tmp_path, evil, "never unpickles")
    assert not marker.exists()


# --- .pt2 archives -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_pt2(tmp_path_factory) -> Path:
    import torch
    from models import mlp

    module, inputs, _ = mlp()
    path = tmp_path_factory.mktemp("pt2") / "mlp.pt2"
    torch.export.save(torch.export.export(module, (), inputs), path)
    return path


def _rewrite(src: Path, dst: Path, edit, extra: dict[str, bytes] | None = None) -> Path:
    """Copy a zip member by member through ``edit(name, data) -> (name, data) | None``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            edited = edit(info.filename, zin.read(info.filename))
            if edited is not None:
                zout.writestr(edited[0], edited[1])
        for name, data in (extra or {}).items():
            zout.writestr(name, data)
    return dst


@pytest.mark.parametrize(
    "bad_name",
    ["../../escaped.txt", "/tmp/absolute.txt", "mlp/..\\..\\escaped.txt", "mlp/data/../../../escaped.txt"],
    ids=["dotdot", "absolute", "backslash", "inner-dotdot"],
)
def test_pt2_member_escaping_the_archive(cli, tmp_path, good_pt2, bad_name):
    slipped = _rewrite(good_pt2, tmp_path / "slip.pt2", lambda n, d: (n, d), {bad_name: b"owned"})
    _refused(cli, tmp_path, slipped, "outside the archive")
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_pt2_symlink_member(cli, tmp_path, good_pt2):
    slipped = tmp_path / "link.pt2"
    _rewrite(good_pt2, slipped, lambda n, d: (n, d))
    with zipfile.ZipFile(slipped, "a") as archive:
        info = zipfile.ZipInfo("mlp/data/weights/weight_9")
        info.external_attr = 0o120777 << 16
        archive.writestr(info, "/etc/passwd")
    _refused(cli, tmp_path, slipped, "symbolic-link member")


def test_pt2_zip_bomb(cli, tmp_path, good_pt2):
    bomb = tmp_path / "bomb.pt2"
    _rewrite(good_pt2, bomb, lambda n, d: (n, d))
    with zipfile.ZipFile(bomb, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("mlp/data/weights/padding", b"\0" * (8 << 20))
    _refused(cli, tmp_path, bomb, "zip bomb")


def test_pt2_pickled_sample_inputs_never_run(cli, tmp_path, good_pt2):
    """The archive's own ``sample_inputs/model.pt`` is loaded with torch's safe unpickler only."""
    import torch

    marker = tmp_path / "marker"
    buffer = io.BytesIO()
    torch.save((_System(marker),), buffer)

    def swap(name, data):
        return (name, buffer.getvalue()) if name.endswith("sample_inputs/model.pt") else (name, data)

    forged = _rewrite(good_pt2, tmp_path / "inputs.pt2", swap)
    _refused(cli, tmp_path, forged, "could not read", code=2, commands=("convert",))
    assert not marker.exists()


def test_pt2_custom_object_constant(cli, tmp_path, good_pt2):
    marker = tmp_path / "marker"
    forged = _rewrite(
        good_pt2,
        tmp_path / "obj.pt2",
        lambda n, d: (n, d),
        {"mlp/data/constants/custom_obj_0": pickle.dumps(_System(marker))},
    )
    _refused(cli, tmp_path, forged, "would unpickle", "custom_obj_0", "--trust-source")
    assert not marker.exists()


def test_pt2_legacy_pickled_payload(cli, tmp_path, good_pt2):
    marker = tmp_path / "marker"
    forged = _rewrite(
        good_pt2,
        tmp_path / "legacy.pt2",
        lambda n, d: (n, d),
        {"mlp/data/weights/legacy.pt": pickle.dumps(_System(marker))},
    )
    _refused(cli, tmp_path, forged, "legacy pickled payload")
    assert not marker.exists()


def test_pt2_manifest_lists_missing_weights(cli, tmp_path, good_pt2):
    """The weights manifest names files the archive does not hold."""
    forged = _rewrite(good_pt2, tmp_path / "holes.pt2", lambda n, d: None if n.endswith("weights/weight_2") else (n, d))
    _refused(cli, tmp_path, forged, "could not read", commands=("convert",))


def test_pt2_manifest_not_json(cli, tmp_path, good_pt2):
    forged = _rewrite(
        good_pt2,
        tmp_path / "garbled.pt2",
        lambda n, d: (n, d[: len(d) // 2]) if n.endswith("model_weights_config.json") else (n, d),
    )
    _refused(cli, tmp_path, forged, "unreadable manifest")


def test_pt2_forged_weight_shape(cli, tmp_path, good_pt2):
    """The manifest claims a weight far bigger than its file."""

    def grow(name, data):
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            config["config"]["fc1.weight"]["tensor_meta"]["sizes"] = [{"as_int": 1 << 20}, {"as_int": 1 << 20}]
            data = json.dumps(config).encode()
        return name, data

    forged = _rewrite(good_pt2, tmp_path / "shape.pt2", grow)
    _refused(cli, tmp_path, forged, "could not read", commands=("convert",))


def test_pt2_that_is_not_a_zip(cli, tmp_path):
    fake = tmp_path / "fake.pt2"
    fake.write_bytes(b"PK\x03\x04" + os.urandom(2000))
    _refused(cli, tmp_path, fake, "not a readable .pt2 archive")


def test_zip_that_is_not_an_export(cli, tmp_path):
    other = tmp_path / "docs.pt2"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("word/document.xml", "<doc/>")
    _refused(cli, tmp_path, other, "not a torch.export .pt2 archive")


def test_truncated_pt2(cli, tmp_path, good_pt2):
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(good_pt2.read_bytes()[: good_pt2.stat().st_size * 2 // 3])
    _refused(cli, tmp_path, cut, "not a readable .pt2 archive")


# --- ONNX files ----------------------------------------------------------------------------


def _model(nodes, initializers=(), inputs=None, outputs=None, opset=20, domain_opsets=()):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])]
    outputs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, v) for d, v in domain_opsets]]
    return helper.make_model(graph, opset_imports=opsets)


def _save(model, path: Path) -> Path:
    onnx.save(model, path)
    return path


def _external_weight(location: str, name: str = "w") -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[4])
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    return tensor


def _external_model(folder: Path, location: str, in_constant: bool = False) -> Path:
    folder.mkdir(exist_ok=True)
    if in_constant:  # the tensor hides in a Constant node's attribute, not in the initializers
        nodes = [
            helper.make_node("Constant", [], ["w"], name="const_w", value=_external_weight(location)),
            helper.make_node("Add", ["x", "w"], ["y"], name="add"),
        ]
        return _save(_model(nodes), folder / "model.onnx")
    return _save(
        _model([helper.make_node("Add", ["x", "w"], ["y"], name="add")], [_external_weight(location)]),
        folder / "model.onnx",
    )


@pytest.mark.parametrize("in_constant", [False, True], ids=["initializer", "constant-node"])
@pytest.mark.parametrize(
    ("location", "needle"),
    [
        ("/etc/passwd", "absolute path"),
        ("../secret.bin", "climbs out"),
        ("data/../../secret.bin", "climbs out"),
        ("C:\\secret.bin", "absolute path"),
        ("link.bin", "symbolic link"),
        ("linkdir/secret.bin", "symbolic link"),
        ("hard.bin", "several hard links"),
    ],
)
def test_external_data_escapes(cli, tmp_path, location, needle, in_constant):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "link.bin").symlink_to(secret)
    (folder / "linkdir").symlink_to(tmp_path, target_is_directory=True)
    os.link(secret, folder / "hard.bin")
    model = _external_model(folder, location, in_constant)
    _refused(cli, tmp_path, model, needle)


def test_external_data_file_missing(cli, tmp_path):
    model = _external_model(tmp_path / "m", "weights.bin")
    _refused(cli, tmp_path, model, "does not exist")


def test_truncated_onnx_with_initializer(cli, tmp_path):
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4], np.ones(4, np.float32).tobytes(), raw=True)
    good = _save(_model([helper.make_node("Add", ["x", "w"], ["y"], name="add")], [weight]), tmp_path / "g.onnx")
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(good.read_bytes()[:-7])
    _refused(cli, tmp_path, cut, "not a readable ONNX model")


@pytest.mark.parametrize(
    "content", [b"", b'{"hello": 1}\n', b"\x89PNG\r\n\x1a\n" + bytes(64)], ids=["empty", "json", "png"]
)
def test_onnx_suffix_but_not_a_model(cli, tmp_path, content):
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(content)
    _refused(cli, tmp_path, fake)


def test_graph_with_a_cycle(cli, tmp_path):
    nodes = [
        helper.make_node("Add", ["x", "b"], ["a"], name="add_a"),
        helper.make_node("Relu", ["a"], ["b"], name="relu_b"),
        helper.make_node("Identity", ["a"], ["y"], name="out"),
    ]
    _refused(cli, tmp_path, _save(_model(nodes), tmp_path / "cycle.onnx"), "cycle", "add_a", "relu_b")


def test_graph_with_a_missing_initializer(cli, tmp_path):
    nodes = [helper.make_node("Add", ["x", "w"], ["y"], name="add_w")]
    _refused(cli, tmp_path, _save(_model(nodes), tmp_path / "missing.onnx"), "add_w", "'w'", "missing initializer")


def test_missing_value_inside_a_subgraph(cli, tmp_path):
    branch = helper.make_graph(
        [helper.make_node("Add", ["x", "ghost"], ["z"], name="inner_add")],
        "branch",
        [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4])],
    )
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch, else_branch=branch)]
    model = _save(_model(nodes, [cond]), tmp_path / "sub.onnx")
    _refused(cli, tmp_path, model, "inner_add", "'ghost'")


def test_initializer_shape_overflows_int64(cli, tmp_path):
    huge = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2**40, 2**40], raw_data=b"")
    nodes = [helper.make_node("Add", ["x", "w"], ["y"], name="add_w")]
    _refused(cli, tmp_path, _save(_model(nodes, [huge]), tmp_path / "overflow.onnx"), "'w'", "overflows int64")


def test_input_shape_overflows_int64(cli, tmp_path):
    shape = [2**32, 2**32]
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    _refused(cli, tmp_path, _save(model, tmp_path / "overflow_in.onnx"), "'x'", "overflows int64")


@pytest.mark.parametrize(("domain", "version"), [("", 99), ("", 0), ("ai.onnx.ml", 77)])
def test_unknown_opset(cli, tmp_path, domain, version):
    opset, extra = (version, ()) if domain == "" else (20, ((domain, version),))
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], opset=opset, domain_opsets=extra)
    path = _save(model, tmp_path / "opset.onnx")
    _refused(cli, tmp_path, path, f"opset {version}", "knows versions 1 to")
