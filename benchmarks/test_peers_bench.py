"""MiniLM batch 1, seq 128: every peer and adapter engine under pytest-benchmark.

    pytest -n 0 benchmarks/ --benchmark-enable --benchmark-json=build/peers-bench.json

The same engines as ``benchmarks/peers.py`` (which prints the ratio table); here
pytest-benchmark does the timing, so its JSON, histograms and ``compare`` apply.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import peers
import pytest

ARGS = argparse.Namespace(seq=128, compile=True, int8=False)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from adapter.profiles.probe import probe_host

    folder = tmp_path_factory.mktemp("peers")
    runs, _, _, inputs, seq = peers.build_runs("minilm", ARGS, probe_host(), Path("build/peers"), folder)
    return runs, peers._feeds(inputs, 1, seq)


LABELS = [
    "PyTorch eager FP32",
    "torch.compile FP32",
    "ONNX Runtime FP32",
    "ONNX Runtime FP32 + onnxscript fusions",
    "OpenVINO FP32",
    "adapter FP32 onnxruntime",
]


@pytest.mark.parametrize("label", LABELS + ["adapter default"])
def test_minilm_batch1(benchmark, engines, label):
    runs, feed = engines
    name = label if label in runs else next(k for k in runs if k.startswith(label))
    run = runs[name]
    benchmark.extra_info["engine"] = name
    benchmark(run, feed)
