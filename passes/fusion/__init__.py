"""Operator fusion: rewrite-rule sets that turn op patterns into fused ops.

Two families of passes, picked by pipeline (:mod:`adapter.passes.pipeline`):

* ``fusion-standard`` keeps to the standard ONNX domain (for OpenVINO and any other
  runtime): LayerNormalization, Gelu (opset 20), 2-D MatMul + Add to Gemm, Conv +
  BatchNormalization folding. Attention and Conv + activation are left to the backend.
* ``fusion-ort`` targets ONNX Runtime's CPU provider with its ``com.microsoft`` fused
  ops: Attention / MultiHeadAttention, SkipSimplifiedLayerNormalization, Gelu / FastGelu /
  BiasGelu, RotaryEmbedding (``fuse-ort-skip-layer-norm``, SkipLayerNormalization, is a
  pass of its own, left out of the pipeline: slower than what it fuses on the CPU provider).

Each pass counts hits per rule (its record's counters). With
``FusionOptions(explain_misses=True)`` it also keeps, in ``pass.misses``, why the best
partial match of every rule that never fired was refused (onnxscript's matching tracer).
"""

from __future__ import annotations

__all__ = [
    "FusionOptions",
    "FusionPass",
    "ConvBatchNormFusion",
    "MatMulAddGemmFusion",
    "LayerNormFusion",
    "GeluFusion",
    "GemmUnfold",
    "OrtNormalizationFusion",
    "OrtSkipLayerNormFusion",
    "OrtGeluFusion",
    "OrtRotaryFusion",
    "OrtAttentionFusion",
    "OpenVINOAttentionFusion",
]

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir

from adapter.passes.base import CountedPass
from adapter.passes.fusion import attention, conv, gelu, gemm, normalization, rotary
from adapter.passes.fusion._engine import Stage, apply_stages, explain_misses, onnx_opset


@dataclass(frozen=True)
class FusionOptions:
    """How a fusion pass reports what it did."""

    explain_misses: bool = False
    """Keep, per rule that never fired, why its best partial match failed (slower)."""


class FusionPass(CountedPass):
    """Applies the stages of one rule family; counters are the hits per rule."""

    def __init__(self, options: FusionOptions | None = None) -> None:
        super().__init__()
        self.options = options or FusionOptions()
        self.misses: dict[str, str] = {}

    STAGES: Sequence[Stage] = ()
    """The rule stages of this family (data; ``stages`` may pick by the model instead)."""

    def stages(self, model: ir.Model) -> Sequence[Stage]:
        """The stages for ``model``: ``STAGES`` unless a family depends on the opset."""
        return self.STAGES

    def apply(self, model: ir.Model) -> dict[str, Any]:
        stages = self.stages(model)
        counts = apply_stages(model, stages)
        self.misses = explain_misses(model, stages, counts) if self.options.explain_misses else {}
        return counts


class ConvBatchNormFusion(FusionPass):
    """Fold inference BatchNormalization into the Conv / ConvTranspose / Gemm before it."""

    name = "fuse-conv-batchnorm"
    STAGES = conv.STAGES


class MatMulAddGemmFusion(FusionPass):
    """2-D ``MatMul`` + a Gemm-broadcastable bias ``Add`` to ``Gemm``."""

    name = "fuse-matmul-add-gemm"
    STAGES = gemm.STANDARD_STAGES


class LayerNormFusion(FusionPass):
    """Decomposed layer norm to LayerNormalization (and RMSNorm to RMSNormalization at opset 23+)."""

    name = "fuse-layer-norm"

    def stages(self, model: ir.Model) -> Sequence[Stage]:
        extra = normalization.RMS_STANDARD_STAGES if onnx_opset(model) >= 23 else ()
        return (*normalization.STANDARD_STAGES, *extra)


class GeluFusion(FusionPass):
    """Decomposed GELU (erf or tanh form) to ONNX ``Gelu`` (opset 20+)."""

    name = "fuse-gelu"
    STAGES = gelu.STANDARD_STAGES


class GemmUnfold(FusionPass):
    """Flattened ``Reshape``-``Gemm``-``Reshape`` back to ``MatMul`` + ``Add`` (before ORT fusions)."""

    name = "unfold-flat-gemm"
    STAGES = gemm.UNFOLD_STAGES


class OrtNormalizationFusion(FusionPass):
    """Layer norm, RMSNorm and residual-add forms to ONNX Runtime's normalization ops."""

    name = "fuse-ort-normalization"
    STAGES = normalization.ORT_STAGES


class OrtSkipLayerNormFusion(FusionPass):
    """The residual ``Add`` before a layer norm to ONNX Runtime's ``SkipLayerNormalization``.

    Not in the ``fusion-ort`` pipeline: on the CPU provider the fused kernel is the slower
    one (figures in :data:`normalization.ORT_STAGES`).
    """

    name = "fuse-ort-skip-layer-norm"
    STAGES = normalization.ORT_SKIP_STAGES


class OrtGeluFusion(FusionPass):
    """GELU (and its bias ``Add``) to ONNX Runtime's Gelu / FastGelu / BiasGelu."""

    name = "fuse-ort-gelu"
    STAGES = gelu.ORT_STAGES


class OrtRotaryFusion(FusionPass):
    """Rotary position embedding to ONNX Runtime's ``RotaryEmbedding``."""

    name = "fuse-ort-rotary"
    STAGES = rotary.ORT_STAGES


class OpenVINOAttentionFusion(FusionPass):
    """Eager attention to ONNX ``Attention`` (opset 23), which OpenVINO reads as its
    ScaledDotProductAttention; the model's standard opset becomes 23 where any fused."""

    name = "fuse-ov-attention"
    STAGES = attention.OV_STAGES

    def apply(self, model: ir.Model) -> dict[str, Any]:
        counts = super().apply(model)
        if counts.get("sdpa_to_onnx_attention"):
            model.opset_imports[""] = max(23, model.opset_imports.get("", 0))
        return counts


class OrtAttentionFusion(FusionPass):
    """Eager attention to ONNX Runtime's MultiHeadAttention / Attention."""

    name = "fuse-ort-attention"
    STAGES = attention.ORT_STAGES

    def apply(self, model: ir.Model) -> dict[str, Any]:
        counts = super().apply(model)
        counts["equal_qkv_sizes_implied"] = attention.drop_equal_qkv_sizes(model)
        return counts
