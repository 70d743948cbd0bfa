"""Attention for ONNX Runtime: eager attention to ``com.microsoft`` MultiHeadAttention / Attention.

The chain is onnxscript's (``onnxscript.rewriter.ort_fusions``): scaled dot-product
attention (``MatMul``, scale, mask ``Add``, ``Softmax``, ``MatMul``) becomes an intermediate
``SDPA``; with the head split/merge ``Reshape``/``Transpose`` around it, ``MultiHeadAttention``;
the query scale and the Q/K/V biases fold into it; three projections of one input turn it
into ``Attention``. What this file adds, because the stock rules miss the zoo's models:

* ``mask_add_reassociation``: T5 adds the position bias and then the mask to the scores
  (``(s + bias) + mask``); SDPA expects one mask ``Add``, so it becomes ``s + (bias + mask)``.
* ``mha`` (checked): the stock MultiHeadAttention rule does not verify the output
  ``Reshape`` (its TODO); after two reshapes merge (GPT-2's ``[B,S,D]`` then ``[-1,D]``)
  it fuses a 2-D reshape into a 3-D op and ONNX Runtime then fails in the next Gemm.
  This version checks every head split/merge reshape against ``[B,S,H,Dh]``/``[B,S,H*Dh]``.
* ``attention_packed_qkv``: GPT-2 projects Q, K and V with one ``Conv1D`` and a ``Split``;
  the stock Attention rule knows three MatMuls or ``Slice``s only.
* ``sdpa`` is extracted as a function (``as_function``) so that attention no later rule
  claims is inlined back instead of staying an op no runtime knows.
"""

from __future__ import annotations

__all__ = ["ORT_STAGES", "OV_STAGES", "StandardAttention", "drop_equal_qkv_sizes", "rules"]

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, pattern
from onnxscript.rewriter.ort_fusions import attention as ort_attention
from onnxscript.rewriter.ort_fusions import mha as ort_mha
from onnxscript.rewriter.ort_fusions import mha_bias as ort_mha_bias
from onnxscript.rewriter.ort_fusions import mha_scale as ort_mha_scale
from onnxscript.rewriter.ort_fusions import sdpa as ort_sdpa
from onnxscript.rewriter.ort_fusions import sdpa_via_mha as ort_sdpa_via_mha

from adapter.passes.fusion._engine import FUSION_DOMAIN, Stage, dims, named, rule_set, same_dim


class MaskAddReassociation(RewriteRuleClassBase):
    """``Softmax((scores + bias) + mask)`` to ``Softmax(scores + (bias + mask))``."""

    def __init__(self) -> None:
        super().__init__("mask_add_reassociation")

    def pattern(self, op, scores, bias, mask):
        return op.Add(op.Add(scores, bias), mask, _outputs=["masked"])

    def check(self, context, scores, bias, mask, masked, **_) -> MatchResult:
        result = MatchResult()
        producer = scores.producer()
        if producer is None or producer.op_type not in ("MatMul", "Mul", "Div") or producer.domain != "":
            return result.fail("Scores are not a (scaled) MatMul.", scores)
        if producer.op_type != "MatMul":
            inner = producer.inputs[0].producer() if producer.inputs[0] is not None else None
            if inner is None or inner.op_type != "MatMul":
                return result.fail("Scores are not a scaled MatMul.", scores)
        uses = list(masked.uses())
        if len(uses) != 1 or uses[0][0].op_type != "Softmax":
            return result.fail("The masked scores do not feed one Softmax.", masked)
        for term in (bias, mask):
            if dims(term) is None or len(dims(term)) != 4 or term.producer() is producer:
                return result.fail("Bias and mask must be separate rank-4 terms.", term)
        return result

    def rewrite(self, op, scores, bias, mask, **_):
        return op.Add(scores, op.Add(bias, mask))


class _FunctionSDPA(ort_sdpa.SDPA):
    """onnxscript's SDPA rule, extracting the matched nodes as a function for inlining back."""

    def __init__(self) -> None:
        super().__init__("sdpa", as_function=True)


