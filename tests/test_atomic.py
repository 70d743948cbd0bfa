"""Atomic artifacts and the engine cache under faults (issue 8, point 4).

* ``adapter convert`` killed with SIGKILL at points spread over a measured run leaves the
  old artifact (valid) or none at the output path, never a half-written one, and a later
  convert does not trip on whatever the killed run left behind;
* two converts of one model at once, same output and same cache, give one valid artifact;
* each part of the cache key, changed alone, misses the cache;
* a corrupted cached file is caught by the manifest checksums and the entry rebuilt.

``tests/test_artifact.py`` holds the basic cache hit/miss and publish tests.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from adapter import ConvertOptions, convert
from adapter.core import artifact
from adapter.core.errors import ArtifactError

TESTS = Path(__file__).parent
FAST = ConvertOptions(benchmark=False)


def _seed_cache(fresh_cache: Path, cache: Path) -> None:
    """A new cache folder holding only the host probe (so a run never re-measures the machine)."""
    cache.mkdir(mode=0o700)
    for probe in fresh_cache.glob("host-*.json"):
        (cache / probe.name).write_bytes(probe.read_bytes())


def _state(out: Path) -> str:
    """'none', 'old' or 'new' for a whole artifact; anything else fails the test."""
    if not out.exists():
        return "none"
    try:
        manifest = artifact.validate(out)
    except ArtifactError as exc:
        raise AssertionError(f"half-written artifact at {out}: {exc}") from exc
    return manifest.get("options", {}).get("verify_samples") == 3 and "new" or "old"


def _stray(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def forkserver():
    """A multiprocessing context whose children fork from a process with torch and adapter imported."""
    import multiprocessing

    from _convert_child import PRELOAD

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _start(context, argv: list[str], cache: Path, log: Path | None = None):
    from _convert_child import run_cli

    args = ([str(a) for a in argv], str(cache), str(TESTS), log and str(log))
    process = context.Process(target=run_cli, args=args, daemon=True)
    process.start()
    return process


def test_sigkill_at_random_points_never_leaves_a_half_artifact(tmp_path, fresh_cache, forkserver):
    """At least 12 SIGKILLs spread over a convert (cache on), half of them over an older artifact."""
    rng = random.Random(8)
    argv = ["convert", "models:mlp", "--no-bench", "--verify-samples", "3", "-o"]
    old = tmp_path / "old"
    cache = tmp_path / "cache-old"
    _seed_cache(fresh_cache, cache)
    _start(forkserver, ["convert", "models:mlp", "--no-bench", "-o", old], cache).join(120)
    artifact.validate(old)
    # Measure a whole run (fresh cache) the way the trials run it; later runs that finish refine it.
    cache = tmp_path / "cache-measure"
    _seed_cache(fresh_cache, cache)
    started = time.perf_counter()
    measure = _start(forkserver, argv + [tmp_path / "measure"], cache)
    measure.join(120)
    assert measure.exitcode == 0
    duration = time.perf_counter() - started

    outcomes: dict[str, int] = {}
    kills, trial, strays, killed_at = 0, 0, 0, []
    while kills < 12 and trial < 24:
        with_old = trial % 2 == 1
        out = tmp_path / f"run{trial}" / "engine"
        out.parent.mkdir()
        if with_old:  # an older artifact (default options) already sits at the output path
            artifact.copy_artifact(old, out)
        cache = tmp_path / f"cache{trial}"
        _seed_cache(fresh_cache, cache)
        delay = duration * rng.uniform(0.02, 1.0)
        started = time.perf_counter()
        child = _start(forkserver, argv + [out], cache)
        child.join(delay)
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
            child.join()
            kills += 1
            killed_at.append(round(delay / duration, 2))
        else:
            assert child.exitcode == 0
            duration = 0.5 * duration + 0.5 * (time.perf_counter() - started)
        state = _state(out)
        assert state in (("old", "new") if with_old else ("none", "new")), (trial, state)
        entries = cache / "engines"
        for entry in entries.iterdir() if entries.exists() else []:
            if not entry.name.startswith("."):
                artifact.validate(entry)  # a visible cache entry is always whole
        label = f"{'old' if with_old else 'empty'}->{state}"
        outcomes[label] = outcomes.get(label, 0) + 1
        strays += len(_stray(out.parent)) + len(_stray(entries) if entries.exists() else [])
        if trial % 5 == 4:  # a later convert in the same folder and cache must not trip on what was left
            again = _start(forkserver, argv + [out], cache)
            again.join(120)
            assert again.exitcode == 0 and _state(out) == "new"
        trial += 1
    print(
        f"\n  convert ~{duration:.1f}s in a forked child; {trial} trials, {kills} SIGKILLs at fractions "
        f"{sorted(killed_at)}; outcomes {outcomes}; stray hidden folders left by kills: {strays}"
    )
    assert kills >= 12


def test_two_converts_at_once_give_one_valid_artifact(tmp_path, fresh_cache, forkserver):
    """Two ``adapter convert`` processes, same output and same cache, started together (twice).

    The children fork from the preloaded forkserver, so both reach the conversion (and its
    publish) within milliseconds of each other rather than after separate interpreter
    start-ups of a few seconds each: the two runs overlap more, not less, than two
    ``python -m adapter.cli.main`` processes would, at a fraction of the time.
    """
    out = tmp_path / "engine"
    logs = tmp_path / "logs"
    logs.mkdir()
    argv = ["convert", "models:mlp", "-o", out, "--no-bench", "--json"]
    results = []
    for round_ in range(2):
        procs = [_start(forkserver, argv, fresh_cache, logs / f"{round_}-{i}.err") for i in range(2)]
        for p in procs:
            p.join(120)
        results += [(p.exitcode, (logs / f"{round_}-{i}.err").read_text()) for i, p in enumerate(procs)]
    assert all(code == 0 for code, _ in results), results
    manifest = artifact.validate(out)
    entry = fresh_cache / "engines" / manifest["cache_key"]
    artifact.validate(entry)
    assert [p.name for p in (fresh_cache / "engines").iterdir()] == [manifest["cache_key"]]
    assert _stray(tmp_path) == [], "temp folders left after concurrent converts"


# --- the cache key -------------------------------------------------------------------------


@pytest.fixture
def factory(tmp_path):
    """A factory whose weights, code and example inputs come from editable files."""
    path = tmp_path / "factory.py"
    path.write_text(
        "import torch\n\nSEED = 0\nWIDTH = 8\n\n"
        "def make():\n"
        "    torch.manual_seed(SEED)\n"
        "    layer = torch.nn.Sequential(torch.nn.Linear(WIDTH, 4), torch.nn.ReLU()).eval()\n"
        "    return layer, {'input': torch.randn(2, WIDTH)}, {'input': {0: 'batch'}}\n"
    )
    return path


def _miss(source: str, out: Path, options: ConvertOptions, first_key: str) -> str:
    result = convert(source, out, options)
    assert not result.cache_hit, result.cache_note
    assert result.manifest["cache_key"] != first_key
    return result.manifest["cache_key"]


def test_each_cache_key_part_changed_alone_misses(tmp_path, fresh_cache, factory):
    import adapter.converter.api
    from adapter.converter.precision import PrecisionOptions
    from adapter.core.verify import Tolerance

    spec = f"{factory}:make"
    base = convert(spec, tmp_path / "base", FAST)
    assert not base.cache_hit
    hit = convert(spec, tmp_path / "again", FAST)
    assert hit.cache_hit and "cache entry" in hit.cache_note
    key = base.manifest["cache_key"]
    tested = []

    # model bytes: weights, then code (same weights, other structure)
    text = factory.read_text()
    factory.write_text(text.replace("SEED = 0", "SEED = 1"))
    _miss(spec, tmp_path / "weights", FAST, key)
    tested.append("weights")
    factory.write_text(text.replace("torch.nn.ReLU()", "torch.nn.GELU()"))
    _miss(spec, tmp_path / "code", FAST, key)
    tested.append("model code")
    factory.write_text(text)
    assert convert(spec, tmp_path / "back", FAST).cache_hit  # restoring the file finds the entry again

    # every option in ConvertOptions.key_fields()
    changes = {
        "dynamic": {"dynamic": ("input:0=batch[1..64]",)},
        "passes": {"passes": ("none",)},
        "tolerance": {"tolerance": Tolerance(atol=3e-4)},
        "verify_samples": {"verify_samples": 4},
        "backend_options": {"backend_options": (("optimization", "basic"),)},
        "backend": {"backend": "openvino"},
        "precision plan": {"precision": PrecisionOptions(mode="fp16")},
    }
    fields = set(ConvertOptions().key_fields())
    assert fields <= {"backend", "dynamic", "passes", "tolerance", "verify_samples", "backend_options", "precision"}
    for name, change in changes.items():
        options = ConvertOptions(benchmark=False, **change)
        try:
            _miss(spec, tmp_path / name.replace(" ", "-"), options, key)
        except Exception as exc:  # a backend or mode this host cannot build is skipped, and said
            if not isinstance(exc, AssertionError) and name in ("backend", "precision plan"):
                print(f"\n  {name}: not buildable here ({type(exc).__name__}: {exc})")
                continue
            raise
        tested.append(name)

    # target profile contents (same name, one figure changed), backend and library versions, adapter's code.
    # Each patch is undone on its own: undoing the test's monkeypatch would also drop the private cache.
    from adapter.profiles import load_profile

    profile_type = type(load_profile("host"))
    real_digest = profile_type.digest
    real_versions = artifact.library_versions
    patches = {
        "profile contents": (profile_type, "digest", lambda self: real_digest(self) + "-edited"),
        "backend version": (adapter.converter.api.get_backend("onnxruntime"), "version", lambda: "0.0-test"),
        "library versions": (artifact, "library_versions", lambda extra=(): {**real_versions(extra), "onnx": "0.0"}),
        "adapter code": (artifact, "code_digest", lambda: "0" * 64),
    }
    for name, (owner, attr, value) in patches.items():
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(owner, attr, value)
            _miss(spec, tmp_path / name.replace(" ", "-"), FAST, key)
        tested.append(name)

    assert convert(spec, tmp_path / "final", FAST).cache_hit  # nothing else drifted
    print(f"\n  cache-key parts tested (each a miss): {', '.join(tested)}")


def test_corrupted_cached_file_is_rebuilt(tmp_path, fresh_cache):
    first = convert("models:mlp", tmp_path / "a", FAST)
    entry = fresh_cache / "engines" / first.manifest["cache_key"]
    for name in sorted(first.manifest["files"]):
        target = entry / name
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01  # one flipped bit in the middle of the file
        target.write_bytes(bytes(data))
        again = convert("models:mlp", tmp_path / f"b-{name}", FAST)
        assert not again.cache_hit and "corrupted" in again.cache_note, (name, again.cache_note)
        assert artifact.validate(entry)["cache_key"] == first.manifest["cache_key"]
        artifact.validate(tmp_path / f"b-{name}")
    # a corrupted manifest is caught too
    (entry / artifact.MANIFEST).write_text("{not json")
    again = convert("models:mlp", tmp_path / "c", FAST)
    assert not again.cache_hit and "corrupted" in again.cache_note
    artifact.validate(entry)


def test_precision_plan_file_contents_are_in_the_key(tmp_path, fresh_cache):
    """The same --precision-plan path with edited contents (one node kept in FP32) misses."""
    import json

    from adapter.converter.precision import PrecisionOptions

    made = convert("models:mlp", tmp_path / "fp16", ConvertOptions(benchmark=False, precision=PrecisionOptions("fp16")))
    plan = tmp_path / "plan.json"
    plan.write_text((made.path / "plan.json").read_text())
    options = ConvertOptions(benchmark=False, precision=PrecisionOptions("fp16", plan=str(plan)))
    first = convert("models:mlp", tmp_path / "a", options)
    assert convert("models:mlp", tmp_path / "b", options).cache_hit
    data = json.loads(plan.read_text())
    data["overrides"] = {data["nodes"][-1]: {"reason": "kept in FP32 by the test", "module": ""}}
    plan.write_text(json.dumps(data))
    edited = convert("models:mlp", tmp_path / "c", options)
    assert not edited.cache_hit and edited.manifest["cache_key"] != first.manifest["cache_key"]


def _staged(dest: Path, tag: str) -> Path:
    staged = dest.parent / f".{dest.name}.tmp-{tag}"
    staged.mkdir()
    (staged / "model.onnx").write_text(tag)
    artifact.write_manifest(staged, {"tag": tag})
    return staged


@pytest.mark.parametrize("dest_exists", [False, True], ids=["new-dest", "replacing"])
def test_publish_when_another_writer_publishes_first(tmp_path, monkeypatch, dest_exists):
    """Between publish's look at ``dest`` and its rename, a concurrent convert publishes there."""
    import json

    dest = tmp_path / "engine"
    if dest_exists:
        artifact.publish(_staged(dest, "old"), dest)
    ours, theirs = _staged(dest, "ours"), _staged(dest, "theirs")
    real_rename = os.rename
    raced = []

    def racing_rename(src, dst):
        if Path(src) == ours and not raced:
            raced.append(1)
            if Path(dst).exists():
                real_rename(dst, tmp_path / ".gone")
            real_rename(theirs, dst)  # the other process wins the race
        return real_rename(src, dst)

    monkeypatch.setattr(artifact.os, "rename", racing_rename)
    artifact.publish(ours, dest)
    assert raced
    assert json.loads((dest / artifact.MANIFEST).read_text())["tag"] in ("ours", "theirs")
    artifact.validate(dest)
    assert not ours.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".engine")]
