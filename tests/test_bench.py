"""``adapter bench``: suites, history, statistics and the compare verdicts.

The false-positive / false-negative figures on real timings come from
``benchmarks/compare_trials.py`` (10 trials of the same engine twice and of a planted 20%
slowdown); ``tests/test_benchmarks.py`` runs one short trial of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from adapter.bench import runner as bench
from adapter.bench.stats import judge, mann_whitney_own, robust_rsd, smallest_p
from adapter.core import machine_probe as _machine_probe
from adapter.core.errors import AdapterError, SourceError

TESTS = Path(__file__).parent
ROOT = TESTS.parent
BATCH = 4096

SUITE = """\
name: mlp-test
repeats: 7
iterations: 20
warmup: 2
cases:
  - model: models:mlp
    backend: onnxruntime
    threads: 1
    batch_sizes: [{batches}]
"""


@pytest.fixture
def bench_cli(cli, monkeypatch):
    """The CLI with the bench group registered (the lead registers it in cli.py)."""
    from adapter.cli.bench import bench as bench_group
    from adapter.cli.main import cli as group

    monkeypatch.setitem(group.commands, "bench", bench_group)
    return cli


@pytest.fixture(scope="module")
def mlp_engine(tmp_path_factory):
    """The test MLP converted for this host (ONNX Runtime, one thread) and a batch-4096 feed."""
    from adapter import ConvertOptions, convert, load

    folder = tmp_path_factory.mktemp("mlp-engine")
    options = ConvertOptions(backend="onnxruntime", backend_options=(("threads", 1),), benchmark=False)
    engine = load(convert("models:mlp", folder / "engine", options).path)
    feed = {"x": np.random.default_rng(0).standard_normal((BATCH, 8)).astype(np.float32)}
    return engine, feed


# ---------------------------------------------------------------- statistics (synthetic)


def test_mann_whitney_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for trial in range(60):
        n1, n2 = rng.integers(2, 16, 2)
        x, y = rng.normal(0, 1, n1), rng.normal(0.7, 1, n2)
        if trial % 3 == 0:  # ties: the normal approximation with tie correction
            x, y = np.round(x, 1), np.round(y, 1)
        tied = len(np.unique(np.concatenate([x, y]))) < n1 + n2
        method = "asymptotic" if tied or n1 + n2 > 40 else "exact"
        want = scipy_stats.mannwhitneyu(x, y, alternative="two-sided", method=method)
        u, p = mann_whitney_own(x, y)
        assert u == pytest.approx(want.statistic)
        assert p == pytest.approx(want.pvalue, rel=1e-9, abs=1e-12)


def test_smallest_p_and_exact_separation():
    assert smallest_p(5, 5) == pytest.approx(2 / 252)
    assert mann_whitney_own([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])[1] == pytest.approx(2 / 252)
    assert mann_whitney_own([1, 2, 3], [1.5, 2.5, 3.5])[1] == pytest.approx(0.7)


def test_judge_verdicts():
    rng = np.random.default_rng(2)
    base = 10 * (1 + 0.01 * rng.standard_normal(9))
    assert judge("c", base, base * 1.25).verdict == "regression"
    assert judge("c", base, base * 0.75).verdict == "improvement"
    assert judge("c", base, base * 1.03).verdict == "unchanged"  # significant, but under the threshold
    wide = 10 * np.array([0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 0.85, 1.15])  # robust SD ≈ 22%: band ≈ 39%
    noisy = judge("c", wide, wide * 1.3)  # past the threshold, inside the noise band
    assert noisy.verdict == "noisy" and "noise band" in noisy.note
    few = judge("c", [10, 10.1], [13, 13.1])  # 2 vs 2 samples cannot reach p < 0.01
    assert few.verdict == "regression" and "cannot reach" in few.note
    assert judge("c", [], [1.0]).verdict == "missing"
    assert robust_rsd([10, 10, 10]) == 0


# ---------------------------------------------------------------- suites


def test_suite_expands_cases(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        textwrap.dedent("""\
        name: grid
        threads: 2
        cases:
          - model: adapter.zoo:minilm
            targets: [host, intel-xeon-spr]
            precisions: [fp32, int8-dynamic]
            batch_sizes: [1, 8]
            seq: 64
        """)
    )
    suite = bench.load_suite(path)
    assert len(suite.cases) == 8 and suite.repeats == 5
    assert suite.cases[0].name == "minilm host fp32 b1 s64" and suite.cases[0].threads == 2
    assert bench.load_suite(path, threads=1).cases[-1].threads == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("cases: []", "non-empty 'cases'"),
        ("cases: [{model: m.py:f, batch_sizes: [0]}]", "positive integer"),
        ("cases: [{model: m.py:f, colour: red}]", "unknown keys colour"),
        ("repeats: many\ncases: [{model: m.py:f}]", "repeats must be"),
        ("settle_s: -1\ncases: [{model: m.py:f}]", "settle_s must be a number of seconds"),
        ("cases: [{model: a.py:f}, {model: b.py:f}]", "listed twice"),
        ("cases: [{model: [", "not valid YAML"),
    ],
)
def test_suite_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SourceError, match=message):
        bench.load_suite(path)


def test_settle_waits_for_a_steady_speed():
    """A function that runs slow for its first calls, then steady: settle returns once steady."""
    from adapter.core.timing import settle

    calls = []

    def work():
        calls.append(1)
        time.sleep(0.004 if len(calls) < 12 else 0.001)

    outcome = settle(work, max_s=5.0)
    assert outcome["steady"] and len(calls) >= 12 + 10 and outcome["seconds"] < 5.0, (outcome, len(calls))
    # calls of 1, 2, 3 ms in turn, one per block: never steady, so it gives up at max_s and says so
    never = settle(lambda: time.sleep(0.001 * (1 + len(calls) % 3)) or calls.append(1), max_s=0.2, block=1)
    assert not never["steady"] and never["seconds"] >= 0.2, never


def test_feed_resizes_example_inputs():
    from adapter.core.specs import Dim, TensorSpec

    specs = [
        TensorSpec("input_ids", "int64", (Dim("batch", 1, 64), Dim("seq", 1, 512))),
        TensorSpec("attention_mask", "int64", (Dim("batch", 1, 64), Dim("seq", 1, 512))),
    ]
    example = {"input_ids": np.array([[5, 6, 7], [8, 9, 10]]), "attention_mask": np.array([[1, 1, 0], [1, 0, 0]])}
    case = bench.Case("c", "m.py:f", batch=3, seq=5)
    feed = bench.make_feed(case, specs, example)
    assert feed["input_ids"].tolist() == [[5, 6, 7, 5, 6], [8, 9, 10, 8, 9], [5, 6, 7, 5, 6]]
    assert feed["attention_mask"].shape == (3, 5) and feed["attention_mask"].min() == 1
    with pytest.raises(SourceError, match="allows 1..64, not 100"):
        bench.make_feed(bench.Case("c", "m.py:f", batch=100), specs, example)
    fixed = [TensorSpec("x", "float32", (2, 8))]
    with pytest.raises(SourceError, match="fixed size 2"):
        bench.make_feed(bench.Case("c", "m.py:f", batch=4), fixed, {})


# ---------------------------------------------------------------- history


def test_history_selectors(tmp_path):
    store = bench.History(tmp_path / "h.sqlite")
    for index in range(3):
        run = {
            "run_id": f"run{index}",
            "suite": "s",
            "created": "2026-01-01T00:00:00+00:00",
            "fingerprint": {"machine_id": "m"},
            "cases": [{"name": "a", "samples_ms": [1.0 + index], "median_ms": 1.0 + index}],
        }
        assert store.add_run(run) == 1
    assert store.load_run("latest")["run_id"] == "run2"
    assert store.load_run("latest~2")["run_id"] == "run0"
    assert store.load_run("run1")["cases"][0]["median_ms"] == 2.0
    with pytest.raises(AdapterError, match="matches 3 runs"):
        store.load_run("run")
    with pytest.raises(AdapterError, match="holds 3 run"):
        store.load_run("latest~3")
    assert store.medians("a", "m", exclude_run="run2") == [2.0, 1.0]
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(AdapterError, match="not a bench history"):
        bench.History(tmp_path / "junk.sqlite")


WRITER = """
import sys, time
from adapter.bench.history import History
path, tag, runs, cases, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
while time.time() < start:
    time.sleep(0.001)
