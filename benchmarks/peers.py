"""adapter against its peers, measured in one run on this machine.

    python benchmarks/peers.py [--models minilm,gpt2,vit] [--batches 1,8] [--seq 128]
                               [--repeats 30] [--no-compile] [--int8] [--json build/peers.json]

Per model and batch size, on the same inputs: PyTorch eager FP32, eager BF16 autocast,
torch.compile, ONNX Runtime FP32 on the plain dynamo export and on onnxscript's ORT
fusions, ONNX Runtime INT8 dynamic (``quantize_dynamic`` with its defaults), OpenVINO FP32
and BF16 (BF16 only where the CPU has BF16 arithmetic), and adapter's engines: the
default (``--backend auto``, ``--precision default``), FP32 on ONNX Runtime, BF16 where the
host computes it, and with ``--int8`` the precision issue's plan (MiniLM, ``--precision
auto --accuracy-budget cos>=0.995``, calibrated on the project's sentences).

Every row: median latency after warm-up (all engines timed in rotating blocks), throughput,
speedup vs eager, ratio to the fastest peer (peers are everything that is not adapter) and
to the fastest peer whose mean per-token cosine to eager FP32 is at least 0.999, per-token
cosine to eager FP32 (mean and min over the first output's last axis), and achieved FLOP/s
(FLOPs counted by torch's FlopCounterMode on the eager model) as a fraction of the host
profile's measured peak at the engine's precision (BF16, INT8, else FP32). A table per
case is printed; everything is saved as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import adapter
from adapter import ConvertOptions, convert, load
from adapter.converter.precision import PrecisionOptions
from adapter.core.timing import paired_median_ms

torch.set_num_threads(len(os.sched_getaffinity(0)))  # every peer gets every CPU

Run = Callable[[dict[str, np.ndarray]], np.ndarray]
SENTENCES = Path(adapter.__file__).parent / "data" / "sentences.txt"
FAILED: dict[str, dict[str, str]] = {}
"""Engines that could not load a model, per model: reported in the JSON."""
FAITHFUL = 0.999
"""Mean per-token cosine to eager FP32 a peer needs to count as the fastest faithful peer."""


def _feeds(inputs: dict[str, torch.Tensor], batch: int, seq: int | None) -> dict[str, np.ndarray]:
    """The zoo's example inputs resized to ``batch`` (repeating rows) and, for token
    inputs, ``seq`` positions (ids cycled, mask all ones)."""
    feeds = {}
    for name, value in inputs.items():
        array = value.numpy()
        if seq is not None and name in ("input_ids", "attention_mask"):
            array = np.resize(array[0], seq)[None] if name == "input_ids" else np.ones((1, seq), array.dtype)
        reps = -(-batch // array.shape[0])
        feeds[name] = np.ascontiguousarray(np.concatenate([array] * reps)[:batch])
    return feeds


def _first(outputs) -> np.ndarray:
    if isinstance(outputs, dict):
        outputs = next(iter(outputs.values()))
    elif isinstance(outputs, (list, tuple)):
        outputs = outputs[0]
    if isinstance(outputs, torch.Tensor):
        outputs = outputs.detach().float().numpy()
    return np.asarray(outputs, dtype=np.float32)


def _cosines(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    got, want = got.reshape(-1, want.shape[-1]), want.reshape(-1, want.shape[-1])
    cos = np.sum(got * want, -1) / np.maximum(np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1), 1e-30)
    return float(cos.mean()), float(cos.min())


def _flops(module: torch.nn.Module, feed: dict[str, np.ndarray]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(**{k: torch.from_numpy(v) for k, v in feed.items()})
    return float(counter.get_total_flops())


def _torch_runs(module: torch.nn.Module, compile_it: bool) -> dict[str, Callable[[], Run]]:
    def eager() -> Run:
        def run(feed):
            with torch.inference_mode():
                return _first(module(**{k: torch.from_numpy(v) for k, v in feed.items()}))

        return run

    def autocast() -> Run:
        def run(feed):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return _first(module(**{k: torch.from_numpy(v) for k, v in feed.items()}))

        return run

    def compiled() -> Run:
        fast = torch.compile(module)

        def run(feed):
            with torch.inference_mode():
                return _first(fast(**{k: torch.from_numpy(v) for k, v in feed.items()}))

        return run

    runs = {"PyTorch eager FP32": eager, "PyTorch eager BF16 autocast": autocast}
    if compile_it:
        runs["torch.compile FP32"] = compiled
    return runs


def _export(module: torch.nn.Module, inputs: dict[str, torch.Tensor], dynamic, folder: Path) -> tuple[Path, Path]:
    """The plain dynamo export a user would make, and the same with onnxscript's ORT fusions."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    shapes = {name: {axis: torch.export.Dim.AUTO for axis in axes} for name, axes in dynamic.items()}
    program = torch.onnx.export(module, (), kwargs=inputs, dynamo=True, dynamic_shapes=shapes, verbose=False)
    plain = folder / "plain.onnx"
    program.save(str(plain))
    model = ir.load(plain)
    fused_model, counts = optimize_for_ort(model)
    fused = folder / "ort-fused.onnx"
    ir.save(fused_model, fused)
    print(f"  onnxscript ORT fusions: {', '.join(f'{k} {v}' for k, v in counts.items() if v) or 'none'}")
    return plain, fused


