"""Normalization: LayerNormalization, RMSNorm, and their residual-add (skip) forms.

Standard domain (any backend): a decomposed layer norm (``ReduceMean``, ``Sub``, ``Pow``,
``ReduceMean``, ``Add`` epsilon, ``Sqrt``, ``Div``, ``Mul``, ``Add``) becomes
``LayerNormalization`` (onnxscript's rule, here with the reductions' ``keepdims``/axes
checked rather than spelled in the pattern, so a default-``keepdims`` graph matches too);
at opset 23 and later a decomposed RMSNorm becomes ``RMSNormalization``. Both are matched
in either operand order.

ONNX Runtime adds, from onnxscript's ``ort_fusions``: RMSNorm to
``SimplifiedLayerNormalization``, and the residual ``Add`` (+ bias) before a norm into
``com.microsoft`` ``SkipLayerNormalization`` / ``SkipSimplifiedLayerNormalization``. This
file adds ``skip_layer_norm_broadcast``: the stock rule wants both addends ``[B, S, D]``,
but the embedding sum before the first norm (token ``[B, S, D]`` + position ``[1, S, D]``
in BERT and GPT-2) broadcasts; ONNX Runtime's SkipLayerNormalization takes a ``[1, S, D]``
or ``[S, D]`` skip, so that one fuses too.
"""

from __future__ import annotations

__all__ = ["ORT_STAGES", "ORT_SKIP_STAGES", "STANDARD_STAGES", "RMS_STANDARD_STAGES", "rules"]

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet, pattern
from onnxscript.rewriter.ort_fusions import rms_normalization as ort_rms
from onnxscript.rewriter.ort_fusions import skip_normalization as ort_skip
from onnxscript.rewriter.rules.fusion import _layer_norm, _rms_normalization

from adapter.passes.fusion._engine import Stage, dims, named, rule_set, same_dim


def _last_axis(axes: ir.Value | None, rank: int | None) -> bool:
    values = None if axes is None or axes.const_value is None else axes.const_value.numpy().reshape(-1).tolist()
    return values == [-1] or (rank is not None and values == [rank - 1])


class DecomposedLayerNorm(_layer_norm.LayerNormFusion):
    """onnxscript's layer-norm rule with the reductions' attributes checked, not spelled.

    The stock pattern spells ``keepdims=1`` and ``axes=[-1]``, so it misses graphs that
    leave ``keepdims`` at its default (1) or name the last axis by its index.
    """

    def __init__(self) -> None:
        super().__init__("layer_norm")

    def pattern(self, op, x, scale, epsilon, mean_axes, var_axes):
        mean = op.ReduceMean(x, mean_axes, _outputs=["mean"])
        deviation = op.Sub(x, mean)
        squared = pattern.OrValue([op.Mul(deviation, deviation), op.Pow(deviation, 2)])
        variance = op.ReduceMean(squared, var_axes, _outputs=["variance"])
        std_dev = op.Sqrt(op.Add(variance, epsilon))
        normalized = pattern.OrValue([op.Mul(deviation, op.Reciprocal(std_dev)), op.Div(deviation, std_dev)])
        return op.Mul(normalized, scale)

    def check(self, context, x, epsilon, mean, variance, mean_axes, var_axes, **_) -> MatchResult:
        result = MatchResult()
        rank = None if x.shape is None else x.shape.rank()
        for reduced, axes in ((mean, mean_axes), (variance, var_axes)):
            attributes = reduced.producer().attributes
            if attributes.get_int("keepdims", 1) != 1:
                return result.fail("A reduction drops the reduced axis (keepdims=0).", reduced)
            if not _last_axis(axes, rank):
                return result.fail("A reduction is not over the last axis only.", axes)
        return super().check(context, x, epsilon)


class SkipLayerNormBroadcast(RewriteRuleClassBase):
    """``LayerNormalization(x + skip)`` with ``skip`` ``[1, S, D]`` or ``[S, D]`` to SkipLayerNormalization."""

    def __init__(self) -> None:
        super().__init__("skip_layer_norm_broadcast")

    def pattern(self, op, a, b, gamma, beta):
        total = op.Add(a, b, _outputs=["skip_sum"])
        normalized = op.LayerNormalization(total, gamma, beta, _outputs=["layer_norm"])
        return normalized, total

    def check(self, context, a, b, gamma, beta, layer_norm, **_) -> MatchResult:
        result = MatchResult()
        node = layer_norm.producer()
        da, db = dims(a), dims(b)
        if da is None or db is None:
            return result.fail("Addend shapes are unknown.", [a, b])
        swap = len(db) > len(da) or (len(da) == len(db) == 3 and da[0] == 1 and db[0] != 1)
        full, skip = (b, a) if swap else (a, b)
        fs, ss = dims(full), dims(skip)
        if len(fs) != 3 or not isinstance(fs[2], int):
            return result.fail("Input is not [B, S, D] with a static D.", full)
        if node.attributes.get_int("axis", -1) not in (-1, 2):
            return result.fail("LayerNormalization does not normalize the last axis.", layer_norm)
        if node.attributes.get_int("stash_type", 1) != 1:
            return result.fail("LayerNormalization computes in a type other than float.", layer_norm)
        if len(ss) == 3 and ss[0] == 1 and same_dim(ss[1], fs[1]) and ss[2] == fs[2]:
            pass
        elif len(ss) == 2 and same_dim(ss[0], fs[1]) and ss[1] == fs[2]:
            pass
        else:
            return result.fail(f"Skip shape {ss} is not [1, S, D] or [S, D] against {fs}.", skip)
        if dims(gamma) != [fs[2]] or dims(beta) != [fs[2]]:
            return result.fail("Scale or bias is not a [D] vector.", [gamma, beta])
        self._operands = (full, skip)
        return result

    def rewrite(self, op, gamma, beta, layer_norm, **_):
        full, skip = self._operands
        self._operands = None  # the rule outlives the graph: hold none of its values
        epsilon = layer_norm.producer().attributes.get_float("epsilon", 1e-5)
        normalized, _mean, _inv_std, total = op.SkipLayerNormalization(
            full, skip, gamma, beta, epsilon=epsilon, _outputs=4, _domain="com.microsoft"
        )
        return normalized, total


