"""The op library's record types: a tensor as the formulas see it, an op entry, a documented list."""

from __future__ import annotations

__all__ = ["PRECISIONS", "Tensor", "OpEntry", "DocumentedBackend", "resolve_shape", "tensor_of"]

import ast
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8", "int4")
"""Precisions an entry may allow, in this order."""

_ITEMSIZE = {
    "FLOAT": 4,
    "FLOAT16": 2,
    "BFLOAT16": 2,
    "DOUBLE": 8,
    "INT64": 8,
    "INT32": 4,
    "INT16": 2,
    "INT8": 1,
    "UINT64": 8,
    "UINT32": 4,
    "UINT16": 2,
    "UINT8": 1,
    "BOOL": 1,
    "FLOAT8E4M3FN": 1,
    "FLOAT8E4M3FNUZ": 1,
    "FLOAT8E5M2": 1,
    "FLOAT8E5M2FNUZ": 1,
    "INT4": 0.5,
    "UINT4": 0.5,
    "FLOAT4E2M1": 0.5,
}


@dataclass(frozen=True)
class Tensor:
    """A node input or output with every dim known (symbolic dims resolved from a size map)."""

    shape: tuple[int, ...]
    dtype: str = "FLOAT"
    """ONNX data type name (``FLOAT``, ``INT64``, ``UINT8``, ...)."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return math.ceil(self.numel * _ITEMSIZE.get(self.dtype, 4))


SELECTING_OPS = frozenset({"Gather", "GatherElements", "GatherND", "Slice"})
"""Ops that read only the part of their first input they return."""


@dataclass(frozen=True)
class OpEntry:
    """One ONNX op: its cost formulas, allowed precisions and where its definition lives."""

    op_type: str
    domain: str
    family: str
    """Cost family (matmul, conv, attention, elementwise, reduction, normalization, movement, ...)."""
    flops: Callable[[list[Tensor | None], list[Tensor | None], Mapping[str, Any]], int]
    """FLOPs from resolved input/output tensors and the node's attributes (multiply-add = 2)."""
    formula: str
    """The FLOPs formula in words, as the matrix prints it."""
    precisions: tuple[str, ...]
    """Which of :data:`PRECISIONS` the op may run in (int8/fp8 through QDQ, int4 weight-only)."""
    spec: str
    """Where the op is defined (ONNX operator docs or ONNX Runtime's contrib-op docs)."""
    notes: str = ""

    @property
    def key(self) -> str:
        return f"{self.domain}::{self.op_type}" if self.domain else self.op_type

    def bytes(self, inputs: list[Tensor | None], outputs: list[Tensor | None]) -> int:
        """Bytes moved: every input (weights included) read once, every output written once,
        except that ops selecting part of their data (Gather, Slice, ...) read no more of it
        than they write: an embedding lookup reads the rows it gathers, not the table."""
        moved = sum(t.nbytes for t in (*inputs, *outputs) if t is not None)
        if self.op_type in SELECTING_OPS and inputs and inputs[0] is not None:
            written = sum(t.nbytes for t in outputs if t is not None)
            moved -= max(0, inputs[0].nbytes - written)
        return moved


@dataclass(frozen=True)
class DocumentedBackend:
    """A backend's op list as its own documentation or converter table states it."""

    name: str
    version: str
    source: str
    """URL of the document the list was read from (with the commit read)."""
    ops: frozenset[str]
    """Supported ops as ``domain::op`` keys (standard domain: the bare op name)."""
    ignores_domain: bool = False
    """The frontend dispatches on op_type alone (a com.microsoft op counts if its name is listed)."""
    extra_sources: tuple[str, ...] = ()
    notes: Mapping[str, str] = field(default_factory=dict)
    """Per op: the documented restriction."""
    refused: frozenset[str] = frozenset()
    """Ops the document names and marks unsupported (an op it never names is unsupported too, silently)."""
    constant_inputs: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    """Per op: input indices the document requires to be build-time constants (initializer or Constant)."""
    basis: str = "documented list"
    """Where the list comes from: ``documented list``, or ``live converter map`` (read from the installed frontend)."""

    def supports(self, op_type: str, domain: str = "") -> bool:
        if self.ignores_domain:
            return op_type in {k.split("::")[-1] for k in self.ops}
        return (f"{domain}::{op_type}" if domain else op_type) in self.ops


def resolve_shape(shape: Any, sizes: Mapping[str, int]) -> tuple[int, ...] | None:
    """Turn an onnx-ir shape into ints: symbolic dims from ``sizes`` (expressions allowed)."""
    if shape is None:
        return None
    dims: list[int] = []
    for dim in shape:
        if isinstance(dim, int):
            dims.append(dim)
            continue
        name = getattr(dim, "value", dim)
        if name is None:
            return None
        if name in sizes:
            dims.append(int(sizes[name]))
            continue
        value = _evaluate(str(name), sizes)  # exporter expressions such as "seq + 1" or "2*batch"
        if value is None:
            return None
        dims.append(value)
    return tuple(dims)


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def _evaluate(expr: str, sizes: Mapping[str, int]) -> int | None:
    """Evaluate a dim expression of names, ints, + - * // (nothing else is accepted)."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in sizes:
            return int(sizes[node.id])
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(expr)

    try:
        return int(walk(ast.parse(expr, mode="eval")))
    except (ValueError, SyntaxError, ZeroDivisionError):
        return None


def tensor_of(value: Any, sizes: Mapping[str, int]) -> Tensor | None:
    """A :class:`Tensor` for an onnx-ir value, or None when absent or its shape is unknown."""
    if value is None:
        return None
    shape = resolve_shape(value.shape, sizes)
    if shape is None:
        return None
    dtype = getattr(value.dtype, "name", None) or "FLOAT"
    return Tensor(shape, dtype)
