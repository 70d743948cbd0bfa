"""Backends (installed as ``adapter.backends``): one module each, one contract.

Each backend module declares what :class:`adapter.backends.base.Backend` lists (its name,
fusion passes, precisions, whether it joins ``--backend auto``, shapes, device, stand-in,
profiler hook, pip extra, options, engine, ``supports`` and ``compile``). Vendor SDKs are
imported inside the module that needs them, so registering a backend costs nothing.
Adding a backend is one new module plus its import and :func:`register` line below.
"""

from __future__ import annotations

from adapter.backends import edge, llamacpp, migraphx, onnxruntime, openvino, tensorrt, tvm
from adapter.backends.base import Backend, check_backend
from adapter.core.errors import BackendUnavailableError

__all__ = ["BACKENDS", "DEFAULT", "Backend", "auto_backends", "get_backend", "graph_backends", "register"]

BACKENDS: dict[str, Backend] = {}
"""Backend name to its module (or object), in registration order."""
DEFAULT = "onnxruntime"
"""The backend used when neither the user nor the target profile names one."""


def register(backend: Backend) -> Backend:
    """Add ``backend`` to the registry after checking it against the contract.

    Raises:
        TypeError: It lacks a member of the contract or declares one wrongly.
    """
    problems = check_backend(backend)
    if problems:
        raise TypeError(f"Backend {getattr(backend, 'NAME', backend)!r} does not meet the contract: {'; '.join(problems)}.")
    BACKENDS[backend.NAME] = backend
    return backend


def get_backend(name: str) -> Backend:
    """A registered backend whose SDK is installed.

    Raises:
        BackendUnavailableError: Unknown name, or its SDK is not installed.
    """
    if name not in BACKENDS:
        raise BackendUnavailableError(f"Unknown backend '{name}'.", f"Known backends: {', '.join(sorted(BACKENDS))}.")
    backend = BACKENDS[name]
    backend.require()
    return backend


def graph_backends() -> list[str]:
    """The backends that build engines from ONNX graphs (any ``PRECISIONS``); llama.cpp, which
    runs its own graphs and builds generation engines only, is not one."""
    return [name for name, backend in BACKENDS.items() if backend.PRECISIONS]


def auto_backends(profile) -> list[str]:
    """The backends ``--backend auto`` builds for ``profile``: those the profile lists
    (``[backends.<name>]``) that join auto on its kind, in the profile's order."""
    kind = getattr(profile, "kind", "cpu")
    return [n for n in getattr(profile, "backends", {}) if n in BACKENDS and kind in BACKENDS[n].AUTO_KINDS]


register(onnxruntime)
register(openvino)
register(tvm)
register(tensorrt)
register(migraphx)
register(edge)
register(llamacpp)
