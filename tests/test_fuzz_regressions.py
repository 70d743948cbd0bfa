"""Regression cases of the fuzz campaigns (``tests/test_fuzz.py``, ``benchmarks/fuzz_campaign.py``).

Every distinct failure a campaign found is a case here, built from the seed models by the
mutation that found it: loading and ``adapter check`` must end in a clean error naming the
file (never an internal error, a traceback or a native crash).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto
from test_fuzz import SEEDS, Failure, _assert_ok, _check_cli, _cli_failure, check_onnx_bytes


def _seed_with(change) -> bytes:
    model = onnx.ModelProto()
    model.ParseFromString(SEEDS[0])
    change(model)
    return model.SerializeToString()


def _huge_input_dim(model):
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 2**62


def _undefined_input_dtype(model):
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.UNDEFINED


def test_regression_huge_declared_input_dim(tmp_path):
    """Found: a declared dim of 2**62 (or 2**16 x 2**16) made example inputs exhaust memory; now a SourceError."""
    _assert_ok(check_onnx_bytes(_seed_with(_huge_input_dim), tmp_path), allow_known=False)


def test_regression_undefined_input_dtype(tmp_path):
    """Found: an input of elem_type UNDEFINED raised TypeError from numpy; now a SourceError naming the file."""
    _assert_ok(check_onnx_bytes(_seed_with(_undefined_input_dtype), tmp_path), allow_known=False)


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m.graph.node.append(m.graph.node[0]),  # duplicate node
        lambda m: m.graph.node[0].input.__setitem__(0, m.graph.node[-1].output[0]),  # cycle
        lambda m: m.graph.initializer.__delitem__(0),  # missing initializer
        lambda m: m.opset_import[0].__setattr__("version", 9999),  # opset nobody knows
        lambda m: m.graph.input[0].type.tensor_type.shape.dim[1].__setattr__("dim_value", -5),  # negative dim
    ],
    ids=["duplicate-node", "cycle", "missing-initializer", "opset-9999", "negative-dim"],
)
def test_regression_structural_mutations_are_clean(tmp_path, change):
    """Mutations the campaign ran many times: each loads or fails with a clean error naming the file."""
    _assert_ok(check_onnx_bytes(_seed_with(change), tmp_path), allow_known=False)


def test_regression_truncated_file(tmp_path):
    for cut in (0, 1, 7, len(SEEDS[0]) // 2, len(SEEDS[0]) - 1):
        _assert_ok(check_onnx_bytes(SEEDS[0][:cut], tmp_path), allow_known=False)


@pytest.mark.parametrize(
    "make",
    [lambda: SEEDS[0][: len(SEEDS[0]) // 3], lambda: _seed_with(lambda m: m.graph.initializer.__delitem__(0))],
    ids=["truncated", "missing-initializer"],
)
def test_cli_convert_refuses_mutated_file(cli, tmp_path, make):
    """``adapter convert`` in-process on a damaged file: non-zero exit, one clean message, nothing written."""
    path = tmp_path / "damaged.onnx"
    path.write_bytes(make())
    out = tmp_path / "engine"
    code, stdout, stderr = cli("convert", path, "--backend", "onnxruntime", "-o", out, "--no-bench", "--no-cache")
    text = " ".join((stdout + stderr).split())
    assert code != 0, text
    assert "internal error" not in text and "Traceback" not in text, text
    assert "damaged.onnx" in text, text
    assert not out.exists()


def _conv_without_weights(model):
    model.graph.node[2].op_type = "Conv"  # Relu -> Conv with one input


def _if_to_conv(model):
    model.graph.node[2].op_type = "Conv"  # If -> Conv with one input, its branches left as attributes


def _short_initializer(model):
    table = model.graph.initializer[0]
    table.raw_data = table.raw_data[: len(table.raw_data) // 2]


def _cli_in_subprocess(data: bytes, tmp_path: Path, *args: str) -> Failure | None:
    """``adapter <args> model.onnx`` in its own process: a native crash fails the case, not pytest."""
    import subprocess
    import sys

    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    code = "import sys; from adapter.cli.main import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, *args, str(path), "--backend", "onnxruntime"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if proc.returncode < 0:
        return Failure("CLICrash", f"{args[0]}:signal{-proc.returncode}", proc.stderr[-300:])
    return _cli_failure(proc.stderr, proc.returncode, args[0])


def test_regression_check_survives_one_input_conv(tmp_path):
    """Found: OpenVINO's ONNX frontend segfaulted inside adapter check; it now runs in a child process."""
    _assert_ok(_cli_in_subprocess(_seed_with(_conv_without_weights), tmp_path, "check"), allow_known=False)


