"""ONNX's backend node tests run two ways: ONNX Runtime on the model as shipped, and ONNX Runtime
on the model after adapter's passes (``canonicalize`` then ``fusion-ort``, or then ``fusion-standard``).

    python benchmarks/conformance.py [--pipelines fusion-ort,fusion-standard] [--every N] [--only REGEX]
                                     [--json build/conformance.json] [--data-dir DIR]

Test cases come from ``onnx/backend/test/data/node/<test>/`` (``model.onnx`` plus
``test_data_set_*/{input,output}_*.pb``) when that folder exists; the onnx wheel does not ship
it, so otherwise the same cases are generated in memory from ``onnx.backend.test.case.node``
(what onnx's ``backend-test-tools generate-data`` writes to that folder).

Outputs are compared the way onnx's ``onnx.backend.test.runner.Runner.assert_similar_outputs``
does: same count, same shape, same dtype, ``assert_allclose`` with the case's rtol / atol
(1e-3 / 1e-7 for every node case in onnx 1.23; onnx's runner has no per-test override table of
its own, backends pass overrides through ``include(..., rtol=...)``, and we pass none), bfloat16
compared in float32 with rtol at least 2**-6, strings exactly.

A case that passes directly but fails after a pipeline is a regression of our passes
(``broken``); the JSON lists each with the error. Exit status 1 when a case is broken and not in
:data:`KNOWN_BROKEN`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PIPELINES = ("fusion-ort", "fusion-standard")
"""Each is run after ``canonicalize``, as the backends do."""

KNOWN_BROKEN: dict[str, str] = {}
"""Case name -> why it fails through our passes (known bugs, kept visible; the test checks they still fail).

Empty: the five cases once here now pass (see FIXED)."""

FIXED: dict[str, str] = {
    "test_scan_sum": "identity-elimination: an Identity between two Scan-body outputs is put back (canonicalize.py)",
    "test_scan9_sum": "as test_scan_sum",
    "test_scan9_multi_state": "as test_scan_sum",
    "test_loop16_seq_none": "shape-inference skipped when control-flow bodies carry sequence/optional values",
    "test_split_to_sequence_1": "constant-folding leaves SplitToSequence with a non-constant split alone",
}
"""Cases our passes used to break (upstream bugs in onnx-ir 1.1.0 / onnxscript 0.7.2), and the workaround;
the suite runs them every time."""


@dataclass
class Case:
    """One node test: the model and its data sets."""

    name: str
    model: Any  # onnx.ModelProto
    data_sets: list[tuple[list[Any], list[Any]]]
    rtol: float = 1e-3
    atol: float = 1e-7


@dataclass
class Outcome:
    """The result of one case one way: ``pass``, ``fail`` (wrong numbers) or ``error`` (raised)."""

    status: str
    detail: str = ""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _node_data_dir() -> Path:
    import onnx

    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "node"


def _read_proto(path: str, type_proto) -> Any:
    import onnx
    from onnx import numpy_helper

    data = Path(path).read_bytes()
    if type_proto.HasField("sequence_type"):
        seq = onnx.SequenceProto()
        seq.ParseFromString(data)
        return numpy_helper.to_list(seq)
    if type_proto.HasField("optional_type"):
        opt = onnx.OptionalProto()
        opt.ParseFromString(data)
        return numpy_helper.to_optional(opt)
    return numpy_helper.to_array(onnx.load_tensor_from_string(data))


def _cases_from_dir(folder: Path) -> Iterator[Case]:
    import onnx

    for model_file in sorted(folder.glob("*/model.onnx")):
        model = onnx.load(str(model_file))
        sets = []
        for ds in sorted(glob.glob(str(model_file.parent / "test_data_set_*"))):
            n_in = len(glob.glob(os.path.join(ds, "input_*.pb")))
            n_out = len(glob.glob(os.path.join(ds, "output_*.pb")))
            ins = [_read_proto(os.path.join(ds, f"input_{i}.pb"), model.graph.input[i].type) for i in range(n_in)]
            outs = [_read_proto(os.path.join(ds, f"output_{i}.pb"), model.graph.output[i].type) for i in range(n_out)]
            sets.append((ins, outs))
        yield Case(model_file.parent.name, model, sets)


def _cases_generated() -> Iterator[Case]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        generated = collect_testcases(None)
    for tc in sorted(generated, key=lambda c: c.name):
        if tc.model is None or not tc.data_sets:
            continue
        yield Case(tc.name, tc.model, [(list(i), list(o)) for i, o in tc.data_sets], tc.rtol, tc.atol)


def load_cases(data_dir: Path | None = None) -> list[Case]:
    """Every node case, from ``data_dir`` (the onnx layout) or, without one, generated by onnx."""
    folder = data_dir or _node_data_dir()
    if folder.is_dir():
        return list(_cases_from_dir(folder))
    return list(_cases_generated())


def assert_similar(expected: list[Any], actual: list[Any], rtol: float, atol: float) -> None:
    """Compare outputs with the rules of onnx's backend test runner (raises AssertionError)."""
    np.testing.assert_equal(len(actual), len(expected))
    for ref, out in zip(expected, actual):
        if isinstance(ref, list | tuple):
            if not isinstance(out, list | tuple):
                raise AssertionError(f"expected a sequence, got {type(out).__name__}")
            assert_similar(list(ref), list(out), rtol, atol)
            continue
        if ref is None or out is None:
            if ref is not out:
                raise AssertionError(f"expected {ref!r}, got {out!r}")
            continue
        out = np.asarray(out)
        ref = np.asarray(ref)
        np.testing.assert_array_equal(out.shape, ref.shape, err_msg="output has the wrong shape")
        if ref.dtype == object:
            np.testing.assert_array_equal(out, ref)
            continue
        np.testing.assert_equal(out.dtype, ref.dtype)
        this_rtol = rtol
        if out.dtype.name == "bfloat16":
            this_rtol = max(rtol, 2**-6)
            out, ref = out.astype(np.float32), ref.astype(np.float32)
        np.testing.assert_allclose(out, ref, rtol=this_rtol, atol=atol)


