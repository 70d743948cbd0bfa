"""Engine artifacts: a folder with the model files and ``manifest.json``.

Artifacts are built in a private temporary folder beside the destination and moved
into place with ``rename``; a reader sees the old artifact or the new one, never a
half-written one. The manifest lists every file with its sha256, so a corrupted or
edited artifact is detected. A content-hash cache under the user's cache folder
(mode 0700) keeps one artifact per cache key.
"""

from __future__ import annotations

__all__ = [
    "MANIFEST",
    "FORMAT_VERSION",
    "cache_root",
    "default_cache_dir",
    "cache_key",
    "file_digests",
    "read_manifest",
    "validate",
    "staging_dir",
    "publish",
    "copy_artifact",
    "library_versions",
    "code_digest",
    "lookup_index",
    "write_index",
]

import contextlib
import errno
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from adapter.core import reads as _reads
from adapter.core.errors import ArtifactError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_LIBRARIES = ("adapter", "torch", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "transformers", "numpy")


def library_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of the libraries an engine depends on."""
    versions = {}
    for name in _LIBRARIES + extra:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def default_cache_dir() -> Path:
    """Return ``$ADAPTER_CACHE_DIR``, or ``$XDG_CACHE_HOME/adapter``, or ``~/.cache/adapter``."""
    if os.environ.get("ADAPTER_CACHE_DIR"):
        return Path(os.environ["ADAPTER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "adapter"


def cache_root() -> Path:
    """The per-user cache folder (``$ADAPTER_CACHE_DIR``, else XDG), created private (0700)."""
    root = default_cache_dir()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):
        os.chmod(root, 0o700)
    return root


@functools.cache
def code_digest() -> str:
    """sha256 of adapter's own source files, so a changed adapter never reuses old engines."""
    digest = hashlib.sha256()
    roots = set()
    for name in ("adapter", *(f"adapter.{n}" for n in ("passes", "backends", "profiles", "op_library", "kernels"))):
        spec = importlib.util.find_spec(name)  # the installed folders, without importing them
        roots.update(Path(folder) for folder in spec.submodule_search_locations)
    for root in sorted(roots):
        for path in sorted(root.rglob("*")):
            if path.suffix in (".py", ".toml") and "__pycache__" not in path.parts:
                digest.update(path.name.encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that changes the engine."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file in ``folder`` except the manifest, by relative path."""
    return {
        str(p.relative_to(folder)): _sha256(p) for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST
    }


def read_manifest(folder: Path) -> dict[str, Any]:
    """Read and sanity-check an artifact's manifest.

    Raises:
        ArtifactError: No manifest, unreadable JSON, or an unknown format version.
    """
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise ArtifactError(f"'{folder}' is not an engine artifact folder.", "Create one with `adapter convert`.")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ArtifactError(
            f"'{folder}' has no {MANIFEST}, so it is not an engine artifact.", "Create one with `adapter convert`."
        ) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(
            f"'{path}' is not valid JSON ({exc}).", "Re-create the artifact with `adapter convert`."
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"'{path}' has an unknown format version.", f"This adapter reads format {FORMAT_VERSION}; re-create it."
        )
    return manifest


def validate(folder: Path) -> dict[str, Any]:
    """Check every file against the manifest's checksums; return the manifest.

    Raises:
        ArtifactError: A file is missing, extra or changed.
    """
    manifest = read_manifest(folder)
    expected = manifest.get("files", {})
    actual = file_digests(Path(folder))
    problems = [f"missing {n}" for n in expected if n not in actual]
    problems += [f"changed {n}" for n in expected if n in actual and actual[n] != expected[n]]
    problems += [f"unexpected {n}" for n in actual if n not in expected]
    if problems:
        raise ArtifactError(
            f"Artifact '{folder}' does not match its manifest: {', '.join(problems)}.",
            "It was modified or damaged; re-create it with `adapter convert`.",
        )
    return manifest


@contextlib.contextmanager
def staging_dir(dest: Path) -> Iterator[Path]:
    """A private temporary folder beside ``dest`` (same filesystem, so rename is atomic).

    Removed on exit unless it was published.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Add file checksums and write ``manifest.json`` (inside a staging folder)."""
    manifest = dict(manifest)
    manifest["format_version"] = FORMAT_VERSION
    manifest["files"] = file_digests(folder)
    text = json.dumps(manifest, indent=2, sort_keys=False, default=str)
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, folder / MANIFEST)


def publish(staged: Path, dest: Path) -> None:
    """Move a complete staged artifact to ``dest``, replacing what was there.

    An existing destination is first renamed aside, then the staged folder is renamed
    into place: at every instant ``dest`` is absent, the old artifact, or the new one.
    When a concurrent writer publishes to ``dest`` between those two renames, the swap
    is tried again, so the last writer wins and neither fails.

    Raises:
        ArtifactError: ``dest`` exists and is not an artifact (nothing is overwritten).
    """
    dest = Path(dest)
    for attempt in range(_PUBLISH_ATTEMPTS):
        old = None
        if dest.exists() or dest.is_symlink():
            if dest.is_symlink() or not dest.is_dir() or (any(dest.iterdir()) and not (dest / MANIFEST).is_file()):
                raise ArtifactError(
                    f"'{dest}' exists and is not an engine artifact; refusing to replace it.",
                    "Choose another output folder with -o.",
                )
            old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(dest, old)
            except FileNotFoundError:  # another writer moved it aside first
                continue
        try:
            os.rename(staged, dest)
        except OSError as exc:
            if old is not None and not dest.exists():
                os.rename(old, dest)
                old = None
            raced = exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and attempt + 1 < _PUBLISH_ATTEMPTS
            if not raced:
                raise
            continue  # another writer published between the renames: swap again
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return
    raise ArtifactError(f"Could not publish to '{dest}': other processes kept replacing it.", "Run the convert again.")


_PUBLISH_ATTEMPTS = 10


def copy_artifact(source: Path, dest: Path) -> None:
    """Copy an artifact folder to ``dest`` atomically (staged copy, then publish)."""
    with staging_dir(dest) as tmp:
        for item in Path(source).iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
            elif item.is_dir():
                shutil.copytree(item, tmp / item.name)
        publish(tmp, dest)


def lookup_index(index_key: str) -> str | None:
    """The cache key recorded for a source + options, if the source's files are unchanged.

    The index lets a repeated conversion skip loading the source (for a factory, running
    it) when none of the files it depends on changed; see :mod:`adapter.core.reads`.
    """
    path = cache_root() / "index" / f"{index_key}.json"
    try:
        entry = json.loads(path.read_text())
        reads, key = entry["reads"], entry["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not reads or not isinstance(key, str) or not _reads.unchanged(reads):
        return None
    return key


def write_index(index_key: str, reads: list[list], key: str) -> None:
    """Record which cache key a source + options produced, with its file fingerprint."""
    if not reads:
        return
    folder = cache_root() / "index"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = folder / f".{index_key}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps({"reads": reads, "key": key}))
    os.replace(tmp, folder / f"{index_key}.json")
