"""Precision switching: budgets, plans, FP16 overflow switching, INT8/FP8/INT4 artifacts,
sensitivity search, and the errors around them."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest

from adapter import ConvertOptions, convert, load
from adapter.converter.precision import PrecisionOptions
from adapter.core.budget import parse_budget


def _host_computes(dtype: str) -> bool:
    from adapter.profiles.probe import probe_host

    return dtype in probe_host().precisions


def _refuses_bf16(tmp_path, source: str) -> None:
    """On a host without BF16 arithmetic, a BF16 engine is refused with the reason."""
    from adapter.core.errors import SourceError

    options = ConvertOptions(benchmark=False, backend="openvino", precision=PrecisionOptions(mode="bf16"))
    with pytest.raises(SourceError, match="lists no bf16 support"):
        convert(source, tmp_path / "refused", options)
    assert not (tmp_path / "refused").exists()


def _opts(**precision) -> ConvertOptions:
    return ConvertOptions(benchmark=False, precision=PrecisionOptions(**precision))


@pytest.fixture
def calib_dir(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        np.savez(folder / f"{i:02d}.npz", x=rng.standard_normal((4, 32)).astype(np.float32))
    return folder


def test_budget_parsing():
    budget = parse_budget("cos>=0.999, cos_min>=0.98,max_abs[logits]<=1e-2")
    assert [str(t) for t in budget.terms] == ["cos>=0.999", "cos_min>=0.98", "max_abs[logits]<=0.01"]
    holds, failures = budget.judge({"logits": {"cos": 0.9995, "cos_min": 0.97, "max_abs": 0.5, "top1": 1.0}})
    assert not holds and len(failures) == 2
    implied = parse_budget("cos>=0.995")
    assert [str(t) for t in implied.terms] == ["cos>=0.995", "cos_min>=0.98"]
    figures = {"y": {"cos": 0.9952, "cos_lcb": 0.9948, "cos_min": 0.99, "max_abs": 0.1, "top1": 1.0}}
    holds, failures = implied.judge(figures)
    assert not holds and "95% lower bound" in failures[0]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("cos>0.9", "Cannot read"),
        ("cosine>=0.9", "Unknown accuracy metric"),
        ("cos<=0.9", "wrong way"),
        ("max_abs<=x", "Cannot read"),
    ],
)
def test_malformed_budget(cli, tmp_path, text, needle):
    code, _, err = cli(
        "convert", "models:mlp", "--precision", "int8-dynamic", "--accuracy-budget", text, "-o", tmp_path / "o"
    )
    assert code == 2 and needle in err and "Traceback" not in err


def test_fp16_overflow_is_switched_to_fp32(tmp_path):
    """A planted activation above 1e5: FP16 keeps it in FP32 and verifies; the same graph
    lowered without switching gives inf under ONNX's reference semantics."""
    from models import overflow
    from onnx.reference import ReferenceEvaluator

    from adapter.passes.precision import PrecisionPlan, apply_plan

    result = convert("models:overflow", tmp_path / "e", _opts(mode="fp16"))
    report = result.manifest["precision"]
    kept = {k["node"]: k["reason"] for k in report["kept_fp32"]}
    assert any("FP16 overflow" in reason and "mul" in reason for reason in kept.values())
    assert result.manifest["verification"]["passed"]

    fp32 = onnx.load(str(tmp_path / "e" / "model.onnx"))  # the switched FP16 engine
    plan = PrecisionPlan.load(tmp_path / "e" / "plan.json")
    _, inputs, _ = overflow()
    feed = {"x": inputs["x"].numpy()}
    assert np.isfinite(ReferenceEvaluator(fp32).run(None, feed)[0]).all()
    # now the same FP32 source lowered with the overflow overrides removed
    import onnx_ir as ir

    from adapter.converter.importer import import_source
    from adapter.passes import build_pipeline, run_pipeline

    imported = import_source("models:overflow")
    run_pipeline(imported.model, build_pipeline("canonicalize"))
    unswitched = apply_plan(imported.model, PrecisionPlan(**{**plan.__dict__, "overrides": {}}))
    assert not np.isfinite(ReferenceEvaluator(ir.serde.serialize_model(unswitched)).run(None, feed)[0]).all()


