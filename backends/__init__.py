"""Backends (installed as ``adapter.backends``): one module each, same surface.

Each backend module defines ``NAME``, ``PASSES`` (its fusion pipeline), ``version()``,
``supports(node, model, profile)``, ``compile(model, profile, options, specs, workdir)``
and an ``Engine`` class with ``save``, ``load`` and ``run``. Vendor SDKs are imported
inside the module that needs them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from adapter.core.errors import BackendUnavailableError

__all__ = ["BACKENDS", "get_backend"]

BACKENDS: dict[str, str] = {
    "onnxruntime": "adapter.backends.onnxruntime",
    "openvino": "adapter.backends.openvino",
    "tvm": "adapter.backends.tvm",
    "tensorrt": "adapter.backends.tensorrt",
    "migraphx": "adapter.backends.migraphx",
    "edge": "adapter.backends.edge",
}
"""Backend name to module path."""


def get_backend(name: str) -> ModuleType:
    """Import a backend module by name.

    Raises:
        BackendUnavailableError: Unknown name, or its SDK is not installed.
    """
    if name not in BACKENDS:
        raise BackendUnavailableError(f"Unknown backend '{name}'.", f"Known backends: {', '.join(sorted(BACKENDS))}.")
    module = importlib.import_module(BACKENDS[name])
    module.require()
    return module