for i in range(runs):
    History(path).add_run({
        "run_id": f"{tag}-{i}", "suite": "race", "created": "now", "fingerprint": {"machine_id": tag},
        "cases": [{"name": f"case{c}", "samples_ms": [1.0, 2.0], "median_ms": 1.5} for c in range(cases)],
    })
print(time.time() - start)
"""


def test_history_survives_concurrent_writers(tmp_path):
    """Two processes append runs to one fresh database at the same moment: no row is lost."""
    db, runs, cases = tmp_path / "race.sqlite", 120, 4
    start = time.time() + 1.5  # both processes have imported adapter by then
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db), tag, str(runs), str(cases), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for tag in ("a", "b")
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (_out, errs) in zip(procs, outputs):
        assert proc.returncode == 0, errs
    store = bench.History(db)
    seconds = [float(out) for out, _ in outputs]
    print(f"\nSQLite: 2 writers × {runs} runs × {cases} cases, {store.count()} rows, writers took {seconds} s")
    assert store.count() == 2 * runs * cases
    assert len(store.runs("race")) == 2 * runs


# ---------------------------------------------------------------- real engine: run, history, CLI


def test_run_suite_history_and_cli(tmp_path, bench_cli, mlp_engine):
    suite = tmp_path / "mlp.yaml"
    suite.write_text(SUITE.format(batches="256, 4096"))
    db = tmp_path / "history.sqlite"
    results = bench.run_suite(suite, history=db)
    assert [c["name"] for c in results["cases"]] == ["mlp host fp32 b256", "mlp host fp32 b4096"]
    case = results["cases"][1]
    assert len(case["samples_ms"]) == 7 and case["median_ms"] > 0 and case["inputs"] == {"x": [4096, 8]}
    assert [len(block) for block in case["calls_ms"]] == [20] * 7 and case["statistic"] == "min"
    assert case["samples_ms"][0] == pytest.approx(min(case["calls_ms"][0]), abs=1e-5)
    assert case["backend"] == "onnxruntime" and case["engine_threads"] == 1
    assert case["throughput"] == pytest.approx(4096e3 / case["median_ms"])
    fp = results["fingerprint"]
    assert fp["cores"] >= 1 and fp["cpu"] and fp["libraries"]["onnxruntime"] and len(fp["machine_id"]) == 16
    assert bench.History(db).count() == 2
    # `adapter bench SUITE.yaml` is `adapter bench run SUITE.yaml`
    code, out, err = bench_cli("bench", suite, "--history", db, "-o", tmp_path / "second.json")
    assert code == 0, err
    assert "mlp host fp32 b4096" in out and bench.History(db).count() == 4 and "machine guard: " in out
    assert results["guard"]["level_ms"] > 0 and results["settings"]["guard_s"] == 30
    assert [len(c["guard"]["probe_ms"]) for c in results["cases"]] == [7, 7]
    code, out, err = bench_cli("bench", "compare", "history:latest~1", "history:latest", "--history", db, "--json")
    assert code in (0, 3), err
    data = json.loads(out)
    assert {v["case"] for v in data["verdicts"]} == {"mlp host fp32 b256", "mlp host fp32 b4096"}
    assert data["machine_differences"] == [] and "load_warnings" in data
    assert results["load_average"]["before"] is not None
    busy = {"load_average": {"before": 9.5, "after": 3.0}, "fingerprint": {"cores": 2}}
    assert bench.load_warnings(busy, "baseline") == [
        "the baseline ran at load average 9.5 on 2 cores: other processes competed for the CPU"
    ]
    code, out, err = bench_cli("bench", "compare", "history:nope", "history:latest", "--history", db)
    assert code == 1 and "matches no run" in err and "Traceback" not in err
    code, out, err = bench_cli("bench", tmp_path / "missing.yaml", "--no-history")
    assert code == 2 and "Cannot read the bench suite" in err and "Traceback" not in err


def _guarded_run(engine, feed, monkeypatch, slow: set[int], guard_s: float) -> tuple[list[list[float]], dict]:
    """12 blocks of the test MLP under the machine guard, the probe's samples scripted: the
    ``slow`` ones (counted from 0, calibration's ten first) read 1.5x the level, the rest
    the level. Slow windows themselves cannot be made on demand on this VM (a process
    streaming 256 MiB copies on the other CPU slowed the engine 1.0-1.5x from one try to
    the next), so the probe's readings are scripted and the engine is real."""
    readings = iter(0.5 * (1.5 if i in slow else 1.0) for i in range(10_000))

    def sample(self):
        ms = next(readings)
        _machine_probe._seen_ms.append(ms)
        return ms

    monkeypatch.setattr(_machine_probe, "_seen_ms", [])
    monkeypatch.setattr(_machine_probe.MachineProbe, "sample", sample)
    guarded: dict = {}
    blocks = bench.time_cases({"mlp": lambda: engine.run(feed)}, 12, 5, 1, guard_s=guard_s, guarded=guarded)
    return blocks["mlp"], guarded


def test_guard_retimes_blocks_the_probe_saw_slow(mlp_engine, monkeypatch):
    engine, feed = mlp_engine
    # samples: 0-9 calibration, 10 before the first block, 11 after it, ...: 13 and 14 slow
    # make the blocks before and after them (blocks 2, 3 and the retries) unclean
    blocks, guarded = _guarded_run(engine, feed, monkeypatch, {13, 14}, guard_s=30)
    case = guarded["cases"]["mlp"]
    assert len(blocks) == 12 and all(len(b) == 5 for b in blocks)
    assert case["retimed_blocks"] == 3 and case["unclean_blocks"] == 0 and case["probe_ms"] == [0.5] * 12
    assert guarded["level_ms"] == 0.5 and guarded["tolerance"] == 0.05 and guarded["spent_s"] > 0
    # a budget already spent: the slow blocks are kept, counted, and compare warns
    blocks, guarded = _guarded_run(engine, feed, monkeypatch, {13, 14}, guard_s=1e-9)
    case = guarded["cases"]["mlp"]
    assert len(blocks) == 12 and case["retimed_blocks"] == 1 and case["unclean_blocks"] == 2
    results = {"cases": [{"guard": case}], "guard": {"budget_s": 30}}
    assert bench.load_warnings(results, "new run") == [
        "2 block(s) of the new run were kept although the machine probe ran slow around them "
        "(the guard's 30 s for re-timing ran out)"
    ]


@pytest.mark.exclusive  # calibrates against this machine's quiet speed
def test_machine_probe_measures():
    probe = _machine_probe.MachineProbe()
    level = probe.calibrate()
    assert 0.01 < level < 100 and probe.clean(level) and not probe.clean(level * 1.2)
    with pytest.raises(ValueError, match="tolerance"):
        _machine_probe.MachineProbe(tolerance=0)


def _results(blocks: list[list[float]], statistic: str = "min") -> dict:
    case = bench.summarise({"name": "mlp host fp32 b4096"}, bench.block_samples(blocks, statistic), BATCH, blocks)
    return {"format": bench.FORMAT, "suite": "mlp", "fingerprint": {}, "cases": [case]}


PYTEST_BENCH = """
import pytest
@pytest.mark.parametrize("n", [5000, 10000])
def test_sum(benchmark, n):
    benchmark(sum, range(n))
"""


def test_compare_reads_pytest_benchmark_json(tmp_path, bench_cli):
    """A real pytest-benchmark run (raw samples in stats.data) of 5000 and of 10000 additions,
    split into two files under one benchmark name: a baseline and a slower new run."""
    (tmp_path / "test_work.py").write_text(PYTEST_BENCH)
    # without an xdist worker's marks in its environment, which turn pytest-benchmark off
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_work.py"),
         f"--benchmark-json={tmp_path / 'both.json'}", "--benchmark-max-time=0.05", "--benchmark-min-rounds=20"],
        cwd=tmp_path, check=True, capture_output=True, timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")},
    )  # fmt: skip
    both = json.loads((tmp_path / "both.json").read_text())
    for name, bench_json in zip(("base", "slow"), both["benchmarks"]):
        bench_json["name"], bench_json["fullname"] = "test_sum", "test_work.py::test_sum"
        (tmp_path / f"{name}.json").write_text(json.dumps({**both, "benchmarks": [bench_json]}))
    loaded = bench.load_results(tmp_path / "base.json")
    assert loaded["cases"][0]["name"] == "test_work.py::test_sum" and len(loaded["cases"][0]["samples_ms"]) >= 20
    (verdict,) = bench.compare(tmp_path / "base.json", tmp_path / "slow.json")
    assert verdict.verdict == "regression" and verdict.change > 0.5, verdict
    code, out, _ = bench_cli("bench", "compare", tmp_path / "base.json", tmp_path / "slow.json", "--json")
    assert code == 3 and json.loads(out)["regressions"] == 1
    # a run against itself: no change; "noisy" when its single ~50 µs calls spread more than
    # the threshold (seen on this VM's slow windows), never a regression or an improvement
    same = bench.compare(tmp_path / "base.json", tmp_path / "base.json")[0]
    assert same.change == 0 and same.verdict in ("unchanged", "noisy"), same


def test_compare_missing_cases_and_machine_warning(tmp_path, bench_cli):
    base = _results([[1.0], [1.01], [0.99], [1.0], [1.02], [0.98], [1.0]])
    new = json.loads(json.dumps(base))
    new["cases"][0]["name"] = "other"
    base["fingerprint"] = {"cpu": "CPU A", "cores": 2}
    new["fingerprint"] = {"cpu": "CPU B", "cores": 2}
    verdicts = bench.compare(base, new)
    assert sorted(v.verdict for v in verdicts) == ["missing", "missing"]
    assert bench.machine_differences(base, new) == ["CPU: CPU A → CPU B"]
    (tmp_path / "a.json").write_text(json.dumps(base))
    (tmp_path / "b.json").write_text(json.dumps(new))
    code, out, err = bench_cli("bench", "compare", tmp_path / "a.json", tmp_path / "b.json")
    assert code == 0 and "different machines" in err and "missing" in out
    (tmp_path / "c.json").write_text("{}")
    code, _, err = bench_cli("bench", "compare", tmp_path / "a.json", tmp_path / "c.json")
    assert code == 2 and "neither adapter bench results nor pytest-benchmark" in err