def test_sensitivity_keeps_the_sensitive_layer(tmp_path, calib_dir):
    result = convert("models:sensitive", tmp_path / "e", _opts(mode="int8", budget="cos>=0.99", calib=str(calib_dir)))
    report = result.manifest["precision"]
    assert report["budget_holds"] and report["accuracy"]["output"]["cos"] >= 0.99
    kept = {k["module"] for k in report["kept_fp32"]}
    assert "layers.2" in kept and len(kept) < 4  # the planted outlier is kept; some layers are lowered
    plan = json.loads((tmp_path / "e" / "plan.json").read_text())
    assert min(plan["sensitivity"], key=plan["sensitivity"].get) == "layers.2"
    assert report["calibration"]["synthetic"] is False


def test_plan_round_trips_and_reproduces_the_engine(tmp_path, calib_dir):
    from adapter.passes.precision import PrecisionPlan

    first = convert("models:sensitive", tmp_path / "a", _opts(mode="int8", budget="cos>=0.99", calib=str(calib_dir)))
    plan_file = tmp_path / "a" / "plan.json"
    plan = PrecisionPlan.load(plan_file)
    plan.save(tmp_path / "copy.json")
    assert PrecisionPlan.load(tmp_path / "copy.json") == plan
    again = convert("models:sensitive", tmp_path / "b", _opts(mode="fp32", plan=str(plan_file), calib=str(calib_dir)))
    assert again.manifest["precision"]["mode"] == "int8"
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()
    assert first.manifest["files"]["model.onnx"] == again.manifest["files"]["model.onnx"]


def test_budget_no_plan_can_meet(cli, tmp_path, calib_dir):
    code, _, err = cli(
        "convert",
        "models:sensitive",
        "--precision",
        "int8",
        "--accuracy-budget",
        "max_abs<=1e-12",
        "--calib",
        calib_dir,
        "-o",
        tmp_path / "o",
    )
    assert code == 11 and "No precision plan holds the budget max_abs<=1e-12" in err and "Best plans found: int8" in err
    assert not (tmp_path / "o").exists()


def test_calibration_that_does_not_match(cli, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((1, 7), np.float32))
    code, _, err = cli("convert", "models:sensitive", "--precision", "int8", "--calib", bad, "-o", tmp_path / "o")
    assert code == 2 and "Calibration file" in err and "axis 1 is 7, expected 32" in err


def test_text_calibration_needs_a_tokenizer(cli, tmp_path):
    text = tmp_path / "s.txt"
    text.write_text("hello world\n")
    code, _, err = cli("convert", "models:sensitive", "--precision", "int8", "--calib-text", text, "-o", tmp_path / "o")
    assert code == 2 and "needs the model's tokenizer" in err


def test_fp8_needs_a_target_with_fp8(cli, tmp_path):
    code, _, err = cli("convert", "models:mlp", "--precision", "fp8", "-o", tmp_path / "o")
    assert code == 2 and "lists no fp8 support" in err