class CheckedMultiHeadAttention(ort_mha.MultiHeadAttention):
    """onnxscript's MultiHeadAttention rule, plus checks of the head split/merge reshapes."""

    def check(self, op, query_BSD, key, value, sdpa_output, **bindings) -> MatchResult:
        result = super().check(op, query_BSD, key, value, sdpa_output, **bindings)
        if not result:
            return result
        q, q4, out = dims(query_BSD), dims(bindings.get("query_BSHDh")), dims(bindings.get("attention_reshaped"))
        if q is None or q4 is None or out is None or len(out) != 3:
            return result.fail(
                "Attention output is not reshaped back to 3-D [B, S, D].", bindings.get("attention_reshaped")
            )
        heads, head_size = q4[2], q4[3]
        if not (isinstance(heads, int) and isinstance(head_size, int)):
            return result.fail("Head count or head size is not static.", bindings.get("query_BSHDh"))
        if not (same_dim(out[0], q[0]) and same_dim(out[1], q[1]) and out[2] == heads * head_size):
            return result.fail(
                f"Output reshape {out} is not [B, S, {heads * head_size}].", bindings.get("attention_reshaped")
            )
        if not (isinstance(q[2], int) and q[2] == heads * head_size):
            return result.fail("Query hidden size is not heads x head size.", query_BSD)
        for name in ("key_BSHDh", "value_BSHDh"):
            split = dims(bindings.get(name))
            if split is not None and (len(split) != 4 or split[2] != heads):
                return result.fail(f"{name} does not split into {heads} heads.", bindings.get(name))
        return result


class PackedQkvAttention(RewriteRuleClassBase):
    """``MultiHeadAttention(Split(x @ W + b))`` (one packed Q/K/V projection) to ``Attention``."""

    def __init__(self) -> None:
        super().__init__("attention_packed_qkv")

    def pattern(self, op, x, w, b, num_heads):
        projected = op.MatMul(x, w, _outputs=["product"])
        projected = pattern.OrValue([op.Add(projected, b), projected], tag_var="has_bias", tag_values=[True, False])
        q, k, v = op.Split(projected, _allow_other_inputs=True, _outputs=["q", "k", "v"])
        return op.MultiHeadAttention(
            q, k, v, None, None,
            pattern.Var("mask", can_match_none=True), None, None,
            num_heads=num_heads,
            scale=pattern.AttrVar("scale", can_match_none=True),
            _domain="com.microsoft",
            _outputs=["mha_output"],
        )  # fmt: skip

    def check(self, context, x, w, q, k, v, product, has_bias, b=None, **_) -> MatchResult:
        result = MatchResult()
        xs, ws, ps = dims(x), dims(w), dims(product)
        if xs is None or len(xs) != 3 or ws is None or len(ws) != 2 or ps is None or len(ps) != 3:
            return result.fail("Not a [B, S, D] input projected by a 2-D weight.", x)
        if w.const_value is None:
            return result.fail("The packed Q/K/V weight is not a constant.", w)
        split = q.producer()
        axis = split.attributes.get_int("axis", 0)
        if axis not in (2, -1):
            return result.fail("Split is not along the hidden dim.", q)
        sizes = [dims(t)[-1] if dims(t) else None for t in (q, k, v)]
        if not all(isinstance(s, int) for s in sizes) or sum(sizes) != ws[1] or sizes[0] != sizes[1]:
            return result.fail(f"Split sizes {sizes} do not cover the {ws[1]} projected features.", q)
        if has_bias and (b is None or b.const_value is None or dims(b) != [ws[1]]):
            return result.fail("The packed bias is not a constant vector over the projected features.", b)
        self._sizes = sizes
        return result

    def rewrite(self, op, x, w, num_heads, mha_output, has_bias, b=None, mask=None, **_):
        if not has_bias:
            b = op.initializer(ir.tensor(np.zeros(sum(self._sizes), dtype=w.dtype.numpy())), name=f"{w.name}_zero_bias")
        scale = mha_output.producer().attributes.get_float("scale", None)
        return op.Attention(
            x, w, b, None, None, mask,
            num_heads=num_heads,
            qkv_hidden_sizes=self._sizes,
            scale=scale,
            _domain="com.microsoft",
        )  # fmt: skip