def _session(model_bytes: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def _run_model(model, case: Case) -> None:
    """Run every data set of ``case`` on ``model`` (a ModelProto) with ONNX Runtime; raise on mismatch."""
    session = _session(model.SerializeToString())
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in case.model.graph.input if i.name not in initializers]
    outputs = [o.name for o in case.model.graph.output]
    for ins, expected in case.data_sets:
        feed = dict(zip(inputs, ins))
        got = session.run(outputs, feed)
        assert_similar(expected, got, case.rtol, case.atol)


def through_passes(model, pipeline: str):
    """The ModelProto after ``canonicalize`` then ``pipeline``, as adapter's backends see it."""
    import onnx_ir as ir

    from adapter.passes.pipeline import build_pipeline, run_pipeline

    graph = ir.from_proto(model)
    run_pipeline(graph, build_pipeline(["canonicalize", pipeline]))
    return ir.to_proto(graph)


def _classify(fn) -> Outcome:
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            fn()
    except AssertionError as exc:
        return Outcome("fail", _first_line(exc), time.perf_counter() - start)
    except Exception as exc:  # a refusal or a crash of one case is a result, not the end of the run
        return Outcome("error", f"{type(exc).__name__}: {_first_line(exc)}", time.perf_counter() - start)
    return Outcome("pass", "", time.perf_counter() - start)


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:500]


def run_case(case: Case, pipelines: tuple[str, ...] = PIPELINES) -> dict[str, Outcome]:
    """The case run directly and through each pipeline."""
    results = {"direct": _classify(lambda: _run_model(case.model, case))}
    for name in pipelines:
        holder: dict[str, Any] = {}

        def passes_then_ort(name=name, holder=holder):
            try:
                holder["model"] = through_passes(case.model, name)
            except Exception as exc:
                raise RuntimeError(f"passes raised {type(exc).__name__}: {_first_line(exc)}") from exc
            _run_model(holder["model"], case)

        results[name] = _classify(passes_then_ort)
    return results


def summarise(rows: dict[str, dict[str, Outcome]], pipelines: tuple[str, ...]) -> dict[str, Any]:
    """Pass rates per way, and the cases each pipeline breaks."""
    total = len(rows)
    direct = sum(r["direct"].status == "pass" for r in rows.values())
    summary: dict[str, Any] = {
        "cases": total,
        "direct": {"passed": direct, "rate": direct / total if total else 0.0},
        "pipelines": {},
    }
    for name in pipelines:
        passed = sum(r[name].status == "pass" for r in rows.values())
        broken = {
            case: {"status": r[name].status, "detail": r[name].detail, "known": case in KNOWN_BROKEN}
            for case, r in rows.items()
            if r["direct"].status == "pass" and r[name].status != "pass"
        }
        fixed = sorted(c for c, r in rows.items() if r["direct"].status != "pass" and r[name].status == "pass")
        summary["pipelines"][name] = {
            "passed": passed,
            "rate": passed / total if total else 0.0,
            "passed_among_direct_passes": sum(
                r[name].status == "pass" for r in rows.values() if r["direct"].status == "pass"
            ),
            "broken": broken,
            "pass_only_through_passes": fixed,
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--every", type=int, default=1, help="Run every Nth case (1: all).")
    parser.add_argument("--only", default=None, help="Regular expression on case names.")
    parser.add_argument("--data-dir", type=Path, default=None, help="A node-test folder in onnx's layout.")
    parser.add_argument("--json", type=Path, default=Path("build/conformance.json"))
    args = parser.parse_args(argv)
    pipelines = tuple(p for p in args.pipelines.split(",") if p)

    start = time.perf_counter()
    cases = load_cases(args.data_dir)[:: args.every]
    if args.only:
        cases = [c for c in cases if re.search(args.only, c.name)]
    rows: dict[str, dict[str, Outcome]] = {}
    for i, case in enumerate(cases):
        rows[case.name] = run_case(case, pipelines)
        if (i + 1) % 200 == 0:
            print(f"... {i + 1}/{len(cases)} cases", file=sys.stderr)
    summary = summarise(rows, pipelines)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["source"] = (
        str(args.data_dir or _node_data_dir())
        if (args.data_dir or _node_data_dir()).is_dir()
        else ("generated from onnx.backend.test.case.node")
    )
    import onnx
    import onnxruntime

    summary["versions"] = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    summary["results"] = {
        case: {way: {"status": o.status, "detail": o.detail} for way, o in r.items()} for case, r in rows.items()
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1))

    print(f"{summary['cases']} node cases ({summary['source']}), {summary['seconds']} s")
    print(f"  ONNX Runtime directly:        {summary['direct']['passed']} passed ({summary['direct']['rate']:.1%})")
    unknown_broken = 0
    for name, s in summary["pipelines"].items():
        print(
            f"  canonicalize + {name:15s}: {s['passed']} passed ({s['rate']:.1%}); broken vs direct: {len(s['broken'])}"
        )
        for case, b in sorted(s["broken"].items()):
            tag = " (known)" if b["known"] else ""
            print(f"    {case}{tag}: {b['status']}: {b['detail'][:200]}")
            unknown_broken += not b["known"]
    print(f"Saved {args.json}")
    return 1 if unknown_broken else 0


if __name__ == "__main__":
    sys.exit(main())