def test_fp8_artifact_is_valid_onnx_and_runs(tmp_path, calib_dir):
    options = ConvertOptions(
        benchmark=False,
        target="nvidia-h100",
        backend="onnxruntime",
        precision=PrecisionOptions(mode="fp8", calib=str(calib_dir)),
    )
    result = convert("models:calm", tmp_path / "e", options)
    model = onnx.load(str(tmp_path / "e" / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert any(i.data_type == onnx.TensorProto.FLOAT8E4M3FN for i in model.graph.initializer)
    figures = result.manifest["precision"]["accuracy"]["output"]
    assert figures["finite"] and figures["cos"] > 0.9
    out = load(tmp_path / "e").run({"x": np.ones((3, 32), np.float32)})["output"]
    assert np.isfinite(out).all()


def test_int4_artifact_is_valid_onnx_and_runs(tmp_path):
    result = convert("adapter.zoo:llama", tmp_path / "e", _opts(mode="int4-weight"))
    model = onnx.load(str(tmp_path / "e" / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) >= 8
    report = result.manifest["precision"]
    assert report["size_bytes"]["plan"] < report["size_bytes"]["fp32"]
    assert report["accuracy"]["logits"]["cos"] > 0.99


@pytest.mark.parametrize(("mode", "backend"), [("fp16", "onnxruntime"), ("bf16", "openvino")])
def test_half_precision_on_a_decoder_lm(tmp_path, mode, backend):
    if mode == "bf16" and not _host_computes("bf16"):
        return _refuses_bf16(tmp_path, "adapter.zoo:gpt2")
    options = ConvertOptions(benchmark=False, backend=backend, precision=PrecisionOptions(mode=mode))
    result = convert("adapter.zoo:gpt2", tmp_path / "e", options)
    assert result.manifest["precision"]["accuracy"]["logits"]["cos"] >= 0.999
    assert result.manifest["verification"]["budget"]["passed"]
    if backend == "openvino":
        assert result.manifest["backend"]["config"]["precision"] == "bf16"


def test_bf16_on_onnxruntime_is_refused_with_the_alternative(cli, tmp_path):
    """ONNX Runtime builds no BF16 engine on any host: asked for one it is refused, naming
    OpenVINO. With the host's default backend (auto) the outcome follows the host's class:
    where the CPU computes BF16 natively (AVX512_BF16: Zen 4; AMX; the probe lists bf16)
    OpenVINO builds and verifies it, the manifest recording ONNX Runtime's refusal; on
    other hosts (AVX2, AVX-512 without BF16) OpenVINO is refused too, for the target."""
    import re

    from adapter.profiles import load_profile

    def names_openvino(text: str) -> bool:
        named = re.search(r"backend 'onnxruntime' does not run bf16 engines here \(backends that do: ([^)]*)\)", text)
        return named is not None and "openvino" in named.group(1).split(", ")

    code, _, err = cli("convert", "models:mlp", "--backend", "onnxruntime", "--precision", "bf16", "-o", tmp_path / "o")
    assert code == 2 and names_openvino(err), err
    assert not (tmp_path / "o").exists()

    host = load_profile("host")
    code, _, err = cli("convert", "models:mlp", "--precision", "bf16", "-o", tmp_path / "auto")
    if "bf16" not in host.precisions:
        assert code == 2 and names_openvino(err), err
        assert f"target 'host' lists no bf16 support (it has {', '.join(host.precisions)})" in err, err
        assert not (tmp_path / "auto").exists()
        return
    assert code == 0, err
    manifest = json.loads((tmp_path / "auto" / "manifest.json").read_text())
    backend = manifest["backend"]
    assert backend["name"] == "openvino" and backend["requested"] == "auto"
    assert backend["config"]["precision"] == "bf16"
    executed = backend["config"]["executed_precision"]
    assert executed == "bf16", f"OpenVINO ran {executed}; host features {host.features}"
    assert manifest["precision"]["mode"] == "bf16" and manifest["verification"]["passed"]
    refused = {c["backend"]: c["problem"] for c in backend["candidates"] if not c["chosen"]}
    assert names_openvino(refused["onnxruntime"] or ""), refused


def test_auto_picks_a_candidate_that_holds(tmp_path, calib_dir):
    result = convert("models:sensitive", tmp_path / "e", _opts(mode="auto", budget="cos>=0.99", calib=str(calib_dir)))
    report = result.manifest["precision"]
    holding = [c for c in report["candidates"] if c["holds"]]
    assert report["mode"] in {c["mode"] for c in holding}
    chosen = min(holding, key=lambda c: c["ratio_to_fp32"])  # each timed in alternation with FP32
    assert report["mode"] == chosen["mode"] and report["latency_ms"]["plan"] == chosen["latency_ms"]
    assert chosen["mode"] == "fp32" or chosen["ratio_to_fp32"] < 1.0


def test_bad_plan_file(cli, tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text('{"not": "a plan"}')
    code, _, err = cli("convert", "models:mlp", "--precision-plan", bad, "-o", tmp_path / "o")
    assert code == 2 and "not an adapter precision plan" in err


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "backend"), [("fp16", "onnxruntime"), ("bf16", "openvino")])
def test_half_precision_minilm(tmp_path, mode, backend):
    from pathlib import Path

    if mode == "bf16" and not _host_computes("bf16"):
        return _refuses_bf16(tmp_path, "adapter.zoo:minilm")

    import adapter

    sentences = Path(adapter.__file__).parent / "data" / "sentences.txt"
    options = ConvertOptions(
        benchmark=False,
        backend=backend,
        precision=PrecisionOptions(mode=mode, calib_text=str(sentences), max_samples=64),
    )
    result = convert("adapter.zoo:minilm", tmp_path / "e", options)
    report = result.manifest["precision"]
    for figures in report["accuracy"].values():
        assert figures["cos"] >= 0.999 and figures["cos_min"] >= 0.999
    assert result.manifest["verification"]["budget"]["passed"]
    if mode == "fp16":  # the attention mask's -3.4e38 stays out of FP16
        assert any("FP16 overflow" in k["reason"] for k in report["kept_fp32"])


def test_report_lists_precision_kept_layers_accuracy_speed_and_size(cli, tmp_path, calib_dir):
    code, out, err = cli(
        "convert",
        "models:sensitive",
        "--precision",
        "int8",
        "--accuracy-budget",
        "cos>=0.99",
        "--calib",
        calib_dir,
        "-o",
        tmp_path / "o",
    )
    assert code == 0, err
    assert "Precision: int8 (asked: int8; budget cos>=0.99,cos_min>=0.96)" in out
    assert "kept FP32 (" in out and "layers.2" in out
    assert " samples: cos mean" in out and "vs FP32" in out and "MB →" in out


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_int8_calibration_methods(tmp_path, calib_dir, method):
    result = convert(
        "models:sensitive",
        tmp_path / "e",
        _opts(mode="int8", budget="cos>=0.99", calib=str(calib_dir), calibrate_method=method),
    )
    plan = json.loads((tmp_path / "e" / "plan.json").read_text())
    assert plan["options"]["calibrate_method"] == method
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(tmp_path / "e" / "model.onnx")).graph.node)
    assert result.manifest["precision"]["accuracy"]["output"]["finite"]


