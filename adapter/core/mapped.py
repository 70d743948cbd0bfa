"""Resident pages of a memory-mapped engine file, and handing them back to the kernel.

OpenVINO's CPU plugin and llama.cpp both map an engine's weight file, then copy the
weights they compute with into their own layouts while loading. The mapping stays, and
every page loading read stays resident with it: TinyLlama's INT4 OpenVINO engine keeps
843 MB of its 852 MB IR file resident beside the plugin's own 950 MB copy. Once loading
is done those pages are read again only for the few weights used as they are, so
:func:`release_mapped` drops them (``madvise(MADV_DONTNEED)``); a page that is read later
comes back from the file. Only read-only mappings are touched: a private mapping's
dropped page is re-read from the file, which is what it held.

:func:`trim_heap` is the same hand-back for memory the process freed: a converter that
builds several large engines one after another frees gigabytes of graph weights between
them, and glibc keeps freed blocks under its mmap threshold (up to 32 MiB: most of a
decoder's weights) in its heap instead of returning them.
"""

from __future__ import annotations

__all__ = [
    "Releaser", "mapped_resident_bytes", "memory_budget", "peak_rss_bytes", "release_mapped", "resident_bytes",
    "trim_heap",
]  # fmt: skip

import ctypes
import ctypes.util
import gc
import sys
import threading
from pathlib import Path

_MADV_DONTNEED = 4
_MAPS = Path("/proc/self/maps")
_SMAPS = Path("/proc/self/smaps")


def _regions(path: Path) -> list[tuple[int, int]]:
    """Read-only mappings of ``path`` in this process (empty where /proc is absent)."""
    target = str(Path(path).resolve())
    found = []
    try:
        lines = _MAPS.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == target and "w" not in parts[1]:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            found.append((start, end))
    return found


def release_mapped(path: Path) -> int:
    """Drop the resident pages of this process's read-only mappings of ``path``.

    Returns the number of mappings released (0 off Linux, or when nothing maps the file).
    """
    if not sys.platform.startswith("linux"):
        return 0
    madvise = _libc().madvise  # looked up before the regions are read: the window between stays short
    return sum(madvise(start, end - start, _MADV_DONTNEED) == 0 for start, end in _regions(path))


_LIBC: list[ctypes.CDLL] = []


def _libc() -> ctypes.CDLL:
    """The C library, loaded once (``find_library`` runs ``ldconfig`` each time it is asked)."""
    if not _LIBC:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
        _LIBC.append(libc)
    return _LIBC[0]


class Releaser:
    """Keep handing back a file's mapped pages while an engine loads from it.

    An engine that copies its weights into its own layout reads the whole mapped file
    once; released only afterwards, every page it read is resident at the peak beside the
    copy (TinyLlama INT4 on OpenVINO: 1.77 GB at the peak for 1.0 GB after). A thread
    that releases the mapping every ``interval`` seconds while loading runs keeps only
    the pages read since its last pass: a page dropped before the engine is done with it
    is read again from the page cache. :meth:`stop` releases once more and ends the
    thread; the thread also ends by itself after ``limit`` seconds, so an engine that
    never reaches its ``stop`` (an error, a session dropped early) does not keep one
    polling. The engine must run without holding the GIL (OpenVINO's infer and compile,
    llama.cpp's load through ctypes do), and must keep the file mapped while it runs:
    the mapping's address range is read, then released, and an engine that unmapped it
    and mapped something else there in between would lose that memory's contents.
    """

    def __init__(self, path: Path, interval: float = 0.02, limit: float = 120.0) -> None:
        self.path, self.interval, self.limit = Path(path), interval, limit
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="adapter-release-mapped", daemon=True)

    def _run(self) -> None:
        for _ in range(max(1, int(self.limit / self.interval))):
            if self._done.wait(self.interval):
                return
            release_mapped(self.path)

    def start(self) -> Releaser:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._done.set()
            self._thread.join()
        release_mapped(self.path)

    def __enter__(self) -> Releaser:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def trim_heap() -> bool:
    """Collect unreachable objects (an IR graph is a web of cycles, freed only by the cycle
    collector), then return the C heap's free pages to the kernel (glibc's ``malloc_trim``).

    Returns whether the heap was trimmed (False off glibc).
    """
    gc.collect()
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = _libc().malloc_trim
    except (OSError, AttributeError):  # another C library (musl) has no malloc_trim
        return False
    trim(0)
    return True


def resident_bytes() -> int | None:
    """This process's resident memory now (``VmRSS``); None where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def mapped_resident_bytes(path: Path) -> int:
    """Resident bytes of this process's mappings of ``path`` (from /proc/self/smaps)."""
    target = str(Path(path).resolve())
    total, inside = 0, False
    try:
        lines = _SMAPS.read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = len(head) == 6 and head[5] == target
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def peak_rss_bytes() -> int:
    """This process's own peak resident memory (``VmHWM``; 0 where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory_budget() -> int:
    """Bytes this process may use: the smaller of its address-space limit (``RLIMIT_AS``)
    and the memory the machine has available now."""
    import resource

    limits = []
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    return min(limits) if limits else 1 << 40
