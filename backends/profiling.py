"""What a backend's profiler hook (``Backend.CAPTURE``) returns: per backend kernel its
times in every profiled run and the ONNX nodes it claims. ``adapter.profile`` maps them to
ONNX nodes and modules, costs them and places them on the roofline."""

from __future__ import annotations

__all__ = ["Capture", "Kernel", "blocks"]

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class Kernel:
    """One backend node: its timings in each profiled run and the ONNX nodes it covers."""

    name: str
    op_type: str
    durations_us: list[float] = field(default_factory=list)
    starts_us: list[float] = field(default_factory=list)
    claims: list[str] = field(default_factory=list)
    arg_shapes: list[tuple[tuple[int, ...], str]] = field(default_factory=list)
    summary_us: float | None = None
    """The node's figure when the backend's own counters give a better one than the
    median of ``durations_us`` (OpenVINO: the mean, exact from its running totals)."""


@dataclass
class Capture:
    kernels: list[Kernel]
    totals_ms: list[float]
    note: str = ""
    structure: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)
    """ONNX Runtime: the graph it ran, node name to (input, output) tensor names."""
    boundary: set[str] = field(default_factory=set)
    """ONNX Runtime: every tensor name that still exists in the graph it ran."""
    idle: list[str] = field(default_factory=list)
    """OpenVINO: ONNX nodes folded into runtime nodes that did not execute (reshapes, constants)."""
    mapping: str = "none"
    """How the profiler maps kernels to ONNX nodes: ``tensors`` (the graph the backend ran,
    by tensor names: ONNX Runtime), ``fused`` (each kernel's list of original node names:
    OpenVINO) or ``none`` (no link: TVM)."""

    @property
    def mapped(self) -> bool:
        """Whether kernels link to ONNX nodes (and so to modules)."""
        return self.mapping != "none"


def blocks(repeats: int, between: Callable[[], None], rounds: int = 5) -> Iterator[int]:
    """Split ``repeats`` into up to ``rounds`` blocks, calling ``between`` before each (the
    end-to-end timing runs there, so both see the same background load)."""
    rounds = max(1, min(rounds, repeats))
    sizes = [repeats // rounds + (1 if i < repeats % rounds else 0) for i in range(rounds)]
    for size in sizes:
        between()
        yield size
