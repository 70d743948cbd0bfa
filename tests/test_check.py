"""``adapter check``: every refused node per backend, at once, with fixes; exit 4 when
the backend convert would use cannot run the model."""

from __future__ import annotations

import json

import onnx
from onnx import TensorProto, helper


def _custom_onnx(path, n: int = 3):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info(f"v{n}", TensorProto.FLOAT, [2])
    nodes = [
        helper.make_node("Mystery", [f"v{i}" if i else "x"], [f"v{i + 1}"], domain="com.example", name=f"n{i}")
        for i in range(n)
    ]
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=opsets), path)
    return path


def test_every_backend_runs_a_plain_model(cli):
    code, out, err = cli("check", "models:mlp", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] and report["requested"] == "auto"
    assert {b["backend"] for b in report["backends"]} == {"onnxruntime", "openvino"}
    assert all(b["runs"] and b["nodes"] > 0 and not b["refused"] for b in report["backends"])


def test_refused_node_names_the_backend_that_runs_it(cli):
    code, out, err = cli("check", "models:determinant")
    assert code == 0, err  # auto: ONNX Runtime runs it
    assert "onnxruntime" in out and "runs all" in out
    assert "openvino" in out and "Det" in out and "use --backend onnxruntime" in out


def test_the_named_backend_cannot_run_it(cli):
    code, out, err = cli("check", "models:determinant", "--backend", "openvino", "--json")
    assert code == 4 and "Traceback" not in err
    (only,) = json.loads(out)["backends"]
    assert not only["runs"] and [r["op_type"] for r in only["refused"]] == ["Det"]
    assert "no conversion" in only["refused"][0]["reason"]


def test_all_refused_nodes_at_once_for_every_backend(cli, tmp_path):
    model = _custom_onnx(tmp_path / "custom.onnx")
    code, out, err = cli("check", model, "--json")
    assert code == 4 and "Traceback" not in err
    report = json.loads(out)
    assert not report["ok"]
    for backend in report["backends"]:
        assert [r["node"] for r in backend["refused"]] == ["n0", "n1", "n2"]
        assert all("custom op" in r["suggestion"] for r in backend["refused"])


def test_ops_the_exporter_cannot_translate_are_listed(cli):
    code, _, err = cli("check", "models:custom_ops")
    assert code == 4 and "Traceback" not in err
    assert "adapter_tests::mystery" in err and "adapter_tests::enigma" in err and "module 'odd'" in err
