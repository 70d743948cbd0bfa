"""How close an engine runs to the machine's limit: its latency against the roofline time.

The roofline time of a model at the example inputs' shapes is the larger of its FLOPs
over the target's peak for the precision it computes in (the host profile measures FP32,
BF16 where native and INT8) and the bytes it must move over the memory bandwidth: its
weights (at the precision's width: a quarter for INT8, half for BF16/FP16, an eighth for
INT4 weight-only) and its inputs, the intermediates (and outputs) being left out. The FLOPs come from the op
library's per-node costs of the FP32 graph (:func:`adapter.op_library.model_cost`). A
fraction of 1 would be an engine at the machine's limit.
"""

from __future__ import annotations

__all__ = ["OVERHEAD_BOUND", "Roofline", "overhead_bound", "peak_key", "roofline"]

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adapter.core.specs import Dim
from adapter.core.timing import median_ms
from adapter.op_library import model_cost

_PEAK_OF = {"int8": "int8", "int8-dynamic": "int8", "fp8": "fp8", "bf16": "bf16", "fp16": "fp16"}
"""The peak a precision mode's arithmetic runs at (others, INT4 weight-only included: FP32)."""
_WIDTH = {"int8": 0.25, "int8-dynamic": 0.25, "fp8": 0.25, "bf16": 0.5, "fp16": 0.5, "int4-weight": 0.125}
"""Weight bytes of a precision mode (or at a peak's precision), relative to FP32."""
OVERHEAD_BOUND = 0.02
"""Below this fraction of the roofline (the FP32 engine's arithmetic and weights at the
FP32 peak, against its measured latency) a model is bound by per-op overhead, which BF16
does not shorten: the default precision keeps FP32 without building BF16. Measured (Zen 4,
2 cores): a 2-layer MLP 0.05%, the zoo's small models 6-52%, MiniLM [2,128] ~100%. On such
a model a 5% gain is within timing noise, so the choice would flip from run to run."""


def peak_key(mode: str, profile: Any) -> str:
    """The ``peak_flops`` entry for ``mode`` (FP32 where the profile has no figure for it)."""
    key = _PEAK_OF.get(mode, "fp32")
    return key if key in profile.peak_flops else "fp32"


@dataclass(frozen=True)
class Roofline:
    """A model's work at one input shape, and the machine's limits."""

    flops: float
    weight_bytes: float
    io_bytes: float
    peaks: dict[str, float]
    bandwidth: float

    def ms(self, key: str, width: str | None = None) -> float:
        """The roofline time (ms) computing at the ``key`` peak, weights at ``width``'s
        width (default: the peak's own precision)."""
        moved = self.weight_bytes * _WIDTH.get(width or key, 1.0) + self.io_bytes
        return 1e3 * max(self.flops / self.peaks[key], moved / self.bandwidth if self.bandwidth else 0.0)

    def mode_ms(self, mode: str, profile: Any) -> float:
        """The roofline time (ms) of ``mode``: its peak's FLOP rate, its own weight width."""
        return self.ms(peak_key(mode, profile), mode)

    def figures(self, mode: str, profile: Any, latency_ms: float | None) -> dict[str, Any]:
        """The roofline time at ``mode``'s peak and the fraction of it ``latency_ms`` reaches."""
        ideal = self.mode_ms(mode, profile)
        return {"peak": peak_key(mode, profile), "roofline_ms": ideal, "fraction": ideal / latency_ms if latency_ms else None}


def _sizes(specs: list[Any], examples: dict[str, Any]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for spec in specs:
        value = examples.get(spec.name)
        if value is None:
            continue
        for dim, size in zip(spec.shape, value.shape):
            if isinstance(dim, Dim) and dim.name:
                sizes.setdefault(dim.name, int(size))
    return sizes


def roofline(model: Any, specs: list[Any], examples: dict[str, Any], profile: Any) -> Roofline | None:
    """``model``'s roofline at the examples' shapes (None when its FLOPs are unknown)."""
    cost = model_cost(model, _sizes(specs, examples))
    if not cost["flops"]:
        return None
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    io = sum(getattr(a, "nbytes", 0) for a in examples.values())
    return Roofline(float(cost["flops"]), float(weights), float(io), dict(profile.peak_flops), float(profile.memory_bandwidth or 0))


def overhead_bound(model: Any, specs: list[Any], examples: dict[str, Any], run: Callable[[dict], Any], profile: Any) -> str:
    """Why ``model`` is bound by per-op overhead (see :data:`OVERHEAD_BOUND`), or '':
    ``run`` (its FP32 engine) is timed on ``examples`` against the roofline's FP32 time."""
    roof = roofline(model, specs, examples, profile)
    if roof is None:  # FLOPs unknown: nothing can be said
        return ""
    ideal, measured = roof.ms("fp32"), median_ms(lambda: run(examples), warmup=3, repeats=15)
    if ideal >= OVERHEAD_BOUND * measured:
        return ""
    return (f"the FP32 engine runs {measured:.3f} ms, of which its arithmetic and weights at the FP32 peak would "
            f"take {ideal:.2g} ms ({100 * ideal / measured:.2g}%, under {OVERHEAD_BOUND:.0%})")  # fmt: skip
