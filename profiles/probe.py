"""Measure this machine and describe it as the ``host`` profile.

The probe times square matmuls with torch (FP32, BF16, INT8; all allowed threads) and an
array copy with numpy over buffers past the last-level cache, and reads the CPU model, ISA flags, allowed CPUs and
memory size from the operating system. The result is cached as JSON, keyed by CPU
model, flags, CPU count and torch version, so later calls return at once.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

from adapter.core.artifact import default_cache_dir
from adapter.core.errors import ProfileError
from adapter.profiles.schema import HOST, Profile

__all__ = ["default_cache_dir", "probe_host"]

_CACHE_VERSION = 6  # 2: default_backend auto, openvino listed, bf16 peak only where native; 3: llamacpp listed; 4: int8 peak; 5: fp16 peak where native; 6: copy buffers past the last-level cache
_MATMUL_N = 2048
_COPY_BYTES = 256 * 2**20
"""The bandwidth probe's buffer at least (each of source and destination); more where the
last-level cache is large (:func:`_copy_bytes`)."""
_REPEATS = 5
_BUDGET_S = 1.5
_FEATURES = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
    "asimd",
    "asimdhp",
    "asimddp",
    "bf16",
    "i8mm",
    "sve",
    "sve2",
)
_CPUID_NAMES = {
    "avx": "AVX",
    "avx2": "AVX2",
    "fma": "FMA3",
    "f16c": "F16C",
    "avx512f": "AVX512F",
    "avx512cd": "AVX512CD",
    "avx512bw": "AVX512BW",
    "avx512dq": "AVX512DQ",
    "avx512vl": "AVX512VL",
    "avx512ifma": "AVX512IFMA",
    "avx512vbmi": "AVX512VBMI",
    "avx512_vnni": "AVX512VNNI",
    "avx512_bf16": "AVX512BF16",
    "avx512_fp16": "AVX512FP16",
}
"""x86 flags as /proc/cpuinfo names them -> numpy's name for the same CPUID answer."""
_ARM_PARTS = {
    "0xd08": "cortex-a72",
    "0xd0b": "cortex-a76",
    "0xd0c": "neoverse-n1",
    "0xd40": "neoverse-v1",
    "0xd49": "neoverse-n2",
    "0xd4f": "neoverse-v2",
}


def probe_host(force: bool = False, cache_dir: Path | None = None) -> Profile:
    """Return the ``host`` profile, measured now or read from the cache.

    Args:
        force: Measure again even if a cached result exists.
        cache_dir: Where the JSON cache lives; defaults to :func:`default_cache_dir`.

    Returns:
        A CPU profile named ``"host"`` with measured peaks and bandwidth.
    """
    info = _cpu_info()
    path = Path(cache_dir or default_cache_dir()) / f"host-{_cache_key(info)}.json"
    if not force:
        cached = _read_cache(path)
        if cached is not None:
            return cached
    native = _precisions(set(info["flags"]))
    figures = _measure(info["cpus"], bf16="bf16" in native, fp16="fp16" in native)
    profile = _build_profile(info, figures)
    if figures["constrained"]:  # measured under an address-space limit: not cached for unlimited processes
        return profile
    try:
        _write_cache(path, profile)
    except OSError as exc:
        warnings.warn(f"Could not cache the host profile in {path.parent}: {exc}", stacklevel=2)
    return profile


def _measure(threads: int, bf16: bool = True, fp16: bool = False) -> dict[str, Any]:
    """Time FP32 (and, where the CPU computes them natively, BF16 and FP16) and INT8 matmuls
    and memory copies; return peaks (FLOP/s) and bandwidth (B/s). Emulated BF16 is not a
    peak; FP16 is timed where the CPU has FP16 arithmetic (AVX512_FP16), which torch may not
    use (what it reaches is what the precision search expects of it)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    dtypes = (("fp32", torch.float32),) + ((("bf16", torch.bfloat16),) if bf16 else ()) + ((("fp16", torch.float16),) if fp16 else ())
    try:
        peaks = {name: _matmul_flops(torch, dtype) for name, dtype in dtypes}
        int8 = _int8_ops(torch)
        if int8:
            peaks["int8"] = int8
    finally:
        torch.set_num_threads(previous)
    size, wanted = _copy_bytes(_memory_bytes())
    return {"peak_flops": peaks, "memory_bandwidth": _copy_bandwidth(threads, size), "copy_bytes": size,
            "constrained": size < wanted}  # fmt: skip


def _best_time(run: Callable[[], object]) -> float:
    """Warm up, then return the best of up to ``_REPEATS`` timed runs within ``_BUDGET_S``."""
    best, spent = float("inf"), 0.0
    for attempt in range(_REPEATS + 1):
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        spent += elapsed
        if attempt:
            best = min(best, elapsed)
        if spent > _BUDGET_S:
            return min(best, elapsed)
    return best


def _matmul_flops(torch: Any, dtype: Any) -> float:
    n = _MATMUL_N
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    return 2 * n**3 / _best_time(lambda: torch.matmul(a, b, out=out))


def _int8_ops(torch: Any) -> float | None:
    """INT8 x INT8 -> INT32 matmul rate (OP/s) with ``torch._int_mm`` (oneDNN: AMX-INT8 or
    VNNI where the CPU has them), or None where this torch has no CPU kernel for it."""
    n = _MATMUL_N
    a = torch.randint(-128, 127, (n, n), dtype=torch.int8)
    b = torch.randint(-128, 127, (n, n), dtype=torch.int8)
    try:
        return 2 * n**3 / _best_time(lambda: torch._int_mm(a, b))
    except (RuntimeError, AttributeError):
        return None


def _last_level_cache() -> int:
    """Bytes of the largest CPU cache sysfs lists for CPU 0 (0 where it lists none)."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper() if entry.is_file() else ""
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=0)


