"""Conv + BatchNormalization folding (standard domain, for every backend).

An inference ``BatchNormalization`` after a ``Conv`` / ``ConvTranspose`` / ``Gemm`` with
constant weights is an affine map per output channel, so it folds into the weights and
bias (onnxscript's ``fuse_batchnorm`` rules: ``W * gamma / sqrt(var + eps)``, bias
``(b - mean) * gamma / sqrt(var + eps) + beta``). The stock rules check that the weights
and statistics are constant initializers nothing else uses; this file adds the checks
that the norm is an inference one: no ``training_mode``, one output (the running-stat
outputs of a training-mode norm cannot be folded away). Conv + activation is left to the
backend, which fuses it in its own kernels.
"""

from __future__ import annotations

__all__ = ["STAGES", "rules"]

import onnx_ir as ir
from onnxscript.rewriter import MatchResult
from onnxscript.rewriter.rules.common import _fuse_batchnorm

from adapter.passes.fusion._engine import Stage, rule_set


def _inference_only(batchnorm_out: ir.Value) -> str | None:
    """Why a BatchNormalization cannot fold (None when it can)."""
    node = batchnorm_out.producer()
    if node.attributes.get_int("training_mode", 0):
        return "BatchNormalization is in training mode."
    if len(node.outputs) > 1 and any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        return "BatchNormalization's running statistics are used."
    return None


class _InferenceOnly:
    """Mixin: refuse training-mode norms before the stock checks."""

    def check(self, context, x, inbound_out, batchnorm_out) -> MatchResult:
        reason = _inference_only(batchnorm_out)
        if reason:
            return MatchResult().fail(reason, batchnorm_out)
        return super().check(context, x, inbound_out, batchnorm_out)


class ConvBatchNorm(_InferenceOnly, _fuse_batchnorm.FuseBatchNormIntoConv):
    """``BatchNormalization(Conv(x))`` to ``Conv(x)`` with folded weights."""

    def __init__(self) -> None:
        super().__init__("conv_batchnorm")


class ConvTransposeBatchNorm(_InferenceOnly, _fuse_batchnorm.FuseBatchNormIntoConvTranspose):
    """``BatchNormalization(ConvTranspose(x))`` to ``ConvTranspose(x)`` with folded weights."""

    def __init__(self) -> None:
        super().__init__("conv_transpose_batchnorm")


class GemmBatchNorm(_InferenceOnly, _fuse_batchnorm.FuseBatchNormIntoGemm):
    """``BatchNormalization(Gemm(x))`` to ``Gemm(x)`` with folded weights."""

    def __init__(self) -> None:
        super().__init__("gemm_batchnorm")


STAGES = (Stage((ConvBatchNorm.rule(), ConvTransposeBatchNorm.rule(), GemmBatchNorm.rule())),)
"""Fold inference BatchNormalization into the Conv / ConvTranspose / Gemm before it."""

rules = rule_set(STAGES)
