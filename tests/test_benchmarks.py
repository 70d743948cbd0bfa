"""The peer benchmark's short run (few repeats, a small zoo model), so it cannot rot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_peer_benchmark_short_run(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("peers", None)
    import peers

    out = tmp_path / "peers.json"
    args = ["--models", "vit", "--batches", "1,2", "--repeats", "3", "--budget", "1", "--no-compile"]
    assert peers.main([*args, "--out", str(tmp_path / "engines"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "vit batch 1" in printed and "vs fastest peer" in printed
    rows = json.loads(out.read_text())["rows"]
    engines = {r["engine"] for r in rows}
    assert {"PyTorch eager FP32", "ONNX Runtime FP32", "ONNX Runtime INT8 dynamic", "OpenVINO FP32",
            "adapter FP32 onnxruntime"} <= engines  # fmt: skip
    assert any(e.startswith("adapter default (auto) -> ") for e in engines)
    for r in rows:
        assert r["latency_ms"] > 0 and r["flops"] > 0 and 0 < r["peak_fraction"]
        if not any(k in r["engine"].lower() for k in ("bf16", "int8")):  # FP32 engines agree with eager
            assert r["cos_min"] > 0.9999, r
        assert r["ratio_to_fastest_faithful_peer"] > 0 and r["peak"] in ("fp32", "bf16", "int8"), r  # FP32 peers hold 0.999
    fastest = [r for r in rows if r["peer"] and r["ratio_to_fastest_peer"] == 1.0]
    assert len(fastest) == 2  # one per batch size


def test_ort_kernel_benchmark_short_run(tmp_path, capsys, monkeypatch):
    """The fused-vs-unfused kernel table runs, and each pair computes the same thing."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("ort_kernels", None)
    import ort_kernels

    out = tmp_path / "kernels.json"
    assert ort_kernels.main(["--shapes", "16x64", "--threads", "1", "--repeats", "6", "--json", str(out)]) == 0
    assert "SkipLayerNormalization" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert {r["op"] for r in rows} == set(ort_kernels.PAIRS)
    for r in rows:
        assert r["fused_us"] > 0 and r["unfused_us"] > 0
        assert r["max_abs_diff"] < 1e-4, r