def _mha_rules() -> list:
    variants = [
        dict(is_rotary=rotary, has_past_present=past, is_cross_attention=cross)
        for past in (True, False)
        for rotary in (False, True)
        for cross in ((False,) if past else (False, True))
    ]
    return [CheckedMultiHeadAttention.rule("mha", **params) for params in variants]


class StandardAttention(RewriteRuleClassBase):
    """The intermediate ``SDPA`` to ONNX's own ``Attention`` (opset 23) for OpenVINO.

    OpenVINO's ONNX frontend reads ``Attention`` as its ``ScaledDotProductAttention``. The
    query gets a static head count (a ``Reshape`` to ``[B, H, S, D]``: rotary leaves it
    dynamic). Keys and values stay as the exporter repeats them for grouped-query attention
    (Unsqueeze/Expand/Reshape after the cache's Concat): that is the form OpenVINO's CPU
    plugin fuses with the stateful cache; ``Attention``'s own KV-head broadcast (a Tile) is
    not (measured, OpenVINO 2026.4).
    """

    def __init__(self) -> None:
        super().__init__("sdpa_to_onnx_attention")

    def pattern(self, op, query, key, value, mask):
        return op.SDPA(query, key, value, mask, _domain=FUSION_DOMAIN, _outputs=["attention"])

    def check(self, context, query, key, value, mask, attention, **_) -> MatchResult:
        result = MatchResult()
        if attention.producer().attributes.get_string("key_format", "BHSd") != "BHSd":
            return result.fail("Key is not [B, H, S, D].", key)
        shape = dims(key)
        if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])):
            return result.fail("Head count or head size is not static.", key)
        return result

    def rewrite(self, op, query, key, value, mask, attention, **_):
        scale = attention.producer().attributes.get_float("scale", None)
        _, heads, _, size = dims(key)
        shape = op.Constant(value=ir.tensor(np.array([0, heads, -1, size], np.int64)))
        extra = {} if scale is None else {"scale": scale}
        return op.Attention(op.Reshape(query, shape), key, value, mask, **extra)


_SDPA = _FunctionSDPA.rule()

ORT_STAGES = (
    Stage((MaskAddReassociation.rule(),), shape_inference=True),
    Stage((_SDPA,)),
    Stage(tuple(_mha_rules())),
    Stage(named("mha_scale", ort_mha_scale._mha_scale_rules.rules)),
    Stage(named("mha_bias", ort_mha_bias.mha_bias_rules.rules)),
    Stage((*named("attention", ort_attention.attention_rules.rules), PackedQkvAttention.rule())),
    Stage(named("sdpa_via_mha", ort_sdpa_via_mha._rules.rules)),
)
"""The ONNX Runtime attention chain, in order (``sdpa_via_mha`` takes SDPA left unclaimed)."""

OV_STAGES = (Stage((_SDPA,)), Stage((StandardAttention.rule(),)))
"""OpenVINO's: eager attention to ONNX ``Attention`` (its ScaledDotProductAttention)."""

rules = rule_set(ORT_STAGES, OV_STAGES)


def drop_equal_qkv_sizes(model: ir.Model) -> int:
    """Remove ``qkv_hidden_sizes`` from ``Attention`` nodes where Q, K and V are equal.

    Equal sizes are the op's default, so the graph means the same; ONNX Runtime's dynamic
    quantizer refuses to turn an Attention carrying the attribute into ``QAttention``.
    Returns how many nodes changed.
    """
    changed = 0
    for node in model.graph.all_nodes():
        if node.domain == "com.microsoft" and node.op_type == "Attention" and "qkv_hidden_sizes" in node.attributes:
            sizes = node.attributes["qkv_hidden_sizes"].as_ints()
            if len(set(sizes)) == 1:
                del node.attributes["qkv_hidden_sizes"]
                changed += 1
    return changed
