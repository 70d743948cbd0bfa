"""adapter: take a PyTorch model to the fastest verified engine for each machine.

Public entry points: :func:`adapter.convert`, :func:`adapter.convert_causal_lm` and
:func:`adapter.load`; the command line is ``adapter`` (:mod:`adapter.cli.main`).

The names below are loaded on first use (PEP 562): every process that imports a part of
adapter runs this file, and the torchrun rank workers (``adapter.runtime.worker``) need
neither the converter nor the LLM layer, whose imports (transformers, the exporter) cost
seconds per process.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__all__ = [
    "AdapterError", "ConvertOptions", "ConvertResult", "LLMEngine", "LLMOptions", "Tolerance", "convert",
    "convert_causal_lm", "load",
]  # fmt: skip

_LAZY = {
    "ConvertOptions": "adapter.converter.api",
    "ConvertResult": "adapter.converter.api",
    "convert": "adapter.converter.api",
    "AdapterError": "adapter.core.errors",
    "Tolerance": "adapter.core.verify",
    "LLMOptions": "adapter.llm.convert",
    "convert_causal_lm": "adapter.llm.convert",
    "LLMEngine": "adapter.llm.engine",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'adapter' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def load(path: Path | str, check: bool = True):
    """Load an engine artifact: a forward-pass engine, or an ``LLMEngine`` for a causal LM.

    Raises:
        ArtifactError: Not an artifact, or damaged (with ``check``, files against the manifest).
    """
    artifact = importlib.import_module("adapter.core.artifact")
    if importlib.import_module("adapter.llm.engine").is_llm_artifact(artifact.read_manifest(Path(path))):
        return importlib.import_module("adapter.llm.engine").LLMEngine.load(path, check)
    return importlib.import_module("adapter.converter.api").load(path, check)