def _ort(path: Path, threads: int) -> Callable[[], Run]:
    def make() -> Run:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # ORT's default counts physical cores: give it every CPU
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return lambda feed: _first(session.run(names[:1], feed))

    return make


def _ort_int8_dynamic(path: Path, threads: int) -> Callable[[], Run]:
    """ONNX Runtime's quantize_dynamic on the plain export, its defaults (no care taken)."""

    def make() -> Run:
        from onnxruntime.quantization import quantize_dynamic

        quantized = path.with_name("ort-int8-dynamic.onnx")
        quantize_dynamic(str(path), str(quantized))
        return _ort(quantized, threads)()

    return make


def _openvino(path: Path, precision: str, threads: int) -> Callable[[], Run]:
    def make() -> Run:
        import openvino as ov

        compiled = ov.Core().compile_model(
            str(path),
            "CPU",
            {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads},
        )
        request = compiled.create_infer_request()
        return lambda feed: _first(list(request.infer(feed).values()))

    return make


def _engine(folder: Path) -> Callable[[], Run]:
    def make() -> Run:
        engine = load(folder)
        return lambda feed: _first(engine.run(feed))

    return make


def _adapter_engines(name: str, source: str, out: Path, host_bf16: bool, int8: bool) -> dict[str, Callable[[], Run]]:
    built: dict[str, Callable[[], Run]] = {}
    plans = {"adapter default (auto)": ConvertOptions(benchmark=False)}
    plans["adapter FP32 onnxruntime"] = ConvertOptions(benchmark=False, backend="onnxruntime")
    if host_bf16:
        plans["adapter BF16 openvino"] = ConvertOptions(
            benchmark=False, backend="openvino", precision=PrecisionOptions(mode="bf16")
        )
    if int8 and name == "minilm":
        precision = PrecisionOptions(mode="auto", budget="cos>=0.995", calib_text=str(SENTENCES))
        plans["adapter auto plan (cos>=0.995)"] = ConvertOptions(benchmark=False, precision=precision)
    for label, options in plans.items():
        folder = out / name / label.split(" (")[0].replace(" ", "-").lower()
        started = time.perf_counter()
        result = convert(source, folder, options)
        chosen = result.manifest["backend"]["name"]
        mode = result.manifest["precision"]["mode"]
        print(f"  {label}: {chosen} {mode}, built in {time.perf_counter() - started:.1f} s")
        built[f"{label} -> {chosen} {mode}" if "auto" in label or "plan" in label else label] = _engine(folder)
    return built


def build_runs(name: str, args, host, out: Path, folder: Path):
    """Every engine for one zoo model: (runs by label, peer labels, module, inputs, seq)."""
    from adapter import zoo

    source = f"adapter.zoo:{name}"
    module, inputs, dynamic = getattr(zoo, name)()
    host_bf16 = "bf16" in host.precisions
    seq = None
    if "input_ids" in inputs:  # at most the sequence range the model declares (gpt2's zoo config: 64)
        limit = getattr(dynamic["input_ids"].get(1), "max", None)
        seq = min(args.seq, limit) if limit else args.seq
    print(f"{name}: exporting the peers' ONNX and building adapter's engines")
    plain, fused = _export(module, inputs, dynamic, folder)
    makers: dict[str, Callable[[], Run]] = dict(_torch_runs(module, args.compile))
    makers["ONNX Runtime FP32"] = _ort(plain, host.cores)
    makers["ONNX Runtime FP32 + onnxscript fusions"] = _ort(fused, host.cores)
    makers["ONNX Runtime INT8 dynamic"] = _ort_int8_dynamic(plain, host.cores)
    makers["OpenVINO FP32"] = _openvino(plain, "f32", host.cores)
    if host_bf16:
        makers["OpenVINO BF16"] = _openvino(plain, "bf16", host.cores)
    peers = set(makers)
    makers.update(_adapter_engines(name, source, out, host_bf16, args.int8))
    runs = {}
    for label, make in makers.items():
        try:
            runs[label] = make()
        except Exception as exc:  # a peer that cannot even load the model is reported, not fatal
            print(f"  {label}: FAILED to build: {str(exc).strip().splitlines()[-1][:300]}")
            FAILED.setdefault(name, {})[label] = str(exc).strip().splitlines()[-1][:300]
    return runs, peers & set(runs), module, inputs, seq


