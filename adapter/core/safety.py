"""Checks made before any user file is opened by a third-party loader.

See ``shared/SECURITY.md``: ONNX external data must stay inside the model's folder,
``.pt2`` archives may unpickle (so they are inspected first), and every ``torch.load``
of a user's file runs with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``.
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from adapter.core.errors import SourceError, UnsafeSourceError
from adapter.core.onnx_checks import check_graph

# Caps for archives: generous for real models, small enough to stop zip bombs.
MAX_ARCHIVE_MEMBERS = 100_000
MAX_ARCHIVE_BYTES = 64 * 2**30
MAX_COMPRESSION_RATIO = 200


def check_protobuf_backend() -> None:
    """Refuse to parse untrusted protobufs with the pure-Python backend (recursion DoS)."""
    from google.protobuf.internal import api_implementation

    kind = api_implementation.Type()
    if kind == "python":
        raise SourceError(
            "protobuf is using its pure-Python backend, which has known denial-of-service bugs on hostile files.",
            "Unset PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION or reinstall protobuf so the upb backend is used.",
        )


def _iter_tensors(graph) -> Iterator:  # onnx.GraphProto
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _iter_tensors(attr.g)
            for sub in attr.graphs:
                yield from _iter_tensors(sub)


def check_external_data_location(location: str, base_dir: Path, model_path: Path) -> Path:
    """Return the real path of an external-data file, or raise if it leaves ``base_dir``.

    Refuses absolute paths, ``..`` segments, symlinks, files with several hard links and
    missing files.
    """
    where = f"ONNX file '{model_path}' stores a tensor in '{location}'"
    if "\x00" in location or not location.strip():
        raise UnsafeSourceError(
            f"ONNX file '{model_path}' stores a tensor in {location!r}, which is empty or contains a NUL byte.",
            "External data must name a file in the model's folder.",
        )
    pure = PurePosixPath(location.replace("\\", "/"))
    if pure.is_absolute() or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise UnsafeSourceError(f"{where}, an absolute path.", "External data must sit inside the model's folder.")
    if ".." in pure.parts:
        raise UnsafeSourceError(
            f"{where}, which climbs out with '..'.", "External data must sit inside the model's folder."
        )
    candidate = base_dir / Path(*pure.parts)
    real_base = base_dir.resolve()
    walked = base_dir
    links = []
    for part in pure.parts:
        walked = walked / part
        links.append(walked.is_symlink())
    if any(links):
        raise UnsafeSourceError(f"{where}, which is a symbolic link.", "Copy the data file into the model's folder.")
    real = candidate.resolve()
    if real_base not in real.parents:
        raise UnsafeSourceError(
            f"{where}, which resolves outside the model's folder.", "External data must sit inside the model's folder."
        )
    if not real.is_file():
        raise SourceError(f"{where}, but that file does not exist.", "Keep the data file beside the .onnx file.")
    if real.stat().st_nlink > 1:
        raise UnsafeSourceError(f"{where}, which has several hard links.", "Copy the data file instead of linking it.")
    return real


def check_onnx_file(path: Path):
    """Parse an ONNX file's graph without its external data and vet that data's locations.

    Returns:
        The ``onnx.ModelProto`` without external data loaded.
    """
    import onnx
    from google.protobuf.message import DecodeError

    check_protobuf_backend()
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError, UnicodeDecodeError) as exc:
        raise SourceError(
            f"'{path}' is not a readable ONNX model ({type(exc).__name__}: {exc}).",
            "Check that the file is complete and really an .onnx file.",
        ) from exc
    if not proto.graph.node and not proto.graph.output:
        raise SourceError(
            f"'{path}' parses as protobuf but holds no ONNX graph.", "Check that it is an .onnx model file."
        )
    check_graph(proto, path)
    base = path.parent
    for tensor in _iter_tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            check_external_data_location(entries.get("location", ""), base, path)
    return proto


def check_archive(path: Path) -> zipfile.ZipFile:
    """Open a zip archive after validating member names, counts and sizes (zip-slip, bombs)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SourceError(
            f"'{path}' is not a readable .pt2 archive ({exc}).", "Re-save it with torch.export.save()."
        ) from exc
    members = archive.infolist()
    if len(members) > MAX_ARCHIVE_MEMBERS:
        raise UnsafeSourceError(f"'{path}' has {len(members)} members, more than the {MAX_ARCHIVE_MEMBERS} allowed.")
    total = 0
    for info in members:
        name = PurePosixPath(info.filename)
        if name.is_absolute() or ".." in name.parts or "\\" in info.filename:
            raise UnsafeSourceError(
                f"'{path}' has a member named '{info.filename}' that points outside the archive.",
                "Refusing to load it.",
            )
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise UnsafeSourceError(f"'{path}' has a symbolic-link member '{info.filename}'.", "Refusing to load it.")
        total += info.file_size
        if info.compress_size and info.file_size / info.compress_size > MAX_COMPRESSION_RATIO:
            raise UnsafeSourceError(
                f"'{path}' member '{info.filename}' expands {info.file_size // info.compress_size}x: a zip bomb?"
            )
    if total > MAX_ARCHIVE_BYTES:
        raise UnsafeSourceError(f"'{path}' would expand to {total} bytes, more than allowed.")
    return archive


def check_pt2(path: Path, trust_source: bool) -> None:
    """Refuse a ``.pt2`` whose loading would unpickle arbitrary objects.

    ``torch.export.load`` unpickles weights or constants marked ``use_pickle``, custom
    script objects and opaque objects, and legacy weight files. Unless the user trusts
    the source, any of those is refused before torch sees the file.
    """
    with check_archive(path) as archive:
        names = archive.namelist()
        if not any(n.endswith("archive_format") for n in names):
            raise SourceError(
                f"'{path}' is a zip file but not a torch.export .pt2 archive.", "Save models with torch.export.save()."
            )
        if trust_source:
            return
        risky: list[str] = []
        for name in names:
            parts = PurePosixPath(name).parts
            if "constants" in parts and parts[-1].startswith(("custom_obj", "opaque_obj")):
                risky.append(f"{name} (pickled object)")
            elif parts[-1].endswith(".pt") and "sample_inputs" not in parts:
                risky.append(f"{name} (legacy pickled payload)")
            elif parts[-1].endswith("_config.json") and ("weights" in parts or "constants" in parts):
                try:
                    config = json.loads(archive.read(name)).get("config", {})
                except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
                    raise SourceError(f"'{path}' has an unreadable manifest '{name}' ({exc}).") from exc
                if not isinstance(config, dict):
                    raise SourceError(f"'{path}' has a malformed manifest '{name}'.")
                risky += [
                    f"{name}: {fqn} (use_pickle)"
                    for fqn, meta in config.items()
                    if isinstance(meta, dict) and meta.get("use_pickle")
                ]
        if risky:
            raise UnsafeSourceError(
                f"'{path}' would unpickle objects when loaded: {', '.join(risky[:5])}"
                + (f" and {len(risky) - 5} more" if len(risky) > 5 else "")
                + ".",
                "Unpickling runs code. Pass --trust-source only if you made this file yourself.",
            )


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Force ``torch.load`` to its safe unpickler, even where a library asks otherwise."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous
