"""Pass pipelines, chosen from data (the target profile's ``passes`` list)."""

from __future__ import annotations

__all__ = ["PIPELINES", "PASSES", "build_pipeline", "run_pipeline"]

from collections.abc import Callable, Sequence

import onnx_ir as ir
from adapter.passes import canonicalize
from adapter.passes.base import CountedPass, PassRecord

from adapter.errors import PassFailedError

PASSES: dict[str, Callable[[], CountedPass]] = {
    "constant-folding": canonicalize.ConstantFolding,
    "lift-constants": canonicalize.LiftConstants,
    "identity-elimination": canonicalize.IdentityElimination,
    "cse": canonicalize.CommonSubexpressionElimination,
    "dead-code-elimination": canonicalize.DeadCodeElimination,
    "shape-inference": canonicalize.ShapeInference,
    "topological-sort": canonicalize.TopologicalSort,
}
"""Every pass by the name pipelines and profiles use."""

PIPELINES: dict[str, tuple[str, ...]] = {
    "canonicalize": (
        "constant-folding",
        "lift-constants",
        "identity-elimination",
        "cse",
        "dead-code-elimination",
        "shape-inference",
        "topological-sort",
    ),
    "none": (),
}
"""Named pipelines; a profile or ``--passes`` picks one, or lists pass names."""


def build_pipeline(names: Sequence[str] | str) -> list[CountedPass]:
    """Instantiate a pipeline from a pipeline name or a list of pass / pipeline names."""
    if isinstance(names, str):
        names = [names]
    passes: list[CountedPass] = []
    for name in names:
        if name in PIPELINES:
            passes.extend(PASSES[p]() for p in PIPELINES[name])
        elif name in PASSES:
            passes.append(PASSES[name]())
        else:
            known = ", ".join(sorted(PIPELINES) + sorted(PASSES))
            raise PassFailedError(f"Unknown pass or pipeline '{name}'.", f"Known: {known}.")
    return passes


def run_pipeline(model: ir.Model, passes: Sequence[CountedPass]) -> list[PassRecord]:
    """Run passes in order through onnx-ir's PassManager; return each pass's record."""
    if not passes:
        return []
    manager = ir.passes.PassManager(list(passes), steps=1)
    try:
        manager(model)
    except Exception as exc:
        failed = next((p.name for p in passes if p.record is None), "a pass")
        raise PassFailedError(
            f"Pass '{failed}' failed: {type(exc).__name__}: {exc}",
            "Run with --passes none to skip graph passes, and report the model.",
        ) from exc
    return [p.record for p in passes if p.record is not None]