def test_default_precision_says_why_it_stays_fp32(tmp_path, monkeypatch):
    """The default (no --precision): FP32 where the backend runs no BF16 (ONNX Runtime);
    on OpenVINO FP32 for a model bound by per-op overhead (a 2-layer MLP: its arithmetic at
    the FP32 peak is ~0.05% of its latency, so a BF16 "gain" would be timing noise), and
    FP32 when BF16 misses the near-lossless budget (here made impossible; on a host without
    BF16 arithmetic the reason is that instead). Each engine is verified as exact FP32 and no
    plan is written."""
    from adapter.converter import precision as precision_module
    from adapter.converter import roofline as roofline_module

    ort = convert("models:mlp", tmp_path / "ort", ConvertOptions(benchmark=False, backend="onnxruntime"))
    report = ort.manifest["precision"]
    assert report["mode"] == "fp32" and report["requested"] == "default", report
    assert "backend 'onnxruntime' does not run bf16" in report["reason"]
    assert ort.manifest["verification"]["tolerance"]["min_cosine"] >= 0.9999
    assert not (tmp_path / "ort" / "plan.json").exists()
    if _host_computes("bf16"):
        tiny = convert("models:mlp", tmp_path / "t", ConvertOptions(benchmark=False, backend="openvino", use_cache=False))
        report = tiny.manifest["precision"]
        assert report["mode"] == "fp32" and "per-op overhead sets its time" in report["reason"], report
        ideal, measured = re.search(r"would take ([\d.e+-]+) ms \(([\d.e+-]+)%", report["reason"]).groups()
        assert 0 < float(ideal) and float(measured) < 100 * roofline_module.OVERHEAD_BOUND, report
        assert not (tmp_path / "t" / "plan.json").exists()
    monkeypatch.setattr(roofline_module, "OVERHEAD_BOUND", 0.0)  # the budget's verdict, however small the model
    monkeypatch.setattr(precision_module, "NEAR_LOSSLESS", "cos>=0.9999,max_rel<=1e-9")
    ov = convert("models:mlp", tmp_path / "ov", ConvertOptions(benchmark=False, backend="openvino", use_cache=False))
    report = ov.manifest["precision"]
    assert report["mode"] == "fp32", report
    if _host_computes("bf16"):
        assert "misses the near-lossless budget" in report["reason"] and "max_rel" in report["reason"], report
        assert all(f["max_rel"] > 1e-9 for f in report["accuracy"].values()), report
    else:
        assert "lists no bf16 support" in report["reason"], report
    assert all(f["max_abs"] <= 1e-4 for f in ov.manifest["verification"]["worst"].values())


