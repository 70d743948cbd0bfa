"""llama.cpp backend: generation engines only (GGUF weights run by llama.cpp's own graphs).

llama.cpp is the CPU LLM engine many users pick first (x86 and ARM boards alike). It does
not run ONNX graphs: it carries one hand-written graph per architecture and reads weights
and hyperparameters from a GGUF file. So this backend builds no engines from ONNX graphs
(no precisions, never in an encoder's ``--backend auto``, every node answered "no" with the
reason) and all of it lives in ``DECODER`` (:mod:`adapter.backends._llamacpp_decoder`):
causal LMs of the families it maps, built from the eager model's weights, verified against
eager like every decoder, and raced with the other CPU decoders under ``--backend auto``.
"""

from __future__ import annotations

__all__ = ["NAME", "PASSES", "Options", "version", "require", "supports", "compile", "Engine"]

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from adapter.backends import _llamacpp_decoder
from adapter.backends.base import EngineBase, Support, profile_options, require_module
from adapter.core.errors import AdapterError

NAME = "llamacpp"
PASSES: tuple[str, ...] = ()
PRECISIONS: frozenset[str] = frozenset()
EMULATES: frozenset[str] = frozenset()
AUTO_KINDS: frozenset[str] = frozenset()
"""Never in an ONNX graph's race; its decoders join the generation race (``DECODER.AUTO_KINDS``)."""
FIXED_SHAPES = False
BUILD_OPTIONS: frozenset[str] = frozenset()
DEVICE = "cpu"
STAND_IN = False
EXTRA = "llamacpp"
_WHY = "llama.cpp runs its own graph per LLM architecture (GGUF weights), not ONNX graphs"


@dataclass(frozen=True)
class Options:
    """No options: the backend builds no engines from ONNX graphs."""

    @classmethod
    def from_profile(cls, profile: Any, overrides: dict[str, Any] | None = None) -> Options:
        return profile_options(cls, NAME, profile, overrides)


def require() -> None:
    require_module("llama_cpp", NAME, "pip install -e '.[llamacpp]'")
    require_module("gguf", NAME, "pip install -e '.[llamacpp]'")


def version() -> str:
    try:
        import llama_cpp
    except ImportError:
        return "not installed"
    return f"llama-cpp-python {llama_cpp.__version__}"


def supports(node: ir.Node, model: ir.Model, profile: Any = None) -> Support:
    return Support(False, _WHY)


def compile(model: ir.Model, profile: Any, options: Any, specs: Any, workdir: Path) -> EngineBase:
    raise AdapterError(
        f"The {NAME} backend builds generation engines only: {_WHY}.",
        "Convert a causal LM folder with --backend llamacpp, or pick another backend for this model.",
    )


class Engine(EngineBase):
    """Never built (see :func:`compile`); present because the contract names an engine class."""

    backend = NAME

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise AdapterError(f"The {NAME} backend has no engines for ONNX graphs: {_WHY}.")


CAPTURE = None
DECODER = _llamacpp_decoder
