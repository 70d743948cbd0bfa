"""What a source depends on, as files: recorded while a factory runs, checked by stat.

A factory is arbitrary code, so the cache cannot hash "the model" without running it —
and running it means importing torch and loading weights, seconds of work. Instead the
first conversion records every file the factory opened (Python's ``open`` audit event)
plus the other files in the same folders as the data files it read (weights opened by
native code, such as safetensors' mmap, raise no audit event). A later conversion
re-runs the factory only if one of those files changed size or modification time.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

_state = threading.local()
_installed = False
_CODE_SUFFIXES = (".py", ".pyc", ".so", ".pth")
_VIRTUAL = ("/proc/", "/sys/", "/dev/", "/run/")
"""Kernel-made files whose times change on every read; never model inputs."""


def _hook(event: str, args: tuple) -> None:
    reads = getattr(_state, "reads", None)
    if reads is None or event != "open":
        return
    path = args[0]
    if isinstance(path, (str, bytes, os.PathLike)):
        reads.add(os.fsdecode(path))


@contextlib.contextmanager
def recording() -> Iterator[set[str]]:
    """Collect the paths of files opened by this thread inside the block."""
    global _installed
    if not _installed:
        sys.addaudithook(_hook)  # process-wide and permanent; inert outside recording()
        _installed = True
    reads: set[str] = set()
    _state.reads = reads
    try:
        yield reads
    finally:
        _state.reads = None


def _stat(path: Path) -> list | None:
    try:
        st = path.stat()
    except OSError:
        return None
    if not path.is_file():
        return None
    return [str(path), st.st_size, st.st_mtime_ns]


def fingerprint(paths: set[str] | list[str]) -> list[list]:
    """(path, size, mtime) of every regular file read, plus data files' folder siblings."""
    files: set[Path] = set()
    for raw in paths:
        path = Path(raw).absolute()
        if str(path).startswith(_VIRTUAL) or not path.is_file():
            continue
        files.add(path)
        if not path.name.endswith(_CODE_SUFFIXES) and "__pycache__" not in path.parts:
            files.update(p for p in path.parent.iterdir() if p.is_file())
    return sorted(filter(None, (_stat(p) for p in files)))


def unchanged(recorded: list[list]) -> bool:
    """Whether every recorded file still has the same size and modification time."""
    return all(_stat(Path(entry[0])) == entry for entry in recorded)
