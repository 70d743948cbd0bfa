"""The profiler on a small random BERT (2 layers): real ONNX Runtime / OpenVINO / TVM
profilers, op-library costs, roofline placement, and every output file, the HTML page
rendered in a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from adapter.converter.api import ConvertOptions, convert
from adapter.converter.precision import PrecisionOptions
from adapter.core.errors import AdapterError

pytestmark = pytest.mark.exclusive  # per-module sums are judged against wall times

_SEQ = 128
_BATCH = 4


def tiny_bert():
    """A 2-layer BERT encoder with random weights, MiniLM's width (hidden 384, 12 heads), batch and seq dynamic.

    MiniLM's width keeps per-node work realistic: with tiny matrices ONNX Runtime's scheduling
    gaps between nodes (not in any node's time) would dominate the end-to-end latency."""
    from transformers import BertConfig, BertModel

    from adapter.zoo import _finish, _SentenceEmbedder, _text_axes

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=512, hidden_size=384, num_hidden_layers=2, num_attention_heads=12,
        intermediate_size=1536, max_position_embeddings=256,
    )  # fmt: skip
    model = BertModel._from_config(config, attn_implementation="eager")
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(0, config.vocab_size, (2, 16), generator=generator),
        "attention_mask": torch.ones(2, 16, dtype=torch.int64),
    }
    return _finish(_SentenceEmbedder(model)), inputs, _text_axes(config.max_position_embeddings)


def _convert(tmp_path_factory, backend: str) -> Path:
    out = tmp_path_factory.mktemp(f"profile-{backend}") / "engine"
    # exact FP32: the attribution bounds below are for its ~7 ms runs (in BF16 the same
    # model runs ~1 ms, where infer()'s own ~0.25 ms outside every node is a quarter)
    options = ConvertOptions(backend=backend, benchmark=False, verify_samples=0, precision=PrecisionOptions(mode="fp32"))
    return convert(f"{__file__}:tiny_bert", out, options).path


@pytest.fixture(scope="module")
def ort_report(tmp_path_factory):
    from adapter.profile.profiler import profile_artifact

    artifact = _convert(tmp_path_factory, "onnxruntime")
    return artifact, profile_artifact(artifact, [_BATCH, 1], _SEQ, metrics=("latency", "throughput", "memory"))


@pytest.fixture(scope="module")
def outputs(ort_report, tmp_path_factory):
    from adapter.profile.outputs import write_all

    return write_all(ort_report[1], tmp_path_factory.mktemp("profile-out"))


def test_report_shape(ort_report):
    data = ort_report[1].to_json()
    assert {"artifact", "backend", "target", "precision", "ceilings", "runs"} <= set(data)
    assert data["backend"] == "onnxruntime"
    assert set(data["ceilings"]) == {"peak_flops", "memory_bandwidth", "ridge_intensity"}
    run = data["runs"][0]
    assert (run["batch"], run["seq"]) == (_BATCH, _SEQ)
    assert run["inputs"] == {"input_ids": [_BATCH, _SEQ], "attention_mask": [_BATCH, _SEQ]}
    node_keys = {"name", "op_type", "module", "ms", "share", "flops", "bytes", "intensity", "achieved_flops",
                 "achieved_bytes_per_s", "ceiling_flops", "efficiency", "bound"}  # fmt: skip
    assert all(set(n) == node_keys for n in run["nodes"])
    assert all(set(m) == (node_keys - {"name", "op_type"}) | {"nodes"} for m in run["modules"])
    assert abs(sum(n["share"] for n in run["nodes"]) - 1) < 1e-6
    layers = {m["module"] for m in run["modules"]}
    assert "model.encoder.layer.0.attention" in layers and "model.encoder.layer.1.intermediate" in layers
    assert run["throughput_per_s"] == pytest.approx(_BATCH / (run["end_to_end_ms"] / 1e3))
    memory = data["memory"]
    assert memory["weights_bytes"] > 1_500_000 and memory["activation_peak_bytes_estimate"] > 0


def _attribution(run: dict) -> tuple[float, str]:
    ratio = run["sum_of_modules_ms"] / run["end_to_end_ms"]
    return ratio, (
        f"batch {run['batch']}: per-module sum {run['sum_of_modules_ms']:.3f} ms vs the engine timed alone "
        f"{run['end_to_end_ms']:.3f} ms = {100 * ratio:.1f}% ({run['profiled_runs']} profiled runs, "
        f"{run['end_to_end_runs']} timed; profiled runs took {run['profiled_total_ms']:.3f} ms)"
    )