def test_compare_trials_short_run(tmp_path, capsys, monkeypatch):
    """One trial of the compare benchmark on real timings: the planted 20% slowdown is
    measured as one, and the command line's exit code and verdict are the library's."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("compare_trials", None)
    import compare_trials

    out = tmp_path / "trials.json"
    assert compare_trials.main(["--trials", "1", "--settle-s", "5", "--guard-s", "5", "--json", str(out)]) == 0
    assert "false negatives" in capsys.readouterr().out
    report = json.loads(out.read_text())
    (planted,) = report["statistics"]["min"]["planted_change"]
    assert 0.05 < planted < 0.6, report["statistics"]["min"]
    (trial,) = report["cli"]
    assert trial["cli"] == [3 if trial["library"] == "regression" else 0, trial["library"]]


def test_llm_peer_benchmark_short_run(tmp_path, capsys, monkeypatch):
    """The LLM benchmark on a small Llama of the TinyLlama layout: every engine yields a row."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("llm_peers", None)
    import llm_peers

    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128}  # fmt: skip
    folder = llm_peers.make_tinyllama(tmp_path / "llama", **small)
    out = tmp_path / "llm.json"
    args = ["--model", str(folder), "--weights", "int4", "--backends", "onnxruntime", "--batches", "1,2",
            "--prompt", "8", "--new", "4", "--rounds", "1", "--engines", str(tmp_path / "engines"),
            "--ort-genai", "int4", "--llama-cpp", "q4_0", "--ov-genai", ""]  # fmt: skip
    assert llm_peers.main([*args, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    engines = {r["engine"] for r in rows}
    expected = {"adapter onnxruntime int4", "transformers eager float32", "transformers eager bfloat16"}
    if importlib.util.find_spec("onnxruntime_genai") is not None:  # the dev extra installs it
        expected.add("onnxruntime-genai int4")
        peer = [r for r in rows if r["engine"] == "onnxruntime-genai int4"]
        assert all(r["kl_to_fp32"] > 0 for r in peer), peer  # its KL, measured by adapter's own check
    if importlib.util.find_spec("ctranslate2") is not None:  # the dev extra installs it; its x86 wheel has no BF16
        expected.add("ctranslate2 int8")
    single = set()  # engines with batch-1 rows only
    if importlib.util.find_spec("llama_cpp") is not None:  # the dev extra builds it; its Llama API runs one sequence
        single.add("llama.cpp Q4_0")
        peer = [r for r in rows if r["engine"] == "llama.cpp Q4_0"]
        assert [r["batch"] for r in peer] == [1] and all(r["kl_to_fp32"] > 0 for r in peer), peer
    assert engines == expected | single
    assert len(rows) == 2 * len(expected) + len(single)
    assert all(r["ttft_ms"] > 0 and r["decode_tokens_per_s"] > 0 for r in rows)
    int4 = [r for r in rows if r["engine"] == "adapter onnxruntime int4"]
    assert all(0 < r["kl_to_fp32"] <= 0.05 and r["weight_bytes"] > 0 for r in int4), int4  # verified, and reported
    assert "TTFT ms" in capsys.readouterr().out


def test_serve_load_benchmark_short_run(tmp_path, capsys, monkeypatch):
    """Poisson arrivals against `adapter serve` (continuous, paged with 4 prompt tokens a step,
    and one at a time) on a tiny OpenVINO engine."""
    from adapter.llm.convert import LLMOptions, convert_causal_lm
    from adapter.llm.families import tiny_config, write_random_folder

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("serve_load", None)
    import serve_load

    source = write_random_folder(tiny_config("llama"), tmp_path / "src")
    convert_causal_lm(str(source), tmp_path / "engine", LLMOptions(backend="openvino", benchmark=False))
    out = tmp_path / "load.json"
    args = [str(tmp_path / "engine"), "--rates", "40", "--requests", "8", "--prompt", "6", "--max-tokens", "8",
            "--paged-chunks", "4"]  # fmt: skip
    assert serve_load.main([*args, "--json", str(out)]) == 0
    assert "| 40 | paged, 4 prompt tokens a step | 8/8 |" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert {r["mode"] for r in rows} == {"continuous", "one at a time", "paged, 4 prompt tokens a step"}
    assert all(r["completed"] == 8 and r["tokens_per_s"] > 0 and r["ttft_p50_ms"] > 0 for r in rows)
    assert all(r["metrics_match"] == "yes" for r in rows), rows  # /metrics parsed, counters equal the client's


def test_serve_embed_load_benchmark_short_run(tmp_path, capsys, monkeypatch):
    """Poisson arrivals of embeddings against `adapter serve` one at a time and batched on a
    tiny masked-mean encoder (ONNX Runtime); the capacity under the objective stops at the
    first rate that missed it."""
    from adapter import ConvertOptions, convert

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.syspath_prepend(str(BENCHMARKS.parent / "tests"))
    for name in ("serve_load", "serve_embed_load"):
        sys.modules.pop(name, None)
    import serve_embed_load

    convert("models:mean_embed", tmp_path / "engine", ConvertOptions(benchmark=False, backend="onnxruntime"))
    out = tmp_path / "load.json"
    args = [str(tmp_path / "engine"), "--modes", "one at a time,batched", "--rates", "40", "--requests", "12",
            "--slo-ms", "10000", "--json", str(out)]  # fmt: skip
    assert serve_embed_load.main(args) == 0
    printed = capsys.readouterr().out
    assert "| 40 | batched | 12/12 |" in printed and "batched: 40 req/s (or more: no rate tried missed)" in printed
    rows = json.loads(out.read_text())["rows"]
    assert {r["mode"] for r in rows} == {"one at a time", "batched"}
    assert all(r["completed"] == 12 and r["metrics_match"] == "yes" for r in rows), rows
    assert next(r for r in rows if r["mode"] == "one at a time")["rows_per_run"] == 1.0
    # capacity: the highest rate below the first miss, even when a higher rate held again
    runs = [{"mode": "m", "rate": rate, "completed": 5, "requests": 5, "p99_ms": p99}
            for rate, p99 in ((100, 20.0), (200, 60.0), (300, 40.0))]  # fmt: skip
    assert serve_embed_load.capacity(runs, "m", 50.0) == (100, 200)
    assert serve_embed_load.capacity(runs[:1], "m", 50.0) == (100, None)
