"""Input/output specs and the ``--dynamic`` syntax.

A spec records what an engine accepts: name, dtype, and a shape whose entries are
either fixed sizes or named dynamic dims with an inclusive ``[min, max]`` range.
"""

from __future__ import annotations

__all__ = ["Dim", "TensorSpec", "parse_dynamic", "DEFAULT_DIM_MAX", "check_inputs", "example_sizes", "spec_of"]

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from adapter.core.errors import InputMismatchError, SourceError

DEFAULT_DIM_MAX = 4096
"""Upper bound of a dynamic dim when the user names none."""

_DIM_RE = re.compile(r"^(\d+)=([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\.\.(\d+)\])?$")


@dataclass(frozen=True)
class Dim:
    """A named dynamic dimension with an inclusive range."""

    name: str
    min: int = 1
    max: int = DEFAULT_DIM_MAX

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "min": self.min, "max": self.max}


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype (a numpy dtype name) and shape of one engine input or output."""

    name: str
    dtype: str
    shape: tuple[int | Dim, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": [d.to_json() if isinstance(d, Dim) else d for d in self.shape],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        shape = tuple(Dim(**d) if isinstance(d, dict) else int(d) for d in data["shape"])
        return cls(data["name"], data["dtype"], shape)

    def describe(self) -> str:
        dims = ", ".join(f"{d.name}[{d.min}..{d.max}]" if isinstance(d, Dim) else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


def parse_dynamic(items: list[str] | tuple[str, ...]) -> dict[str, dict[int, Dim]]:
    """Parse ``--dynamic`` options.

    Each item reads ``INPUT:AXIS=NAME[,AXIS=NAME...]`` with an optional range per dim,
    e.g. ``input_ids:0=batch,1=seq[1..512]``. Dims with the same name are the same
    symbol across inputs; a range given once applies to every use of the name.

    Raises:
        SourceError: The text does not follow the syntax.
    """
    parsed: dict[str, dict[int, tuple[str, int | None, int | None]]] = {}
    ranges: dict[str, tuple[int, int]] = {}
    for item in items:
        name, sep, rest = item.partition(":")
        if not sep or not name or not rest:
            raise SourceError(
                f"Cannot read --dynamic '{item}'.",
                "Write INPUT:AXIS=NAME[,AXIS=NAME], e.g. input_ids:0=batch,1=seq[1..512].",
            )
        axes = parsed.setdefault(name, {})
        for part in rest.split(","):
            match = _DIM_RE.match(part.strip())
            if not match:
                raise SourceError(
                    f"Cannot read '{part}' in --dynamic '{item}'.",
                    "Each axis reads AXIS=NAME or AXIS=NAME[MIN..MAX], e.g. 1=seq[1..512].",
                )
            axis, dim_name, lo, hi = match.groups()
            if lo is not None:
                lo_i, hi_i = int(lo), int(hi)
                if not 1 <= lo_i <= hi_i:
                    raise SourceError(
                        f"Dynamic dim '{dim_name}' has an empty range [{lo_i}..{hi_i}].",
                        "Use 1 <= MIN <= MAX.",
                    )
                if dim_name in ranges and ranges[dim_name] != (lo_i, hi_i):
                    raise SourceError(
                        f"Dynamic dim '{dim_name}' is given two ranges: {ranges[dim_name]} and {(lo_i, hi_i)}."
                    )
                ranges[dim_name] = (lo_i, hi_i)
            axes[int(axis)] = (dim_name, None, None)
    return {
        inp: {axis: Dim(dim, *ranges.get(dim, (1, DEFAULT_DIM_MAX))) for axis, (dim, _, _) in axes.items()}
        for inp, axes in parsed.items()
    }


def check_inputs(specs: list[TensorSpec], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check run-time inputs against specs; every problem is reported at once.

    Returns:
        The inputs in spec order, as contiguous numpy arrays.

    Raises:
        InputMismatchError: Missing, unknown, wrong-dtype or wrong-shape inputs.
    """
    problems: list[str] = []
    expected = {s.name for s in specs}
    unknown = sorted(set(inputs) - expected)
    if unknown:
        problems.append(f"unknown input(s) {', '.join(unknown)}")
    bound: dict[str, tuple[int, str]] = {}
    for spec in specs:
        if spec.name not in inputs:
            problems.append(f"missing input '{spec.name}' ({spec.describe()})")
            continue
        value = np.asarray(inputs[spec.name])
        if value.dtype != np.dtype(spec.dtype):
            problems.append(f"input '{spec.name}' has dtype {value.dtype}, expected {spec.dtype}")
        if value.ndim != len(spec.shape):
            problems.append(
                f"input '{spec.name}' has rank {value.ndim} (shape {list(value.shape)}), "
                f"expected rank {len(spec.shape)} ({spec.describe()})"
            )
            continue
        for axis, (size, dim) in enumerate(zip(value.shape, spec.shape)):
            if isinstance(dim, Dim):
                if not dim.min <= size <= dim.max:
                    problems.append(
                        f"input '{spec.name}' axis {axis} ('{dim.name}') is {size}, outside [{dim.min}..{dim.max}]"
                    )
                prev = bound.setdefault(dim.name, (size, spec.name))
                if prev[0] != size:
                    problems.append(f"dim '{dim.name}' is {prev[0]} in '{prev[1]}' but {size} in '{spec.name}'")
            elif size != dim:
                problems.append(f"input '{spec.name}' axis {axis} is {size}, expected {dim} ({spec.describe()})")
    if problems:
        raise InputMismatchError(
            "Inputs do not match the engine: " + "; ".join(problems) + ".",
            "Expected: " + "; ".join(s.describe() for s in specs) + ".",
        )
    return {s.name: np.asarray(inputs[s.name], order="C") for s in specs}


def spec_of(value, dims: dict[str, Dim]) -> TensorSpec:
    """The spec of an ``onnx_ir`` graph value: symbolic dims by name from ``dims`` (a new
    unbounded :class:`Dim` for a name not there, ``?`` for an anonymous one)."""
    shape: list[int | Dim] = []
    for d in value.shape or []:
        if isinstance(d, int):
            shape.append(d)
        else:
            label = str(d.value) if getattr(d, "value", None) is not None else "?"
            shape.append(dims.get(label, Dim(label)))
    return TensorSpec(value.name, value.dtype.numpy().name if value.dtype is not None else "float32", tuple(shape))


def example_sizes(specs: list[TensorSpec], examples: dict[str, np.ndarray]) -> dict[str, int]:
    """Each symbolic dim's size in the example inputs (dims of inputs not given are left out)."""
    sizes: dict[str, int] = {}
    for spec in specs:
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, Dim) and spec.name in examples:
                sizes[dim.name] = int(examples[spec.name].shape[axis])
    return sizes