def bench_model(name: str, args, host, out: Path) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix=f"peers-{name}-") as tmp:
        runs, peers, module, inputs, seq = build_runs(name, args, host, out, Path(tmp))
        rows = []
        for batch in args.batches:
            feed = _feeds(inputs, batch, seq)
            want = runs["PyTorch eager FP32"](feed)
            flops = _flops(module, feed)
            # every engine timed in rotating blocks, so background load hits all of them alike
            times = paired_median_ms(
                {label: (lambda r=run, f=feed: r(f)) for label, run in runs.items()},
                warmup=5, repeats=args.repeats, budget_s=args.budget * len(runs),
            )  # fmt: skip
            case = []
            for label, run in runs.items():
                mean_cos, min_cos = _cosines(run(feed), want)
                ms = times[label]
                case.append({"model": name, "batch": batch, "seq": seq, "engine": label, "peer": label in peers,
                             "latency_ms": ms, "throughput": batch * 1e3 / ms, "cos_mean": mean_cos, "cos_min": min_cos,
                             "flops": flops, "achieved_flops": flops / (ms * 1e-3)})  # fmt: skip
            eager_ms = next(r["latency_ms"] for r in case if r["engine"] == "PyTorch eager FP32")
            fastest = min((r for r in case if r["peer"]), key=lambda r: r["latency_ms"])
            faithful = [r for r in case if r["peer"] and r["cos_mean"] >= FAITHFUL]
            fastest_faithful = min(faithful, key=lambda r: r["latency_ms"]) if faithful else None
            for r in case:
                r["speedup_vs_eager"] = eager_ms / r["latency_ms"]
                r["ratio_to_fastest_peer"] = r["latency_ms"] / fastest["latency_ms"]
                r["fastest_peer"] = fastest["engine"]
                r["ratio_to_fastest_faithful_peer"] = r["latency_ms"] / fastest_faithful["latency_ms"] if faithful else None
                r["fastest_faithful_peer"] = fastest_faithful["engine"] if faithful else "none"
                r["peak"] = _peak_of(r["engine"], host)
                r["peak_fraction"] = r["achieved_flops"] / host.peak(r["peak"])
            _print_case(case)
            rows += case
    return rows


def _peak_of(label: str, host) -> str:
    """The host peak an engine's arithmetic runs at, read from its label (BF16, INT8, else FP32)."""
    lowered = label.lower()
    for key in ("int8", "bf16"):
        if key in lowered and key in host.peak_flops:
            return key
    return "fp32"


def _print_case(case: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    first = case[0]
    title = f"{first['model']} batch {first['batch']}" + (f" seq {first['seq']}" if first["seq"] else "")
    table = Table(
        title=f"{title} ({first['flops'] / 1e9:.2f} GFLOP per run; fastest peer: {first['fastest_peer']}; "
        f"fastest with cos >= {FAITHFUL}: {first['fastest_faithful_peer']})"
    )
    columns = ("engine", "ms", "items/s", "vs eager", "vs fastest peer", f"vs fastest cos>={FAITHFUL}", "cos mean",
               "cos min", "% of peak")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col == "engine" else "right")
    for r in sorted(case, key=lambda r: r["latency_ms"]):
        style = "bold" if not r["peer"] else ""
        table.add_row(
            r["engine"], f"{r['latency_ms']:.2f}", f"{r['throughput']:.1f}", f"{r['speedup_vs_eager']:.2f}×",
            f"{r['ratio_to_fastest_peer']:.2f}×", (f"{r['ratio_to_fastest_faithful_peer']:.2f}×" if r["ratio_to_fastest_faithful_peer"] else "-"), f"{r['cos_mean']:.6f}",
            f"{r['cos_min']:.6f}", f"{100 * r['peak_fraction']:.1f} {r['peak']}", style=style,
        )  # fmt: skip
    Console(width=180).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm", help="zoo names, comma-separated (minilm,gpt2,vit,...)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--budget", type=float, default=30.0, help="seconds at most per measurement")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="leave torch.compile out")
    parser.add_argument("--int8", action="store_true", help="add the INT8 precision plan (MiniLM; minutes)")
    parser.add_argument("--out", type=Path, default=Path("build/peers"))
    parser.add_argument("--json", type=Path, default=Path("build/peers.json"))
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]

    from adapter.profiles.probe import probe_host

    host = probe_host()
    started = time.perf_counter()
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name.strip(), args, host, args.out)
    report = {
        "machine": {"cpu": host.description, "features": list(host.features), "cores": host.cores,
                    "fp32_peak_flops": host.peak("fp32"), "python": platform.python_version(),
                    "torch": torch.__version__},
        "settings": {k: str(v) for k, v in vars(args).items()},
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
        "failed": FAILED,
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"saved {args.json} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
