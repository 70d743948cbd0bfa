"""adapter: take a PyTorch model to the fastest verified engine for each machine.

Public entry points: :func:`adapter.convert` and :func:`adapter.load`; the command
line is ``adapter`` (:mod:`adapter.cli`).
"""

from adapter.api import ConvertOptions, ConvertResult, convert, load
from adapter.errors import AdapterError
from adapter.verify import Tolerance

__all__ = ["AdapterError", "ConvertOptions", "ConvertResult", "Tolerance", "convert", "load"]