def test_int8_plan_runs_int8_kernels_and_keeps_the_rest_wider(tmp_path, calib_dir):
    """An INT8 plan on OpenVINO: the execution graph's layers are read back, each lowered
    Linear runs an i8 kernel (on CPUs with VNNI or AMX-INT8), and on a host with native BF16
    the layers the budget keeps run BF16 (one engine, INT8 and BF16), else FP32."""
    from adapter.profiles.probe import probe_host

    options = _opts(mode="int8", budget="cos>=0.99", calib=str(calib_dir))
    result = convert("models:sensitive", tmp_path / "e", ConvertOptions(**{**options.__dict__, "backend": "openvino"}))
    report, config = result.manifest["precision"], result.manifest["backend"]["config"]
    kernels = config["kernel_precisions"]["FullyConnected"]
    ran = report["kernels"]
    assert ran["expected"] == "i8" and ran["lowered"] >= 1, ran
    wider = "bf16" if _host_computes("bf16") else "fp32"
    assert all(k["precision"] == wider for k in report["kept_fp32"]) and "layers.2" in {k["module"] for k in report["kept_fp32"]}
    if set(probe_host().features) & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        assert ran["ran_low"] == ran["lowered"] and not ran["not_low"], ran
        assert kernels.get("i8", 0) >= ran["lowered"], kernels
    assert sum(kernels.values()) == 4  # the four Linears, each one layer
    saved = json.loads((tmp_path / "e" / "plan.json").read_text())["options"]
    assert saved.get("hint", "fp32") == wider
    assert "quantizer" not in saved  # no attention in this graph: ONNX Runtime's tool, not NNCF


