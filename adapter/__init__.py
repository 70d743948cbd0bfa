"""adapter: take a PyTorch model to the fastest verified engine for each machine.

Public entry points: :func:`adapter.convert` and :func:`adapter.load`; the command
line is ``adapter`` (:mod:`adapter.cli.main`).
"""

from adapter.converter.api import ConvertOptions, ConvertResult, convert, load
from adapter.core.errors import AdapterError
from adapter.core.verify import Tolerance

__all__ = ["AdapterError", "ConvertOptions", "ConvertResult", "Tolerance", "convert", "load"]