_ATTEMPTS = 3
"""Profiles taken at most per batch size in test_module_sum_matches_end_to_end."""


@pytest.fixture(scope="module")
def single_thread_engine(tmp_path_factory) -> Path:
    """tiny_bert for ONNX Runtime with one intra-op thread (see test_module_sum_matches_end_to_end)."""
    out = tmp_path_factory.mktemp("profile-1-thread") / "engine"
    options = ConvertOptions(
        backend="onnxruntime", benchmark=False, verify_samples=0, backend_options=(("threads", 1),)
    )
    return convert(f"{__file__}:tiny_bert", out, options).path


def test_module_sum_matches_end_to_end(single_thread_engine):
    """The issue's figure: per-module latencies sum to within 10% of the engine's end-to-end
    latency timed without the profiler, at batch 4 and batch 1 (seq 128).

    A node's figure is its median over the profiled runs, the end-to-end one the median of
    whole runs: they agree while runs are rarely disturbed, since a median drops each node's
    disturbed runs and a whole run carries all of them. On the 2-core host with the engine's
    2 threads: quiet (this test at real-time priority) 98.9-106.8% at batch 1, 101.3-101.6%
    at batch 4; beside other test runs (load 3.5 on 2 cores) 46-78% at batch 1, no attempt
    quiet, for a thread pool spanning every core waits on whichever thread another process
    holds (batch 1: 8 ms quiet, 24-58 ms). So the engine here runs one thread (the profiler's
    code is the same for any count), leaving other cores to the load. A batch size out of
    bounds is profiled again, ``_ATTEMPTS`` profiles at most, and the least disturbed one is
    judged, whatever its ratio: load only adds time, so that is the profile whose larger
    figure (module sum or end-to-end) is smallest. Beside other test runs (load 1-4 on 2
    cores), 16 runs of this test judged 94.4-103.1% at batch 4 and 94.0-103.0% at batch 1;
    one, at load 3.3, failed (batch 1: three profiles, 64-89%): with more busy processes
    than cores no comparison of wall-time medians holds 10%.
    """
    from adapter.profile.profiler import profile_artifact

    def disturbance(run: dict) -> float:
        return max(run["end_to_end_ms"], run["sum_of_modules_ms"])

    manifest = json.loads((single_thread_engine / "manifest.json").read_text())
    assert manifest["backend"]["config"]["threads"] == 1
    for first in profile_artifact(single_thread_engine, [_BATCH, 1], _SEQ).to_json()["runs"]:
        attempts = [first]
        while len(attempts) < _ATTEMPTS and not 0.9 <= _attribution(attempts[-1])[0] <= 1.1:
            attempts += profile_artifact(single_thread_engine, [first["batch"]], _SEQ).to_json()["runs"]
        seen = [_attribution(run)[1] for run in attempts]
        print("\n".join(seen))
        ratio, figures = _attribution(min(attempts, key=disturbance))
        assert 0.9 <= ratio <= 1.1, f"least disturbed: {figures}; all attempts: {seen}"


def test_matmul_flops_are_2mnk(ort_report):
    import onnx_ir as ir

    artifact, report = ort_report
    model = ir.load(artifact / "model.onnx")
    by_name = {n.name: n for n in model.graph.all_nodes()}
    matmuls = [n for n in report.to_json()["runs"][0]["nodes"] if n["op_type"] == "MatMul"]
    assert len(matmuls) >= 6
    for row in matmuls:
        node = by_name[row["name"]]
        k, n = (int(d) for d in node.inputs[1].shape)
        assert node.inputs[0].shape[-1] == k
        assert row["flops"] == 2 * (_BATCH * _SEQ) * n * k


