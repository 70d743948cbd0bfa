"""MatMul + Add and Gemm: fold a 2-D MatMul + bias into Gemm, or unfold a flattened Gemm.

* ``matmul_add_to_gemm`` (standard domain): ``Add(MatMul(a, b), c)`` with 2-D ``a`` and
  ``b`` and a bias ``c`` that broadcasts one way to the product's ``(M, N)`` — what Gemm
  allows — becomes ``Gemm(a, b, c)``.
* ``gemm_to_matmul_add`` (before the ONNX Runtime attention and normalization fusions):
  the exporter writes a ``Linear`` on a 3-D input as ``Reshape(x, [-1, K])``, ``Gemm``,
  ``Reshape`` back (GPT-2's ``Conv1D``); with dynamic batch and sequence onnxscript's own
  rule refuses it ("symbolic dimensions are not yet supported"), so this one compares the
  symbolic dims shape inference left and writes ``MatMul(x, W) + b`` on the 3-D input,
  which the attention and skip-normalization patterns expect.
"""

from __future__ import annotations

__all__ = ["STANDARD_STAGES", "UNFOLD_STAGES", "rules"]

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, pattern

from adapter.passes.fusion._engine import Stage, rule_set, same_dim

_GEMM_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16,
     ir.DataType.INT32, ir.DataType.INT64, ir.DataType.UINT32, ir.DataType.UINT64}
)  # fmt: skip


def _rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else value.shape.rank()


class MatMulAddToGemm(RewriteRuleClassBase):
    """``Add(MatMul(a, b), c)`` with 2-D operands and a Gemm-broadcastable bias to ``Gemm``."""

    def __init__(self) -> None:
        super().__init__("matmul_add_to_gemm")

    def pattern(self, op, a, b, c):
        return op.Add(op.MatMul(a, b, _outputs=["product"]), c)

    def check(self, context, a, b, c, product, **_) -> MatchResult:
        result = MatchResult()
        if _rank(a) != 2 or _rank(b) != 2:
            return result.fail("MatMul operands are not both 2-D (Gemm is 2-D only).", [a, b])
        if product.dtype not in _GEMM_TYPES:
            return result.fail(f"Gemm has no kernel type {product.dtype}.", product)
        if _rank(c) is None or _rank(c) > 2:
            return result.fail("Bias rank is unknown or above 2.", c)
        out = list(product.shape) if product.shape is not None else [None, None]
        for dim, target in zip(reversed(list(c.shape)), reversed(out)):
            if dim != 1 and not same_dim(dim, target):
                return result.fail(f"Bias dim {dim} does not broadcast to the product's {target}.", c)
        return result

    def rewrite(self, op, a, b, c, **_):
        return op.Gemm(a, b, c)


class ReshapeGemmReshapeToMatMulAdd(RewriteRuleClassBase):
    """``Reshape(Gemm(Reshape(x, [-1, K]), W, b), [..., N])`` to ``MatMul(x, W) + b``."""

    def __init__(self) -> None:
        super().__init__("gemm_to_matmul_add")

    def pattern(self, op, x, w, flat_shape, out_shape):
        flat = op.Reshape(x, flat_shape, _outputs=["flat"])
        gemm = op.Gemm(flat, w, pattern.Var("bias", can_match_none=True), _outputs=["gemm"])
        return op.Reshape(gemm, out_shape, _outputs=["out"])

    def check(self, context, x, w, flat, gemm, out, bias=None, **_) -> MatchResult:
        result = MatchResult()
        attrs = gemm.producer().attributes
        if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
            return result.fail("Gemm scales its product or bias (alpha/beta not 1).", gemm)
        if attrs.get_int("transA", 0) or attrs.get_int("transB", 0):
            return result.fail("Gemm transposes an operand.", gemm)
        rank = _rank(x)
        if rank is None or rank < 3 or _rank(flat) != 2 or _rank(w) != 2 or _rank(out) != rank:
            return result.fail("Not a rank>=3 input flattened to 2-D and restored to the same rank.", x)
        k, n = w.shape[0], w.shape[1]
        if not (same_dim(x.shape[-1], k) and same_dim(flat.shape[1], k)):
            return result.fail("Flattening does not keep the contraction dim last.", flat)
        if not (same_dim(out.shape[-1], n) and all(same_dim(a, b) for a, b in zip(x.shape[:-1], out.shape[:-1]))):
            return result.fail("The output reshape does not restore the input's leading dims.", out)
        if bias is not None and (_rank(bias) not in (0, 1) or (_rank(bias) == 1 and bias.shape[0] not in (1, n))):
            return result.fail("Bias is not a scalar or a vector over the output features.", bias)
        return result

    def rewrite(self, op, x, w, out, bias=None, **_):
        product = op.MatMul(x, w)
        # The Add's output inherits ``out``'s type and shape; the product has the same.
        product.type, product.shape = out.type, ir.Shape(out.shape)
        return product if bias is None else op.Add(product, bias)


STANDARD_STAGES = (Stage(tuple(MatMulAddToGemm.rule().commute())),)
"""Standard domain: 2-D ``MatMul`` + bias to ``Gemm`` (both operand orders of the Add)."""

UNFOLD_STAGES = (Stage((ReshapeGemmReshapeToMatMulAdd.rule(),)),)
"""Before the ONNX Runtime fusions: flattened ``Gemm`` back to ``MatMul`` + ``Add``."""

rules = rule_set(STANDARD_STAGES, UNFOLD_STAGES)
