"""Backends: OpenVINO's engine against eager, and ``--backend auto``'s choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapter import ConvertOptions, convert, load


@pytest.fixture(autouse=True)
def _own_cache(fresh_cache):
    """Engines built here never serve (or come from) other tests' conversions."""
    return fresh_cache


def _eager(factory, feed: dict[str, np.ndarray]) -> np.ndarray:
    module, _, _ = factory()
    with torch.inference_mode():
        return module(**{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()


def test_openvino_engine_matches_eager(tmp_path):
    from models import mlp

    result = convert("models:mlp", tmp_path / "e", ConvertOptions(benchmark=False, backend="openvino"))
    assert result.manifest["backend"]["name"] == "openvino"
    assert result.manifest["backend"]["config"]["precision"] == "f32"
    engine = load(tmp_path / "e")
    x = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)
    (out,) = engine.run({"x": x}).values()
    np.testing.assert_allclose(out, _eager(mlp, {"x": x}), rtol=1e-5, atol=1e-5)


def test_auto_keeps_the_fastest_engine_that_verifies(tmp_path):
    result = convert("models:mlp", tmp_path / "e", ConvertOptions(benchmark=False))
    backend = result.manifest["backend"]
    assert backend["requested"] == "auto"
    candidates = {c["backend"]: c for c in backend["candidates"]}
    assert set(candidates) == {"onnxruntime", "openvino"}
    assert all(c["verified"] and c["latency_ms"] > 0 and c["cosine"] > 0.99999 for c in candidates.values())
    fastest = min(candidates.values(), key=lambda c: c["latency_ms"])
    assert fastest["chosen"] and backend["name"] == fastest["backend"]
    assert sum(c["chosen"] for c in candidates.values()) == 1
    # only the kept engine's files are in the artifact, and it loads as that backend
    assert not (tmp_path / "e" / ".candidates").exists()
    assert load(tmp_path / "e").backend == fastest["backend"]


def test_auto_takes_the_backend_that_runs_the_model(tmp_path):
    from models import determinant

    result = convert("models:determinant", tmp_path / "e", ConvertOptions(benchmark=False))
    backend = result.manifest["backend"]
    assert backend["name"] == "onnxruntime"
    refused = next(c for c in backend["candidates"] if c["backend"] == "openvino")
    assert not refused["chosen"] and "cannot run 1 node(s)" in refused["problem"] and "Det" in refused["problem"]
    x = np.random.default_rng(4).standard_normal((3, 9)).astype(np.float32)
    (out,) = load(tmp_path / "e").run({"x": x}).values()
    np.testing.assert_allclose(out, _eager(determinant, {"x": x}), rtol=1e-4, atol=1e-4)


def test_auto_names_every_backend_when_none_can(cli, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    node = helper.make_node("Mystery", ["x"], ["y"], domain="com.example", name="odd")
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)]
    onnx.save(helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=opsets), tmp_path / "m.onnx")
    code, _, err = cli("convert", tmp_path / "m.onnx", "-o", tmp_path / "out")
    assert code == 4 and "Traceback" not in err
    assert "No backend could build this model" in err and "onnxruntime" in err and "openvino" in err
    assert "node 'odd'" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_named_backend_is_the_only_candidate(tmp_path, backend):
    result = convert("models:mlp", tmp_path / "e", ConvertOptions(benchmark=False, backend=backend))
    assert [c["backend"] for c in result.manifest["backend"]["candidates"]] == [backend]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_streams_run_at_once_and_each_equals_eager(tmp_path, backend):
    """``streams(2)``: two runners, called from two threads at once on different inputs, each
    answer equal to eager's; the engine's own ``run`` still answers after (it shares the first)."""
    import concurrent.futures
    import os

    from models import mlp

    convert("models:mlp", tmp_path / "e", ConvertOptions(benchmark=False, backend=backend))
    engine = load(tmp_path / "e")
    runners = engine.streams(2)
    assert len(runners) == min(2, len(os.sched_getaffinity(0)))
    rng = np.random.default_rng(4)
    feeds = [{"x": rng.standard_normal((3 + i, 8)).astype(np.float32)} for i in range(8)]
    def stream(k):  # each thread keeps to its own runner, as the server's batches do
        return [(feed, runners[k](feed)) for feed in feeds[k :: len(runners)]]

    with concurrent.futures.ThreadPoolExecutor(len(runners)) as pool:
        answers = [pair for part in pool.map(stream, range(len(runners))) for pair in part]
    assert len(answers) == len(feeds)
    for feed, answer in answers:
        np.testing.assert_allclose(next(iter(answer.values())), _eager(mlp, feed), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(next(iter(engine.run(feeds[0]).values())), _eager(mlp, feeds[0]), rtol=1e-5, atol=1e-5)