def test_roofline_places_matmul_above_norm_and_softmax(ort_report):
    from adapter.profile.outputs import kind_of

    run = ort_report[1].to_json()["runs"][0]
    ridge = ort_report[1].to_json()["ceilings"]["ridge_intensity"]
    light = [n for n in run["nodes"] if kind_of(n["op_type"]) in ("norm", "softmax")]
    assert light, "no LayerNorm/Softmax nodes in the profile"
    assert all(n["bound"] == "memory" and n["intensity"] < ridge for n in light)
    dense = [m for m in run["modules"] if m["module"].endswith((".intermediate", ".attention"))]
    assert len(dense) == 4
    assert min(m["intensity"] for m in dense) > max(n["intensity"] for n in light)
    assert all(m["bound"] == "compute" for m in dense)
    for row in run["nodes"] + run["modules"]:
        if row["ceiling_flops"] is not None:
            assert row["ceiling_flops"] <= ort_report[1].to_json()["ceilings"]["peak_flops"]


def test_trace_json(outputs):
    trace = json.loads(outputs["trace"].read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(spans) > 20
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    assert all({"op", "module", "flops"} <= set(e["args"]) for e in spans)
    assert json.loads(outputs["json"].read_text())["backend"] == "onnxruntime"


def test_pngs_are_valid(outputs):
    import matplotlib.image

    for key in ("heatmap", "roofline"):
        payload = outputs[key].read_bytes()
        assert payload[:8] == b"\x89PNG\r\n\x1a\n" and len(payload) > 10_000
        image = matplotlib.image.imread(outputs[key])
        assert image.shape[0] > 200 and image.shape[1] > 200 and float(np.std(image)) > 0.01


def test_html_is_self_contained(outputs):
    text = outputs["html"].read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.IGNORECASE)
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', text)) == 3
    assert "end-to-end" in text and "model.encoder.layer.0.attention" in text


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed (tools/install-test-deps.sh installs Debian's chromium)")
    return found


def _browse(page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
        "--virtual-time-budget=5000", *extra, page.resolve().as_uri(),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)]


