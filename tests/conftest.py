"""Shared fixtures: a private cache per test session, offline Hugging Face, CLI runner."""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# adapter.kernels' Triton kernels run on the CPU interpreter here (set before triton is first
# imported: it decides at decoration time); a run with a GPU sets TRITON_INTERPRET=0 itself
os.environ.setdefault("TRITON_INTERPRET", "1")
TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Every test session gets its own engine cache (and host-probe cache)."""
    os.environ["ADAPTER_CACHE_DIR"] = str(tmp_path_factory.mktemp("adapter-cache"))
    yield


@pytest.fixture(autouse=True)
def _machine_share(request, tmp_path_factory):
    """Under pytest-xdist's workers, a test marked ``exclusive`` (its assertions compare
    wall times) runs alone: it waits for the other workers' tests in progress to end, and
    none starts until it is done; every other test shares the machine. A readers-writer
    lock over two files: a writer holds the gate while it waits, so readers cannot starve it."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    root = tmp_path_factory.getbasetemp().parent  # one folder for all of this run's workers
    exclusive = request.node.get_closest_marker("exclusive") is not None
    with open(root / "machine.gate", "a") as gate, open(root / "machine.lock", "a") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if not exclusive:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(gate, fcntl.LOCK_UN)  # a reader's is already released: a no-op


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    from adapter.cli.main import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def fresh_cache(tmp_path_factory, monkeypatch):
    """An empty engine cache for one test (the host probe is carried over, not re-measured)."""
    import shutil

    from adapter.profiles import load_profile

    load_profile("host")  # make sure the session cache holds the probe
    session_cache = Path(os.environ["ADAPTER_CACHE_DIR"])
    cache = tmp_path_factory.mktemp("cache")
    cache.chmod(0o700)
    for probe in session_cache.glob("host-*.json"):
        shutil.copy2(probe, cache / probe.name)
    monkeypatch.setenv("ADAPTER_CACHE_DIR", str(cache))
    return cache
