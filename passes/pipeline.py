"""Pass pipelines, chosen from data (the target profile's ``passes`` list)."""

from __future__ import annotations

__all__ = ["PIPELINES", "PASSES", "build_pipeline", "run_pipeline"]

from collections.abc import Callable, Sequence

import onnx_ir as ir

from adapter.core.errors import PassFailedError
from adapter.passes import canonicalize, fusion, kv_cache, packing
from adapter.passes.base import CountedPass, PassRecord

PASSES: dict[str, Callable[[], CountedPass]] = {
    "constant-folding": canonicalize.ConstantFolding,
    "lift-constants": canonicalize.LiftConstants,
    "identity-elimination": canonicalize.IdentityElimination,
    "cse": canonicalize.CommonSubexpressionElimination,
    "dead-code-elimination": canonicalize.DeadCodeElimination,
    "shape-inference": canonicalize.ShapeInference,
    "topological-sort": canonicalize.TopologicalSort,
    "fuse-conv-batchnorm": fusion.ConvBatchNormFusion,
    "fuse-matmul-add-gemm": fusion.MatMulAddGemmFusion,
    "fuse-layer-norm": fusion.LayerNormFusion,
    "fuse-gelu": fusion.GeluFusion,
    "unfold-flat-gemm": fusion.GemmUnfold,
    "fuse-ort-normalization": fusion.OrtNormalizationFusion,
    "fuse-ort-skip-layer-norm": fusion.OrtSkipLayerNormFusion,
    "fuse-ort-rotary": fusion.OrtRotaryFusion,
    "fuse-ort-attention": fusion.OrtAttentionFusion,
    "fuse-ov-attention": fusion.OpenVINOAttentionFusion,
    "fuse-ort-gelu": fusion.OrtGeluFusion,
    "fuse-ort-gqa": kv_cache.OrtGroupQueryAttentionFusion,
    "pack-sibling-matmuls": packing.PackSiblingMatMuls,
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
    "fusion-ort": (
        "fuse-conv-batchnorm",
        "unfold-flat-gemm",
        "fuse-ort-normalization",
        "fuse-ort-rotary",
        "fuse-ort-attention",
        "fuse-ort-gelu",
        "constant-folding",
        "lift-constants",
        "topological-sort",
    ),
    "fusion-ort-decoder": (
        "fuse-ort-normalization",
        "fuse-ort-rotary",
        "fuse-ort-attention",
        "fuse-ort-gqa",
        "pack-sibling-matmuls",
        "dead-code-elimination",
        "constant-folding",
        "lift-constants",
        "topological-sort",
    ),
    "fusion-ov-decoder": (
        "fuse-ov-attention",
        "dead-code-elimination",
        "topological-sort",
    ),
    "fusion-standard": (
        "fuse-conv-batchnorm",
        "fuse-layer-norm",
        "fuse-gelu",
        "fuse-matmul-add-gemm",
        "topological-sort",
    ),
    "none": (),
}
"""Named pipelines; a profile or ``--passes`` picks one, or lists pass names.

``fusion-ort`` and ``fusion-standard`` expect a canonicalized graph (list them after
``canonicalize``): ``fusion-ort`` writes ONNX Runtime's ``com.microsoft`` fused ops (and
folds what the fusions left constant, such as Attention's concatenated Q/K/V weights),
``fusion-standard`` stays in the standard domain (OpenVINO and other runtimes).
``fusion-ort-decoder`` is ONNX Runtime's for an exported decoder with a KV cache
(``adapter.llm``): normalization, rotary and attention fusions, then each layer's cache
concatenation and attention to one ``GroupQueryAttention`` over a shared buffer, and the
projections of one input (Q/K/V, gate/up) packed into one ``MatMul``."""


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