def test_html_renders_in_headless_chromium(outputs, tmp_path):
    page = outputs["html"]
    dom = _browse(page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<title>profile ready: 3 images</title>" in dom.stdout, "an image did not decode, or the check did not run"
    assert not _console_errors(dom.stderr), _console_errors(dom.stderr)
    shot = tmp_path / "report.png"
    screenshot = _browse(page, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000")
    assert screenshot.returncode == 0, screenshot.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_chromium_check_catches_broken_pages(outputs, tmp_path):
    """The two checks above fail on a page with a broken image or a script error."""
    text = outputs["html"].read_text()
    broken = tmp_path / "broken.html"
    broken.write_text(text.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    dom = _browse(broken, tmp_path, "--dump-dom")
    assert "<title>profile: broken image</title>" in dom.stdout
    failing = tmp_path / "failing.html"
    failing.write_text(text.replace("</body>", "<script>undefinedFunction();</script></body>"))
    assert _console_errors(_browse(failing, tmp_path, "--dump-dom").stderr)


def test_cli_profile(ort_report, tmp_path, capsys):
    from adapter.cli.profile import profile

    artifact = ort_report[0]
    profile.main(
        [str(artifact), "--batch-sizes", "1", "--seq", "32", "--repeats", "3", "--json"], standalone_mode=False
    )
    data = json.loads(capsys.readouterr().out)
    assert data["runs"][0]["inputs"]["input_ids"] == [1, 32]
    out = tmp_path / "prof"
    profile.main(
        [str(artifact), "--batch-sizes", "2", "--seq", "16", "--repeats", "3", "-o", str(out)], standalone_mode=False
    )
    printed = capsys.readouterr().out
    assert "attributed" in printed and "Top" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "heatmap.png",
        "profile.json",
        "report.html",
        "roofline.png",
        "trace.json",
    ]


def test_cli_profile_errors(tmp_path):
    from adapter.cli.main import cli, main
    from adapter.cli.profile import profile

    with pytest.raises(AdapterError, match="not an engine artifact"):
        profile.main([str(tmp_path / "missing")], standalone_mode=False)
    if "profile" not in cli.commands:  # the lead registers it; run it through main() the same way
        cli.add_command(profile)
        try:
            assert main(["profile", str(tmp_path / "missing")]) != 0
            assert main(["profile", str(tmp_path), "--batch-sizes", "a,b"]) == 2
        finally:
            cli.commands.pop("profile")


def test_performance_analyzer(ort_report):
    from adapter.profile.profiler import PerformanceAnalyzer

    report = PerformanceAnalyzer(ort_report[0]).analyze(batch_sizes=[1, 2], seq=16, repeats=3)
    data = report.to_json()
    assert [r["batch"] for r in data["runs"]] == [1, 2]
    assert all(r["throughput_per_s"] > 0 for r in data["runs"])
    assert data["memory"]["rss_delta_bytes"] is not None
    with pytest.raises(AdapterError, match="Unknown metric"):
        PerformanceAnalyzer(ort_report[0]).analyze(metrics=["power"])


def test_openvino_profile(tmp_path_factory):
    from adapter.profile.profiler import profile_artifact

    artifact = _convert(tmp_path_factory, "openvino")
    data = profile_artifact(artifact, [2, 1], _SEQ).to_json()
    runs = data["runs"]
    # every matrix product lands on a kernel that can do it: no node runs at an impossible
    # FLOP rate (the MatMuls OpenVINO's FullyConnected and attention Subgraph leave out of
    # their name lists were once charged to a Convert, at 400x the peak)
    peak = data["ceilings"]["peak_flops"]
    impossible = [(n["name"], n["op_type"], n["achieved_flops"] / peak) for r in runs for n in r["nodes"]
                  if n["flops"] and n["flops"] > 1e6 and n["achieved_flops"] > 3 * peak]  # fmt: skip
    assert not impossible, impossible
    # nor at an impossible memory rate: views (Reshape, ...) move no data, and the transposes
    # of Q and K go with their module's attention kernel (given to a Convert with the views
    # of the shape subgraph, MiniLM's read 119x the bandwidth; the largest now is 2.4x,
    # an elementwise MulAdd whose operands sit in cache)
    bandwidth = data["ceilings"]["memory_bandwidth"]
    flooding = [(n["name"], n["op_type"], n["achieved_bytes_per_s"] / bandwidth) for r in runs for n in r["nodes"]
                if n["bytes"] and n["bytes"] > 1e5 and n["achieved_bytes_per_s"] > 10 * bandwidth]  # fmt: skip
    assert not flooding, flooding
    matmuls = sum(n["flops"] or 0 for n in runs[0]["nodes"] if n["op_type"] in ("FullyConnected", "Subgraph", "MatMul"))
    assert matmuls >= 0.9 * sum(n["flops"] or 0 for n in runs[0]["nodes"])
    for each in runs:
        # OpenVINO's counters are running averages since compile; read as per-run times (the
        # profiler's first version) they carried the warm-up runs: MiniLM's node sums came out
        # 13-27% above the wall time of the very runs they described. Asserted here against
        # those runs; against the engine timed alone (a second compiled model, printed) a
        # 7 ms batch-1 run of this 2-layer model varies by about 10% on the 2-core host. The
        # lower bound is 85%: infer()'s own work (inputs in, outputs out, ~0.5 ms) is in no node.
        ratio, figures = _attribution(each)
        print(figures)
        same_runs = each["sum_of_modules_ms"] / each["profiled_total_ms"]
        assert 0.85 <= same_runs <= 1.1, f"{figures}; {100 * same_runs:.1f}% of the profiled runs' wall time"
    run = runs[0]
    assert run["nodes"] and all(n["ms"] >= 0 for n in run["nodes"])
    fully_connected = [n for n in run["nodes"] if n["op_type"] == "FullyConnected"]
    unmapped = [
        (n["name"], n["module"], n["flops"])
        for n in fully_connected
        if not n["flops"] or not n["module"].startswith("model.")
    ]
    assert len(fully_connected) >= 8 and not unmapped, unmapped
    norms = [n for n in run["nodes"] if n["op_type"] == "MVN"]
    assert norms and all(n["bound"] == "memory" for n in norms if n["bound"])


def test_tvm_profile(tmp_path_factory):
    pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'adapter[tvm]')")
    from adapter.profile.profiler import profile_artifact

    artifact = _convert(tmp_path_factory, "tvm")
    data = profile_artifact(artifact, [8], 64, repeats=3).to_json()
    run = data["runs"][0]
    assert (run["batch"], run["seq"]) == (2, 16)  # a fixed-shape engine runs its own shape only
    assert any("matmul" in n["op_type"] and n["flops"] for n in run["nodes"])
    assert run["sum_of_modules_ms"] <= run["profiled_total_ms"] * 1.05
