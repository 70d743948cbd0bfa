"""ONNX's backend node tests through adapter's passes: nothing ONNX Runtime passes directly may fail after
``canonicalize`` + ``fusion-ort`` / ``fusion-standard`` (``benchmarks/conformance.py`` runs all of them;
this runs every 10th case plus the known failures, about 15 s)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import conformance  # noqa: E402

EVERY = 10


@pytest.fixture(scope="module")
def cases():
    return {c.name: c for c in conformance.load_cases()}


def test_sample_passes_survive_our_passes(cases):
    names = sorted(cases)[::EVERY]
    assert len(names) > 150, "onnx's node test cases went missing"
    broken, direct_passes = [], 0
    for name in names:
        if name in conformance.KNOWN_BROKEN:
            continue
        outcome = conformance.run_case(cases[name])
        if outcome["direct"].status != "pass":
            continue
        direct_passes += 1
        for pipeline in conformance.PIPELINES:
            if outcome[pipeline].status != "pass":
                broken.append(f"{name} [{pipeline}]: {outcome[pipeline].status}: {outcome[pipeline].detail[:300]}")
    assert direct_passes > 0.7 * len(names), f"ONNX Runtime passed only {direct_passes} of {len(names)} directly"
    assert not broken, "passes broke node tests ONNX Runtime passes directly:\n" + "\n".join(broken)


@pytest.mark.parametrize("name", sorted(conformance.FIXED))
def test_former_breaks_pass_through_the_passes(cases, name):
    """The node tests onnx-ir's / onnxscript's passes broke (Scan bodies, a Loop's sequence, SplitToSequence)
    pass through canonicalize + fusion with the workarounds, with the same numbers as ONNX Runtime direct."""
    outcome = conformance.run_case(cases[name])
    assert outcome["direct"].status == "pass", outcome["direct"].detail
    for pipeline in conformance.PIPELINES:
        assert outcome[pipeline].status == "pass", f"{pipeline}: {outcome[pipeline].detail[:300]}"


def test_comparison_can_fail(cases):
    """The comparison is not vacuous: a wrong output fails it, as in onnx's runner."""
    import numpy as np

    expected = [np.array([1.0, 2.0], np.float32)]
    conformance.assert_similar(expected, [np.array([1.0, 2.0005], np.float32)], 1e-3, 1e-7)
    with pytest.raises(AssertionError):
        conformance.assert_similar(expected, [np.array([1.0, 2.01], np.float32)], 1e-3, 1e-7)
    with pytest.raises(AssertionError):
        conformance.assert_similar(expected, [np.array([1.0, 2.0], np.float64)], 1e-3, 1e-7)