def _copy_bytes(memory: int) -> tuple[int, int]:
    """(bytes to copy, bytes wanted) for each copy buffer. Wanted: 4x the last-level cache, so
    that the copy streams from memory (a 256 MiB copy under a 300 MiB L3 measured 71 GB/s on a
    2-core guest that copies 43-45 GB/s from memory), at least 256 MiB and at most 1/16 of the
    memory. Copied: no more than a quarter of the address space this process has left under
    its limit (``RLIMIT_AS``; a 4x copy of a 480 MiB L3 took 2.9 GiB and stopped ``adapter shard``
    under a 3 GiB limit), so a limited process measures smaller buffers rather than failing."""
    cap = memory // 16 if memory else 1 << 34
    wanted = int(max(_COPY_BYTES, min(4 * _last_level_cache(), cap)))
    room = _address_space_left()
    return (wanted if room is None else max(2**20, min(wanted, room // 4))), wanted


def _address_space_left() -> int | None:
    """Bytes of address space left under this process's ``RLIMIT_AS`` (None: unlimited)."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit == resource.RLIM_INFINITY:
            return None
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return max(0, limit - int(line.split()[1]) * 1024)
    except (ImportError, OSError, ValueError, IndexError):
        pass
    return None


def _copy_bandwidth(threads: int, size: int) -> float:
    """Best copy bandwidth (bytes read + written per second), one thread or all of them, over
    two buffers of ``size`` bytes."""
    import numpy as np

    src = np.ones(size, dtype=np.uint8)
    dst = np.zeros_like(src)
    best = _best_time(lambda: np.copyto(dst, src))
    if threads > 1:
        parts = [slice(i * src.size // threads, (i + 1) * src.size // threads) for i in range(threads)]
        with ThreadPoolExecutor(threads) as pool:
            best = min(best, _best_time(lambda: list(pool.map(lambda s: np.copyto(dst[s], src[s]), parts))))
    return 2 * src.nbytes / best


def _cpu_info() -> dict[str, Any]:
    """Read CPU model, vendor, flags, allowed CPU count and memory size."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip() and fields:
                break
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    machine = platform.machine()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    if machine in ("x86_64", "AMD64"):
        flags = _executable(flags)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "model": fields.get("model name") or platform.processor() or machine,
        "vendor_id": fields.get("vendor_id", ""),
        "cpu_part": fields.get("CPU part", ""),
        "machine": machine,
        "flags": sorted(flags),
        "cpus": cpus or 1,
        "memory": _memory_bytes(),
    }


def _executable(flags: set[str], cpuid: dict[str, bool] | None = None) -> set[str]:
    """The x86 flags of ``flags`` (/proc/cpuinfo's) that the CPUID instruction confirms to
    this process. They differ under an emulator or binary translator (qemu-user, an x86
    container on another machine's kernel): /proc/cpuinfo then describes the host, while
    torch, oneDNN and MLAS pick their kernels by CPUID. ``cpuid`` is numpy's runtime
    dispatch table (CPUID and the OS's saved register state) unless given. The table does
    not name AMX, AVX-VNNI and some AVX-512 extensions: they are kept while CPUID confirms
    every flag it can check, and dropped once it denies one (the process then runs on a CPU
    model other than the one the kernel lists)."""
    if cpuid is None:
        try:
            from numpy._core._multiarray_umath import __cpu_features__ as cpuid
        except ImportError:  # another numpy layout: keep what the kernel lists
            return flags
    kept = {flag for flag in flags if flag not in _CPUID_NAMES or cpuid.get(_CPUID_NAMES[flag], False)}
    if kept != flags:
        kept = {flag for flag in kept if flag in _CPUID_NAMES or not flag.startswith(("avx", "amx"))}
    return kept


def _memory_bytes() -> int:
    """MemTotal from /proc/meminfo, lowered to the cgroup memory limit if one is set."""
    total = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = int(Path(limit_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if 0 < limit < total:
            total = limit
    return total


def _llvm_cpu(info: dict[str, Any]) -> str | None:
    """Best-effort LLVM ``-mcpu`` name for this CPU, or None when unsure."""
    flags = set(info["flags"])
    if info["machine"] in ("aarch64", "arm64"):
        return _ARM_PARTS.get(info["cpu_part"].lower())
    if "amx_fp16" in flags:
        return "graniterapids"
    if "amx_bf16" in flags:
        return "sapphirerapids"
    if info["vendor_id"] == "AuthenticAMD" and "avx512_bf16" in flags:
        return "znver5" if "avx_vnni" in flags else "znver4"
    if "avx512f" in flags:
        return "x86-64-v4"
    if "avx2" in flags:
        return "x86-64-v3"
    return None


def _precisions(flags: set[str]) -> list[str]:
    found = ["fp32"]
    if flags & {"avx512_fp16", "amx_fp16", "asimdhp"}:
        found.append("fp16")
    if flags & {"avx512_bf16", "amx_bf16", "bf16"}:
        found.append("bf16")
    return [*found, "int8"]


def _build_profile(info: dict[str, Any], figures: dict[str, Any]) -> Profile:
    flags, cpus = set(info["flags"]), info["cpus"]
    mcpu = _llvm_cpu(info)
    target: dict[str, Any] = {"kind": "llvm", "num-cores": cpus}
    if mcpu:
        target["mcpu"] = mcpu
    if info["machine"] in ("aarch64", "arm64"):
        target["mtriple"] = "aarch64-linux-gnu"
    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(info["vendor_id"], "")
    today = datetime.date.today().isoformat()
    data = {
        "name": HOST,
        "description": f"This machine, measured: {info['model']}, {cpus} CPUs allowed",
        "kind": "cpu",
        "vendor": vendor or ("arm" if info["machine"] in ("aarch64", "arm64") else "unknown"),
        "arch": mcpu or info["machine"] or "unknown",
        "cores": cpus,
        "features": sorted(flags & set(_FEATURES)),
        "precisions": _precisions(flags),
        "peak_flops": figures["peak_flops"],
        "memory_bandwidth": figures["memory_bandwidth"],
        "memory_size": info["memory"],
        "interconnect": {
            "name": "shared memory (processes on this host)",
            "bandwidth": figures["memory_bandwidth"],
        },
        "default_backend": "auto",
        "backends": {
            "onnxruntime": {"providers": ["CPUExecutionProvider"]},
            "openvino": {"device": "CPU"},
            "llamacpp": {},
            "tvm": {"target": target},
        },
        "sources": [
            f"measured by adapter.profiles.probe on {today}: torch {_torch_version()} matmul "
            f"{_MATMUL_N}x{_MATMUL_N}, best of up to {_REPEATS}, {cpus} threads (fp32; bf16 and fp16 where native; "
            "int8 with torch._int_mm)",
            f"measured: numpy copy of {figures['copy_bytes'] // 2**20} MiB "
            + ("(less than 4x the last-level cache: the process's address space is limited)" if figures["constrained"]
               else "(at least 4x the last-level cache)")
            + f", best of up to {_REPEATS}, bytes read + written per second",
            "read: /proc/cpuinfo (model name, flags: the x86 ones as CPUID confirms them), os.sched_getaffinity, /proc/meminfo, cgroup memory limit",
        ],
    }
    return Profile.from_dict(data, origin="host probe")


def _torch_version() -> str:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "unknown"


def _cache_key(info: dict[str, Any]) -> str:
    parts = {
        "version": _CACHE_VERSION,
        "model": info["model"],
        "flags": info["flags"],
        "cpus": info["cpus"],
        "torch": _torch_version(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _read_cache(path: Path) -> Profile | None:
    try:
        data = json.loads(path.read_text())
        return Profile.from_dict(data, origin=str(path))
    except (OSError, ValueError, ProfileError):
        return None


def _write_cache(path: Path, profile: Profile) -> None:
    """Write the profile as JSON atomically: a temporary file, then os.replace."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".host-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(profile.to_dict(), handle, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
