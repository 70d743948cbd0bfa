"""GELU: decomposed GELU to one op; for ONNX Runtime, its bias ``Add`` folded in too.

A decomposed GELU is ``0.5 * x * (1 + erf(x / sqrt(2)))`` or, approximated,
``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))``. onnxscript's rules match
one association and operand order each (constants first, ``x * (0.5 * (1 + t))``); the
exporter writes GPT-2's ``NewGELUActivation`` as ``(x * 0.5) * (t + 1)`` with constants
last, which they miss. The rules here cover the three associations in every operand order.

* ``gelu`` (standard domain, opset 20+): ONNX ``Gelu`` (``approximate="tanh"`` for the
  tanh form).
* ``gelu`` (ONNX Runtime): ``com.microsoft`` ``Gelu`` / ``FastGelu``; then
  ``gelu_tanh_to_fast_gelu`` (ONNX ``Gelu(approximate="tanh")`` to ``FastGelu``),
  onnxscript's ``bias_gelu`` (``Gelu(x + b)`` to ``BiasGelu``) and ``fast_gelu_bias``
  (``FastGelu(x + b)`` to ``FastGelu(x, b)``).
"""

from __future__ import annotations

__all__ = ["ORT_STAGES", "STANDARD_STAGES", "rules"]

import math

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet
from onnxscript.rewriter.ort_fusions import bias_gelu as ort_bias_gelu

from adapter.passes.fusion._engine import Stage, named, onnx_opset, rule_set

_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
_FORMS = ("half_x", "half_sum", "half_last")


class GeluFusion(RewriteRuleClassBase):
    """A decomposed GELU (one association of the products) to one GELU op.

    Args:
        approximate: ``"none"`` (erf) or ``"tanh"``.
        form: ``"half_x"`` ``(x * 0.5) * (1 + t)``, ``"half_sum"`` ``x * ((1 + t) * 0.5)``
            or ``"half_last"`` ``(x * (1 + t)) * 0.5``.
        divide: For erf, whether ``x / sqrt(2)`` is a ``Div`` (else ``Mul`` by ``1/sqrt(2)``).
        target: ``"onnx"`` (ONNX ``Gelu``) or ``"ort"`` (``com.microsoft`` Gelu / FastGelu).
    """

    def __init__(self, *, approximate: str, form: str, divide: bool = True, target: str) -> None:
        super().__init__("gelu")
        self._approximate, self._form, self._divide, self._target = approximate, form, divide, target

    def _core(self, op, x):
        if self._approximate == "tanh":
            cubic = op.Add(x, op.Mul(op.Pow(x, 3.0), 0.044715))
            return op.Tanh(op.Mul(cubic, math.sqrt(2.0 / math.pi)))
        scaled = op.Div(x, math.sqrt(2.0)) if self._divide else op.Mul(x, 1.0 / math.sqrt(2.0))
        return op.Erf(scaled)

    def pattern(self, op, x):
        one_plus = op.Add(self._core(op, x), 1.0)
        if self._form == "half_x":
            return op.Mul(op.Mul(x, 0.5), one_plus)
        if self._form == "half_sum":
            return op.Mul(x, op.Mul(one_plus, 0.5))
        return op.Mul(op.Mul(x, one_plus), 0.5)

    def check(self, context, x, **_) -> MatchResult:
        result = MatchResult()
        if x.dtype not in _FLOATS:
            return result.fail(f"GELU input type {x.dtype} is not floating point.", x)
        if self._target == "onnx" and onnx_opset(context.model) < 20:
            return result.fail("ONNX Gelu needs opset 20 or later.", x)
        return result

    def rewrite(self, op, x, **_):
        if self._target == "onnx":
            return op.Gelu(x, approximate="tanh") if self._approximate == "tanh" else op.Gelu(x)
        if self._approximate == "tanh":
            return op.FastGelu(x, _domain="com.microsoft")
        return op.Gelu(x, _domain="com.microsoft")


class GeluTanhToFastGelu(RewriteRuleClassBase):
    """ONNX ``Gelu(x, approximate="tanh")`` to ``com.microsoft`` ``FastGelu`` (the same function)."""

    def __init__(self) -> None:
        super().__init__("gelu_tanh_to_fast_gelu")

    def pattern(self, op, x):
        return op.Gelu(x, approximate="tanh")

    def check(self, context, x, **_) -> MatchResult:
        result = MatchResult()
        if x.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            return result.fail("FastGelu takes float, float16 or bfloat16 only.", x)
        return result

    def rewrite(self, op, x, **_):
        return op.FastGelu(x, _domain="com.microsoft")


class FastGeluBias(RewriteRuleClassBase):
    """``FastGelu(x + b)`` with a constant ``[D]`` bias to ``FastGelu(x, b)``."""

    def __init__(self) -> None:
        super().__init__("fast_gelu_bias")

    def pattern(self, op, x, b):
        return op.FastGelu(op.Add(x, b), _domain="com.microsoft")

    def check(self, context, x, b, **_) -> MatchResult:
        result = MatchResult()
        if b.const_value is None or b.shape is None or b.shape.rank() != 1:
            return result.fail("Bias is not a constant vector.", b)
        if x.shape is None or x.shape.rank() < 1 or x.shape[-1] != b.shape[0]:
            return result.fail("Bias length is not the input's last dim.", b)
        return result

    def rewrite(self, op, x, b, **_):
        return op.FastGelu(x, b, _domain="com.microsoft")


def _variants(target: str) -> list:
    """Every decomposed-GELU rule for ``target``, in every operand order (shared name ``gelu``)."""
    bases = [GeluFusion.rule(approximate="tanh", form=form, target=target) for form in _FORMS]
    bases += [
        GeluFusion.rule(approximate="none", form=form, divide=divide, target=target)
        for form in _FORMS
        for divide in (True, False)
    ]
    return list(RewriteRuleSet(bases, commute=True).rules)


STANDARD_STAGES = (Stage(tuple(_variants("onnx"))),)
"""Decomposed GELU to ONNX ``Gelu`` (opset 20 and later)."""

ORT_STAGES = (
    Stage(tuple(_variants("ort"))),
    Stage((GeluTanhToFastGelu.rule(),)),
    Stage(named("bias_gelu", ort_bias_gelu.bias_gelu_rules.rules)),
    Stage(tuple(FastGeluBias.rule().commute())),
)
"""ONNX Runtime: decomposed GELU to Gelu / FastGelu, then their bias ``Add`` folded in."""

rules = rule_set(STANDARD_STAGES, ORT_STAGES)
