"""Graph passes over ``onnx_ir`` models (installed as ``adapter.passes``).

Every pass is an ``onnx_ir.passes`` pass that records what it changed; pipelines are
built from a target profile's data by :mod:`adapter.passes.pipeline`.
"""

from adapter.passes.base import CountedPass, PassRecord
from adapter.passes.canonicalize import (
    CommonSubexpressionElimination,
    ConstantFolding,
    DeadCodeElimination,
    IdentityElimination,
    LiftConstants,
    ShapeInference,
    TopologicalSort,
)
from adapter.passes.pipeline import PIPELINES, build_pipeline, run_pipeline

__all__ = [
    "CountedPass",
    "PassRecord",
    "ConstantFolding",
    "DeadCodeElimination",
    "IdentityElimination",
    "LiftConstants",
    "CommonSubexpressionElimination",
    "ShapeInference",
    "TopologicalSort",
    "PIPELINES",
    "build_pipeline",
    "run_pipeline",
]
