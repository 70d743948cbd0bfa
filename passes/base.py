"""The base of adapter's passes: an in-place onnx-ir pass that reports what it changed."""

from __future__ import annotations

__all__ = ["CountedPass", "PassRecord", "op_histogram"]

import abc
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir


def op_histogram(model: ir.Model) -> Counter:
    """Count nodes per ``domain::op_type`` over the main graph and its subgraphs."""
    return Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph.all_nodes())


@dataclass
class PassRecord:
    """What one pass did: counters of its own plus the node-count change per op type."""

    name: str
    modified: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    op_delta: dict[str, int] = field(default_factory=dict)
    counters: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "modified": self.modified,
            "seconds": round(self.seconds, 4),
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "op_delta": self.op_delta,
            "counters": self.counters,
        }

    def summary(self) -> str:
        parts = [f"{k}={v}" for k, v in self.counters.items()]
        if self.nodes_before != self.nodes_after:
            parts.append(f"nodes {self.nodes_before}->{self.nodes_after}")
        return ", ".join(parts) or "no change"


class CountedPass(ir.passes.InPlacePass):
    """An in-place pass whose ``apply`` returns counters; ``record`` holds the last run.

    Subclasses implement :meth:`apply`, returning a dict of counters; the pass is
    ``modified`` when the graph's node histogram changed or any counter is non-zero.
    """

    name: str = "pass"

    def __init__(self) -> None:
        super().__init__()
        self.record: PassRecord | None = None

    @abc.abstractmethod
    def apply(self, model: ir.Model) -> dict[str, Any]:
        """Transform ``model`` in place and return the pass's counters."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = op_histogram(model)
        start = time.perf_counter()
        counters = self.apply(model)
        seconds = time.perf_counter() - start
        after = op_histogram(model)
        delta = {op: after[op] - before[op] for op in sorted(set(before) | set(after)) if after[op] != before[op]}
        modified = bool(delta) or any(bool(v) for v in counters.values())
        self.record = PassRecord(
            self.name, modified, seconds, sum(before.values()), sum(after.values()), delta, counters
        )
        return ir.passes.PassResult(model, modified)