def test_onnxruntime_reports_which_quantized_products_run_integer_kernels(tmp_path, calib_dir):
    """ONNX Runtime's runtime graph is read back for quantized engines: INT8 dynamic becomes
    integer kernels (MatMulIntegerToFloat / DynamicQuantizeMatMul) for every lowered Linear;
    a static QDQ plan's report accounts for each lowered product, integer kernel or not."""
    dynamic = convert("adapter.zoo:gpt2", tmp_path / "d", ConvertOptions(  # its LM head is a MatMul (the rest Gemms)
        benchmark=False, backend="onnxruntime", precision=PrecisionOptions(mode="int8-dynamic")))  # fmt: skip
    config = dynamic.manifest["backend"]["config"]
    ran = dynamic.manifest["precision"]["kernels"]
    integer = sum(n for kinds in config["kernel_precisions"].values() for p, n in kinds.items() if p == "i8")
    assert ran["expected"] == "i8" and ran["lowered"] >= 1 and ran["ran_low"] == ran["lowered"] <= integer, (ran, config)
    static = convert("models:sensitive", tmp_path / "s", ConvertOptions(
        benchmark=False, backend="onnxruntime", precision=PrecisionOptions(mode="int8", budget="cos>=0.99", calib=str(calib_dir))))  # fmt: skip
    ran = static.manifest["precision"]["kernels"]
    assert ran["lowered"] >= 1 and ran["ran_low"] + len(ran["not_low"]) == ran["lowered"], ran
    assert all(p == "f32" for p in ran["not_low"].values()), ran
    plain = convert("models:sensitive", tmp_path / "f", ConvertOptions(benchmark=False, backend="onnxruntime"))
    assert "kernel_precisions" not in plain.manifest["backend"]["config"]  # an FP32 graph: no second session


def test_an_avx2_only_target_keeps_fp32_and_says_its_cpu_has_no_bf16(tmp_path):
    """The AVX2-only x86 class (the amd-epyc-rome profile: no AVX-512, BF16 or VNNI): the
    default convert keeps exact FP32 whichever backend wins, and the reason names the target's
    missing BF16 first; asking for BF16 there is refused with the same reason."""
    from adapter.core.errors import SourceError

    result = convert("models:mlp", tmp_path / "rome", ConvertOptions(benchmark=False, target="amd-epyc-rome"))
    report = result.manifest["precision"]
    assert report["mode"] == "fp32" and report["requested"] == "default", report
    assert report["reason"].startswith("target 'amd-epyc-rome' lists no bf16 support (it has fp32, int8)"), report
    assert all(f["max_abs"] <= 1e-4 for f in result.manifest["verification"]["worst"].values())
    with pytest.raises(SourceError, match="target 'amd-epyc-rome' lists no bf16 support"):
        convert("models:mlp", tmp_path / "bf16", ConvertOptions(benchmark=False, target="amd-epyc-rome",
                                                                 precision=PrecisionOptions(mode="bf16")))  # fmt: skip


def test_openvino_int8_plan_of_an_attention_model_goes_through_nncf(tmp_path):
    """OpenVINO's INT8 static plan of a graph with attention is NNCF's (its transformer
    preset, SmoothQuant scales before the quantized products), held to the budget like any plan; the modules
    the search keeps are NNCF's ignored scope, so every lowered product runs an i8 kernel
    and no kept one does."""
    from adapter.profiles.probe import probe_host

    options = ConvertOptions(benchmark=False, backend="openvino", precision=PrecisionOptions(mode="int8", budget="cos>=0.99"))
    result = convert("adapter.zoo:vit", tmp_path / "e", options)
    manifest = result.manifest
    assert json.loads((tmp_path / "e" / "plan.json").read_text())["options"]["quantizer"] == "nncf"
    assert manifest["verification"]["passed"] and manifest["verification"]["budget"]["passed"]
    accuracy = manifest["precision"]["accuracy"]
    assert all(figures["cos"] >= 0.99 for figures in accuracy.values()), accuracy
    graph = onnx.load(str(tmp_path / "e" / "model.onnx")).graph
    smoothed = [n.name for n in graph.node if "nncf_smooth_quant" in n.name]  # NNCF's SmoothQuant scales
    assert smoothed and any(n.op_type == "QuantizeLinear" for n in graph.node), [n.op_type for n in graph.node]
    ran = manifest["precision"]["kernels"]
    assert ran["lowered"] >= 1 and ran["lowered"] + len(manifest["precision"]["kept_fp32"]) >= 1, ran
    if set(probe_host().features) & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        assert ran["ran_low"] == ran["lowered"] and not ran["not_low"], ran
