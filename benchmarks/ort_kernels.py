"""ONNX Runtime CPU: fused kernels against the standard ops they replace, in one run.

    python benchmarks/ort_kernels.py [--shapes 128x384,1024x384,128x768,1024x768] [--threads 2] [--json out.json]

Which ``com.microsoft`` fusion pays is a property of ONNX Runtime's kernels on a host, not
of the pattern: this script measures each fused op against its unfused form on the same
inputs, both as one-node sessions timed in rotating blocks, and checks that they agree.
The ``fusion-ort`` pipeline's choices cite its figures (``passes/fusion/normalization.py``).
ONNX Runtime's own re-fusion of the unfused forms is switched off for the measurement.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from adapter.core.timing import paired_median_ms

_MS = "com.microsoft"

# name -> (fused nodes, unfused nodes, width multiplier of the activation, params)
PAIRS = {
    "SkipLayerNormalization": (
        [helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta"], ["y"], domain=_MS)],
        [helper.make_node("Add", ["x", "skip"], ["sum"]), helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"])],
        1,
        ("gamma", "beta"),
    ),
    "SkipSimplifiedLayerNormalization": (
        [helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "gamma"], ["y"], domain=_MS)],
        [helper.make_node("Add", ["x", "skip"], ["sum"]), helper.make_node("SimplifiedLayerNormalization", ["sum", "gamma"], ["y"])],
        1,
        ("gamma",),
    ),
    "BiasGelu": (
        [helper.make_node("BiasGelu", ["x", "beta"], ["y"], domain=_MS)],
        [helper.make_node("Add", ["x", "beta"], ["sum"]), helper.make_node("Gelu", ["sum"], ["y"], domain=_MS)],
        4,
        ("beta",),
    ),
}  # fmt: skip


def _session(nodes, rows: int, width: int, params, threads: int) -> ort.InferenceSession:
    rng = np.random.default_rng(0)
    inputs = sorted({i for n in nodes for i in n.input if i in ("x", "skip")})
    graph = helper.make_graph(
        nodes,
        "kernel",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, rows, width]) for name in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, width])],
        [numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), p) for p in params],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(_MS, 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"],
        disabled_optimizers=["SkipLayerNormFusion", "BiasGeluFusion"],
    )  # fmt: skip


def measure(shapes: list[tuple[int, int]], threads: int, repeats: int = 60, rounds: int = 6) -> list[dict]:
    """One row per (op, shape): fused and unfused median µs, their ratio, max difference."""
    rows = []
    for op, (fused, unfused, widen, params) in PAIRS.items():
        for tokens, hidden in shapes:
            width = hidden * widen
            sessions = {
                kind: _session(nodes, tokens, width, params, threads)
                for kind, nodes in (("fused", fused), ("unfused", unfused))
            }
            rng = np.random.default_rng(1)
            feed = {"x": rng.standard_normal((1, tokens, width)).astype(np.float32)}
            feed["skip"] = rng.standard_normal((1, tokens, width)).astype(np.float32)
            feeds = {
                kind: {k: v for k, v in feed.items() if k in {i.name for i in session.get_inputs()}}
                for kind, session in sessions.items()
            }
            outputs = {kind: session.run(["y"], feeds[kind])[0] for kind, session in sessions.items()}
            calls = {kind: functools.partial(session.run, ["y"], feeds[kind]) for kind, session in sessions.items()}
            ms = paired_median_ms(calls, warmup=5, repeats=repeats, rounds=rounds, budget_s=20.0)
            rows.append({
                "op": op, "shape": [tokens, width], "threads": threads,
                "fused_us": round(ms["fused"] * 1e3, 1), "unfused_us": round(ms["unfused"] * 1e3, 1),
                "fused_over_unfused": round(ms["fused"] / ms["unfused"], 3),
                "max_abs_diff": float(np.abs(outputs["fused"] - outputs["unfused"]).max()),
            })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes", default="128x384,1024x384,128x768,1024x768", help="tokens x hidden, comma-separated"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    rows = measure(shapes, args.threads, args.repeats)
    print(f"ONNX Runtime {ort.__version__}, CPU provider, {args.threads} thread(s); median µs per call")
    print(f"{'op':34s} {'shape':>11s} {'fused':>9s} {'unfused':>9s} {'fused/unfused':>14s} {'max|diff|':>10s}")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        print(
            f"{r['op']:34s} {shape:>11s} {r['fused_us']:9.1f} {r['unfused_us']:9.1f} {r['fused_over_unfused']:14.2f} {r['max_abs_diff']:10.2e}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"onnxruntime": ort.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
