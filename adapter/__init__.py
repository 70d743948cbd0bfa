"""adapter: take a PyTorch model to the fastest verified engine for each machine.

Public entry points: :func:`adapter.convert` and :func:`adapter.load`; the command
line is ``adapter`` (:mod:`adapter.cli.main`).
"""

from pathlib import Path

from adapter.converter.api import ConvertOptions, ConvertResult, convert
from adapter.converter.api import load as _load_forward
from adapter.core.artifact import read_manifest
from adapter.core.errors import AdapterError
from adapter.core.verify import Tolerance
from adapter.llm.convert import LLMOptions, convert_causal_lm
from adapter.llm.engine import LLMEngine, is_llm_artifact

__all__ = [
    "AdapterError", "ConvertOptions", "ConvertResult", "LLMEngine", "LLMOptions", "Tolerance", "convert",
    "convert_causal_lm", "load",
]  # fmt: skip


def load(path: Path | str, check: bool = True):
    """Load an engine artifact: a forward-pass engine, or an :class:`LLMEngine` for a causal LM.

    Raises:
        ArtifactError: Not an artifact, or damaged (with ``check``, files against the manifest).
    """
    if is_llm_artifact(read_manifest(Path(path))):
        return LLMEngine.load(path, check)
    return _load_forward(path, check)