class UnfuseLoneRmsNorm(RewriteRuleClassBase):
    """A ``SimplifiedLayerNormalization`` no skip rule consumed, back to standard ops.

    ONNX Runtime registers that op in the standard domain, where ONNX's checker has no
    schema for it before opset 23's ``RMSNormalization``: an artifact keeping it is not
    valid ONNX. Only the skip forms (``com.microsoft``) stay fused.
    """

    def __init__(self) -> None:
        super().__init__("rms_norm_unfused")

    def pattern(self, op, x, scale):
        return op.SimplifiedLayerNormalization(x, scale, _outputs=["normalized"])

    def check(self, context, x, scale, normalized, **_) -> MatchResult:
        result = MatchResult()
        node = normalized.producer()
        if node.domain not in ("", "ai.onnx") or len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
            return result.fail("Not the standard-domain op, or its extra outputs are used.", normalized)
        if node.attributes.get_int("axis", -1) != -1 or node.attributes.get_int("stash_type", 1) != 1:
            return result.fail("Normalizes an axis other than the last, or not in float.", normalized)
        return result

    def rewrite(self, op, x, scale, normalized, **_):
        epsilon = normalized.producer().attributes.get_float("epsilon", 1e-5)
        axes = op.Constant(value=ir.tensor([-1], dtype=ir.DataType.INT64))
        mean_square = op.ReduceMean(op.Mul(x, x), axes, keepdims=1)
        eps = op.Constant(value=ir.tensor(epsilon, dtype=x.dtype or ir.DataType.FLOAT))
        return op.Mul(op.Div(x, op.Sqrt(op.Add(mean_square, eps))), scale)


STANDARD_STAGES = (
    Stage(tuple(RewriteRuleSet([DecomposedLayerNorm.rule()], commute=True).rules)),
    Stage(named("layer_norm_bias", RewriteRuleSet([_layer_norm._layer_norm_with_bias_rule], commute=True).rules)),
)
"""Decomposed layer norm to ``LayerNormalization`` (then its trailing bias ``Add`` into it)."""

RMS_STANDARD_STAGES = (Stage(named("rms_norm", _rms_normalization.rms_normalization_ruleset.rules)),)
"""Decomposed RMSNorm to ``RMSNormalization`` (opset 23 and later only)."""

ORT_STAGES = (
    *STANDARD_STAGES,
    Stage(named("rms_norm", ort_rms.rms_normalization_ruleset.rules)),
    Stage(named("skip_rms_norm", ort_skip.skip_rms_normalization_ruleset.rules)),
    Stage((UnfuseLoneRmsNorm.rule(),)),
)
"""ONNX Runtime: layer norm, RMSNorm to SimplifiedLayerNormalization and its skip form;
an RMSNorm left without a skip is written back in standard ops (see UnfuseLoneRmsNorm).

The residual ``Add`` before a ``LayerNormalization`` is *not* fused here (see
``ORT_SKIP_STAGES``): ONNX Runtime 1.32's CPU ``SkipLayerNormalization`` kernel is slower
than the ``Add`` and ``LayerNormalization`` it replaces -- measured on this project's
x86-64 AVX2 host, 2 threads, one-node sessions: 163 vs 44 us at [128, 384], 1245 vs
172 us at [1024, 384], 320 vs 115 us at [128, 768]; ``python benchmarks/ort_kernels.py``
measures it again (1.5-4.9x slower across its shapes in another run, 4.5-12x under load).
RMSNorm keeps its skip form: an unfused ``SimplifiedLayerNormalization`` is not valid
ONNX before opset 23, and the decomposed form is five kernels."""

ORT_SKIP_STAGES = (
    Stage((*named("skip_layer_norm", ort_skip.skip_layer_normalization_ruleset.rules), SkipLayerNormBroadcast.rule())),
)
"""The residual ``Add`` (+ bias) before a layer norm to ``SkipLayerNormalization``: for
ONNX Runtime providers whose fused kernel wins (not the CPU provider, see ``ORT_STAGES``)."""

rules = rule_set(STANDARD_STAGES, RMS_STANDARD_STAGES, ORT_STAGES, ORT_SKIP_STAGES)
