"""The machine a bench run came from: its fingerprint, how busy it was, how two differ."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from adapter.core.artifact import library_versions
from adapter.profiles.probe import _cpu_info

_KEY_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8", "sve", "i8mm")


def _git_commit() -> dict[str, Any] | None:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = os.environ.get("GITHUB_SHA")
        return {"id": sha, "dirty": None} if sha else None
    return {"id": commit, "dirty": bool(dirty)}


def fingerprint() -> dict[str, Any]:
    """What the timings depend on: CPU model, flags (hash and key ones), cores, memory, OS,
    Python, library versions and the git commit. ``machine_id`` hashes the hardware part."""
    info = _cpu_info()
    flags = sorted(info["flags"])
    hardware = {
        "cpu": info["model"],
        "machine": info["machine"],
        "cores": info["cpus"],
        "memory_bytes": info["memory"],
        "flags_sha256": hashlib.sha256(" ".join(flags).encode()).hexdigest()[:16],
    }
    return {
        **hardware,
        "machine_id": hashlib.sha256(json.dumps(hardware, sort_keys=True).encode()).hexdigest()[:16],
        "key_flags": [f for f in _KEY_FLAGS if f in flags],
        "os": platform.platform(),
        "python": platform.python_version(),
        "libraries": library_versions(("openvino",)),
        "git": _git_commit(),
        "hostname": platform.node(),
    }


def _load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def load_warnings(run: dict[str, Any], label: str) -> list[str]:
    """Warnings when the run's machine was busy: a load average above its core count means
    other processes competed for the CPU while it was timed; blocks the machine guard had to
    keep in a slow window (its budget spent) may be inflated."""
    warnings = []
    load = run.get("load_average") or {}
    cores = (run.get("fingerprint") or {}).get("cores") or 0
    busiest = max((v for v in (load.get("before"), load.get("after")) if v is not None), default=None)
    if busiest is not None and cores and busiest > cores:
        warnings.append(
            f"the {label} ran at load average {busiest:g} on {cores} cores: other processes competed for the CPU"
        )
    unclean = sum(int((case.get("guard") or {}).get("unclean_blocks", 0)) for case in run.get("cases", []))
    if unclean:
        budget = (run.get("guard") or {}).get("budget_s", 0)
        warnings.append(
            f"{unclean} block(s) of the {label} were kept although the machine probe ran slow around them "
            f"(the guard's {budget:g} s for re-timing ran out)"
        )
    return warnings


def machine_differences(baseline: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between the two runs' machines and software (empty: same machine)."""
    a, b = baseline.get("fingerprint") or {}, new.get("fingerprint") or {}
    notes = []
    for key, label in (
        ("cpu", "CPU"),
        ("cores", "cores"),
        ("memory_bytes", "memory"),
        ("flags_sha256", "CPU flags"),
        ("machine", "architecture"),
        ("os", "OS"),
        ("python", "Python"),
    ):
        if a.get(key) is not None and b.get(key) is not None and a.get(key) != b.get(key):
            notes.append(f"{label}: {a[key]} → {b[key]}")
    libs_a, libs_b = a.get("libraries") or {}, b.get("libraries") or {}
    for name in sorted(set(libs_a) & set(libs_b)):
        if libs_a[name] != libs_b[name] and name != "adapter":
            notes.append(f"{name}: {libs_a[name]} → {libs_b[name]}")
    return notes
