"""Run-time inputs (issue 8, point 5): ``Engine.run`` and ``adapter run`` refuse bad feeds
with one clear message, and the same engine keeps working after each refusal.

``tests/test_errors.py`` runs each wrong feed once through the CLI; here one loaded engine
takes every bad feed in turn (a good call after each), dynamic ranges are declared with
bounds, two inputs share a dim, and ``--check-finite`` reports NaN/Inf.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapter import ConvertOptions, convert, load
from adapter.core.errors import InputMismatchError


class TwoInputs(torch.nn.Module):
    """out = relu(a @ w) + b, with a and b sharing their batch dim."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.proj(a)) + b


def two_inputs():
    torch.manual_seed(0)
    return TwoInputs().eval(), {"a": torch.randn(3, 8), "b": torch.randn(3, 4)}


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runtime") / "engine"
    options = ConvertOptions(benchmark=False, dynamic=("a:0=batch[2..16]", "b:0=batch[2..16]"))
    convert(f"{__file__}:two_inputs", out, options)
    return out


def _good(rng, batch: int = 3) -> dict[str, np.ndarray]:
    return {
        "a": rng.standard_normal((batch, 8)).astype(np.float32),
        "b": rng.standard_normal((batch, 4)).astype(np.float32),
    }


def _eager(feed):
    module, _ = two_inputs()
    with torch.no_grad():
        return module(torch.from_numpy(feed["a"]), torch.from_numpy(feed["b"])).numpy()


F32 = np.float32
BAD_FEEDS = {
    "missing b": ({"a": np.zeros((3, 8), F32)}, ["missing input 'b'"]),
    "unknown name": (
        {"a": np.zeros((3, 8), F32), "b": np.zeros((3, 4), F32), "c": np.zeros(1, F32)},
        ["unknown input(s) c"],
    ),
    "renamed": ({"A": np.zeros((3, 8), F32), "b": np.zeros((3, 4), F32)}, ["unknown input(s) A", "missing input 'a'"]),
    "float64": ({"a": np.zeros((3, 8)), "b": np.zeros((3, 4), F32)}, ["'a' has dtype float64, expected float32"]),
    "int64": ({"a": np.zeros((3, 8), np.int64), "b": np.zeros((3, 4), F32)}, ["'a' has dtype int64"]),
    "float16": ({"a": np.zeros((3, 8), np.float16), "b": np.zeros((3, 4), F32)}, ["'a' has dtype float16"]),
    "rank 1": ({"a": np.zeros(8, F32), "b": np.zeros((3, 4), F32)}, ["'a' has rank 1", "expected rank 2"]),
    "rank 3": ({"a": np.zeros((1, 3, 8), F32), "b": np.zeros((3, 4), F32)}, ["'a' has rank 3"]),
    "scalar": ({"a": np.float32(1.0), "b": np.zeros((3, 4), F32)}, ["'a' has rank 0"]),
    "fixed dim": ({"a": np.zeros((3, 9), F32), "b": np.zeros((3, 4), F32)}, ["'a' axis 1 is 9, expected 8"]),
    "below range": ({"a": np.zeros((1, 8), F32), "b": np.zeros((1, 4), F32)}, ["('batch') is 1, outside [2..16]"]),
    "above range": ({"a": np.zeros((17, 8), F32), "b": np.zeros((17, 4), F32)}, ["is 17, outside [2..16]"]),
    "empty batch": ({"a": np.zeros((0, 8), F32), "b": np.zeros((0, 4), F32)}, ["is 0, outside [2..16]"]),
    "batches disagree": (
        {"a": np.zeros((3, 8), F32), "b": np.zeros((5, 4), F32)},
        ["dim 'batch' is 3 in 'a' but 5 in 'b'"],
    ),
    "many at once": (
        {"a": np.zeros((3, 8), np.float64), "b": np.zeros((3, 4, 1), F32)},
        ["dtype float64", "'b' has rank 3"],
    ),
}


def test_engine_stays_usable_after_each_bad_feed(engine_dir):
    engine = load(engine_dir)
    rng = np.random.default_rng(0)
    for label, (feed, needles) in BAD_FEEDS.items():
        with pytest.raises(InputMismatchError) as caught:
            engine.run(feed)
        message = str(caught.value)
        for needle in needles:
            assert needle in message, (label, needle, message)
        assert "Expected: a: float32[batch[2..16], 8]" in message
        good = _good(rng, batch=int(rng.integers(2, 17)))
        np.testing.assert_allclose(engine.run(good)["output"], _eager(good), rtol=1.3e-6, atol=1e-5)


def test_range_edges_and_odd_layouts_are_accepted(engine_dir):
    engine = load(engine_dir)
    rng = np.random.default_rng(1)
    for batch in (2, 16):
        feed = _good(rng, batch)
        np.testing.assert_allclose(engine.run(feed)["output"], _eager(feed), rtol=1.3e-6, atol=1e-5)
    wide = rng.standard_normal((4, 16)).astype(np.float32)
    feed = {"a": wide[:, ::2], "b": np.asfortranarray(rng.standard_normal((4, 4)).astype(np.float32))}
    assert not feed["a"].flags.c_contiguous
    want = _eager({k: np.ascontiguousarray(v) for k, v in feed.items()})
    np.testing.assert_allclose(engine.run(feed)["output"], want, rtol=1.3e-6, atol=1e-5)