def test_openvino_frontend_crash_is_reported_as_the_backends_problem(tmp_path):
    """The crash itself, asked of OpenVINO: a named problem and exit 4, not a dead process."""
    import json
    import subprocess
    import sys

    path = tmp_path / "model.onnx"
    path.write_bytes(_seed_with(_conv_without_weights))
    code = "import sys; from adapter.cli.main import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", code, "check", str(path), "--backend", "openvino", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 4, done.stderr
    report = json.loads(done.stdout)
    (openvino,) = [b for b in report["backends"] if b["backend"] == "openvino"]
    assert not openvino["runs"] and "crashed (SIGSEGV)" in openvino["problem"], openvino
    assert "Traceback" not in done.stderr


def test_regression_check_prints_no_traceback(tmp_path):
    """Found: onnx-ir's shape-inference warning printed a traceback; the CLI now logs one line."""
    model = onnx.ModelProto()
    model.ParseFromString(SEEDS[3])
    _if_to_conv(model)
    _assert_ok(_cli_in_subprocess(model.SerializeToString(), tmp_path, "check"), allow_known=False)


def test_regression_check_short_initializer(tmp_path):
    """Found: OpenVINO's RuntimeError on a short initializer became 'internal error'; now a backend problem."""
    model = onnx.ModelProto()
    model.ParseFromString(SEEDS[2])
    _short_initializer(model)
    _assert_ok(_cli_in_subprocess(model.SerializeToString(), tmp_path, "check"), allow_known=False)


# Found by the second long campaign (seed 2, 1000 CLI cases): four more internal errors in loading.


def _undefined_initializer_type(model):
    model.graph.initializer[0].data_type = 0


def _dangling_graph_output(model):
    model.graph.output[0].name = " "


def _nul_in_external_location(model):
    table = model.graph.initializer[0]
    table.ClearField("raw_data")
    table.data_location = TensorProto.EXTERNAL
    table.external_data.add(key="location", value="table\x00.bin")


def _invalid_utf8_subgraph_name(model) -> bytes:
    branch = next(a for n in model.graph.node for a in n.attribute if a.HasField("g"))
    branch.g.name = "zq\u00e5zq"
    # the two bytes of U+00E5 become a lead byte and an ASCII letter: invalid UTF-8, same length
    return model.SerializeToString().replace("zq\u00e5zq".encode(), b"zq\xe5Azq")


@pytest.mark.parametrize(
    ("seed", "change"), [(1, _undefined_initializer_type), (0, _dangling_graph_output), (0, _nul_in_external_location)]
)
def test_regression_second_campaign(tmp_path, seed, change):
    """Each was 'internal error' from adapter check (TypeError in initializer_bytes, RuntimeError in clone,
    ValueError 'embedded null byte' in pathlib); now a SourceError naming the file, in import and in the CLI."""
    model = onnx.ModelProto()
    model.ParseFromString(SEEDS[seed])
    change(model)
    data = model.SerializeToString()
    _assert_ok(check_onnx_bytes(data, tmp_path), allow_known=False)
    path = tmp_path / "cli.onnx"
    path.write_bytes(data)
    _assert_ok(_check_cli(path), allow_known=False)


def test_regression_invalid_utf8_in_a_name(tmp_path):
    """A name that is not UTF-8 made onnx-ir's serializer fail (SerdeError, 'internal error')."""
    model = onnx.ModelProto()
    model.ParseFromString(SEEDS[3])
    data = _invalid_utf8_subgraph_name(model)
    _assert_ok(check_onnx_bytes(data, tmp_path), allow_known=False)
    path = tmp_path / "cli.onnx"
    path.write_bytes(data)
    _assert_ok(_check_cli(path), allow_known=False)
