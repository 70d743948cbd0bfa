"""What importing a source gives: the ONNX graph, its specs and the eager reference."""

from __future__ import annotations

__all__ = ["ImportedModel"]

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from adapter.core.specs import TensorSpec


@dataclass
class ImportedModel:
    """The imported graph, its specs, and how to compute reference outputs."""

    model: ir.Model
    kind: str
    source: str
    digest: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    example_inputs: dict[str, np.ndarray]
    reference: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    reference_kind: str
    seconds: dict[str, float] = field(default_factory=dict)
    tokenizer: Any = None
    """The model's tokenizer when the source provides one (for text calibration)."""