def test_nan_propagates_without_the_check(engine_dir):
    feed = _good(np.random.default_rng(2))
    feed["b"][1, 2] = np.nan
    out = load(engine_dir).run(feed)["output"]
    assert np.isnan(out[1, 2]) and np.isfinite(np.delete(out.ravel(), 1 * 4 + 2)).all()


def _fails(result, code: int, *needles: str) -> str:
    exit_code, out, err = result
    assert exit_code == code, (exit_code, out, err)
    assert "Traceback" not in out + err and "internal error" not in err, err
    text = " ".join(err.split())
    for needle in needles:
        assert needle in text, (needle, text)
    return text


@pytest.mark.parametrize(
    ("where", "value", "needle"),
    [
        ("a", np.nan, "'a' (1 NaN, 0 Inf of 24)"),
        ("b", np.inf, "'b' (0 NaN, 1 Inf of 12)"),
        ("a", -np.inf, "'a' (0 NaN, 1"),
    ],
)
def test_check_finite_refuses_non_finite_inputs(cli, tmp_path, engine_dir, where, value, needle):
    feed = _good(np.random.default_rng(3))
    feed[where].flat[5] = value
    np.savez(tmp_path / "in.npz", **feed)
    _fails(cli("run", engine_dir, "-i", tmp_path / "in.npz", "-o", tmp_path / "y.npz", "--check-finite"), 6, needle)
    assert not (tmp_path / "y.npz").exists()
    code, _, err = cli("run", engine_dir, "-i", tmp_path / "in.npz", "-o", tmp_path / "y.npz")  # without: propagates
    assert code == 0, err
    assert not np.isfinite(np.load(tmp_path / "y.npz")["output"]).all()


def test_check_finite_reports_non_finite_outputs(cli, tmp_path, engine_dir):
    feed = _good(np.random.default_rng(4))
    weight = two_inputs()[0].proj.weight.detach().numpy()
    assert np.abs(weight).sum(axis=1).max() > 1.5
    row = int(np.abs(weight).sum(axis=1).argmax())
    feed["a"][0] = np.finfo(np.float32).max * np.sign(weight[row])  # finite, but the projection overflows
    np.savez(tmp_path / "in.npz", **feed)
    _fails(
        cli("run", engine_dir, "-i", tmp_path / "in.npz", "-o", tmp_path / "y.npz", "--check-finite"),
        1,
        "non-finite output(s) from finite inputs",
        "'output' (",
    )
    assert not (tmp_path / "y.npz").exists()
    feed = _good(np.random.default_rng(5))
    np.savez(tmp_path / "ok.npz", **feed)
    code, _, err = cli("run", engine_dir, "-i", tmp_path / "ok.npz", "-o", tmp_path / "y.npz", "--check-finite")
    assert code == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["output"], _eager(feed), rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize(
    ("feed", "code", "needle"),
    [
        ({"a": np.zeros((0, 8), F32), "b": np.zeros((0, 4), F32)}, 6, "is 0, outside [2..16]"),
        ({"a": np.zeros((17, 8), F32), "b": np.zeros((17, 4), F32)}, 6, "is 17, outside [2..16]"),
        ({"a": np.zeros((3, 8), F32), "b": np.zeros((5, 4), F32)}, 6, "is 3 in 'a' but 5 in 'b'"),
        ({"a": np.array(["x"] * 3), "b": np.zeros((3, 4), F32)}, 6, "dtype <U1"),
    ],
    ids=["empty-batch", "above-range", "batch-mismatch", "strings"],
)
def test_cli_run_bad_feed_then_good(cli, tmp_path, engine_dir, feed, code, needle):
    np.savez(tmp_path / "in.npz", **feed)
    _fails(cli("run", engine_dir, "-i", tmp_path / "in.npz"), code, needle)
    np.savez(tmp_path / "ok.npz", **_good(np.random.default_rng(6)))
    exit_code, _, err = cli("run", engine_dir, "-i", tmp_path / "ok.npz", "--json")
    assert exit_code == 0, err


def test_cli_run_inputs_file_problems(cli, tmp_path, engine_dir):
    _fails(cli("run", engine_dir, "-i", tmp_path / "absent.npz"), 2, "absent.npz", "does not exist")
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04garbage")
    _fails(cli("run", engine_dir, "-i", tmp_path / "cut.npz"), 2, "cut.npz", "not a readable .npz")
    np.savez(tmp_path / "whole.npz", **_good(np.random.default_rng(7)))
    data = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "half.npz").write_bytes(data[: len(data) // 2])
    _fails(cli("run", engine_dir, "-i", tmp_path / "half.npz"), 2, "half.npz", "not a readable .npz")
    assert cli("run", engine_dir, "-i", tmp_path / "whole.npz")[0] == 0
