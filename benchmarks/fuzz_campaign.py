"""A long hypothesis fuzz campaign over adapter's loaders, engine inputs and passes.

    python benchmarks/fuzz_campaign.py [--cases 10000] [--properties onnx,engine,npz,graphs,cli]
                                       [--out build/fuzz] [--json build/fuzz.json] [--seed 0]

The properties are the ``check_*`` functions of ``tests/test_fuzz.py`` (which runs a short
campaign of the same in CI):

- ``onnx``: mutated ONNX protobufs through ``prepare_source`` + ``import_source`` + canonicalize;
- ``cli``: the same through ``adapter check`` in-process (slower: capped at ``--cli-cases``);
- ``engine``: mutated feeds to ``Engine.run`` of a small artifact, then a good feed;
- ``npz``: mutated feeds saved as ``.npz`` through ``adapter run`` in-process;
- ``graphs``: random op-library graphs, ONNX Runtime before vs after canonicalize + fusion passes.

Each property runs in its own Python process; before each case the worker writes the case to
``<out>/<property>/current.pkl``, so a native crash (a signal) or a hang past the per-case alarm is
recorded with its reproducer and the worker is restarted for the cases left. Failures are
deduplicated by exception type + innermost adapter frame; the first reproducer of each distinct
failure is kept in ``<out>/<property>/failure-<n>.pkl`` (a pickle of the case this script made:
load it with ``pickle`` only from your own run). Exit status 1 when any property found a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROPERTIES = ("onnx", "engine", "npz", "graphs", "cli")


def _worker(prop: str, cases: int, seed: int, out: Path) -> None:
    """Run ``cases`` hypothesis examples of one property, appending results to ``out``."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_fuzz as tf
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    out.mkdir(parents=True, exist_ok=True)
    progress = out / "progress.json"
    done = json.loads(progress.read_text())["cases"] if progress.exists() else 0
    state = {"cases": done}
    workdir = Path(tempfile.mkdtemp(prefix=f"fuzz-{prop}-"))
    strategy = {"onnx": tf.mutated_onnx(), "cli": tf.mutated_onnx(), "graphs": tf.random_graph()}.get(prop)
    eut = None
    if prop in ("engine", "npz"):
        eut = tf.build_engine(workdir / "engine-src")
        strategy = tf.mutated_feed()

    def check(case):
        if prop in ("onnx", "cli"):
            return tf.check_onnx_bytes(case, workdir, via_cli=prop == "cli")
        if prop in ("engine", "npz"):
            return tf.check_engine_feed(eut, case, workdir, via_cli=prop == "npz")
        return tf.check_graph(*case)

    def record(case, failure):
        with open(out / "failures.jsonl", "a") as handle:
            handle.write(json.dumps({"key": failure.key, "kind": failure.kind, "where": failure.where,
                                     "message": failure.message, "case": state["cases"]}) + "\n")
        known = {p.stem for p in out.glob("failure-*.pkl")}
        name = f"failure-{len(known)}"
        keys = out / "keys.json"
        seen = json.loads(keys.read_text()) if keys.exists() else {}
        if failure.key not in seen:
            seen[failure.key] = name
            keys.write_text(json.dumps(seen))
            with open(out / f"{name}.pkl", "wb") as handle:
                pickle.dump({"property": prop, "case": case, "failure": failure.__dict__}, handle)

    @hseed(seed + done)
    @settings(max_examples=cases - done, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case):
        with open(out / "current.pkl", "wb") as handle:
            pickle.dump({"property": prop, "case": case}, handle)
        failure = check(case)
        state["cases"] += 1
        if failure is not None:
            record(case, failure)
        progress.write_text(json.dumps({"cases": state["cases"]}))

    if cases > done:
        run()


def _campaign(prop: str, cases: int, seed: int, out: Path, budget: float) -> dict:
    """Run one property's worker until ``cases`` are done, restarting it after a crash."""
    folder = out / prop
    for stale in ("progress.json", "failures.jsonl", "keys.json", "current.pkl"):
        (folder / stale).unlink(missing_ok=True)
    for old in folder.glob("failure-*.pkl"):
        old.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    crashes = []
    start = time.perf_counter()
    while True:
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        cmd = [sys.executable, __file__, "--worker", prop, "--cases", str(cases), "--seed", str(seed + len(crashes)),
               "--out", str(out)]
        left = max(60.0, budget - (time.perf_counter() - start))
        try:
            proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  timeout=left)
            code, tail = proc.returncode, proc.stderr.strip().splitlines()[-3:]
        except subprocess.TimeoutExpired:
            code, tail = "timeout", ["campaign time budget ran out"]
        progress = folder / "progress.json"
        done = json.loads(progress.read_text())["cases"] if progress.exists() else 0
        if code == 0 or code == "timeout":
            break
        # a signal or an escaped error: the case in current.pkl is the reproducer
        crash_file = folder / f"crash-{len(crashes)}.pkl"
        if (folder / "current.pkl").exists():
            os.replace(folder / "current.pkl", crash_file)
        crashes.append({"exit": code, "after_cases": done, "stderr": tail, "reproducer": str(crash_file)})
        progress.write_text(json.dumps({"cases": done + 1}))
        if len(crashes) >= 20 or done + 1 >= cases:
            break
    failures = []
    jsonl = folder / "failures.jsonl"
    if jsonl.exists():
        failures = [json.loads(line) for line in jsonl.read_text().splitlines() if line]
    distinct: dict[str, dict] = {}
    for f in failures:
        entry = distinct.setdefault(f["key"], {"count": 0, "example": f["message"]})
        entry["count"] += 1
    keys = json.loads((folder / "keys.json").read_text()) if (folder / "keys.json").exists() else {}
    for key, entry in distinct.items():
        entry["reproducer"] = str(folder / f"{keys.get(key, '?')}.pkl")
    return {
        "cases": done,
        "seconds": round(time.perf_counter() - start, 1),
        "failing_cases": len(failures),
        "distinct_failures": distinct,
        "crashes": crashes,
        "timed_out": code == "timeout",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="Cases per property.")
    parser.add_argument("--cli-cases", type=int, default=200, help="Cases for the (slow) in-process CLI property.")
    parser.add_argument("--properties", default=",".join(PROPERTIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=3600.0, help="Seconds per property at most.")
    parser.add_argument("--out", type=Path, default=Path("build/fuzz"))
    parser.add_argument("--json", type=Path, default=Path("build/fuzz.json"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.cases, args.seed, args.out / args.worker)
        return 0

    report = {"cases_per_property": args.cases, "seed": args.seed, "properties": {}}
    found = 0
    for prop in [p for p in args.properties.split(",") if p]:
        cases = min(args.cases, args.cli_cases) if prop == "cli" else args.cases
        result = _campaign(prop, cases, args.seed, args.out, args.budget)
        report["properties"][prop] = result
        found += len(result["distinct_failures"]) + len(result["crashes"])
        print(
            f"{prop:7s} {result['cases']:6d} cases in {result['seconds']:7.1f} s: "
            f"{len(result['distinct_failures'])} distinct failures ({result['failing_cases']} failing cases), "
            f"{len(result['crashes'])} crashes"
        )
        for key, entry in result["distinct_failures"].items():
            print(f"    {key} x{entry['count']}: {entry['example'][:160]}  [{entry['reproducer']}]")
        for crash in result["crashes"]:
            print(f"    crash (exit {crash['exit']}) after {crash['after_cases']} cases: {crash['reproducer']}")
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    print(f"Saved {args.json}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
