"""Rotary position embedding for ONNX Runtime: ``com.microsoft`` ``RotaryEmbedding``.

Two steps, as in onnxscript's ``ort_fusions``: ``x * cos + rotate_half(x) * sin`` becomes
an intermediate ``RotaryEmbedding(x, cos, sin)`` (``rotary_embedding``), and the cos/sin
computation from the position ids becomes the op's position-id input and cos/sin caches
(``cos_sin_cache``). Whatever the second step does not claim is inlined back.

onnxscript's ``cos_sin_cache`` wants ``Transpose(MatMul(inv_freq[1, E, 1], pos[B, 1, S]))``;
the exporter (transformers 5, torch 2.13) writes Llama's ``LlamaRotaryEmbedding`` as a
broadcast ``Mul(Cast(Unsqueeze(pos, 2)), inv_freq[E])`` and keeps the ``attention_scaling``
multiply (``* 1.0``) on cos and sin, so this file adds ``cos_sin_cache_broadcast``: the
caches are computed at run time from the largest position id (``Range`` to
``ReduceMax(pos) + 1``, times ``inv_freq``, ``Cos``/``Sin``, times the scaling), so any
sequence length the graph allows still works.
"""

from __future__ import annotations

__all__ = ["ORT_STAGES", "rules"]

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet, pattern
from onnxscript.rewriter.ort_fusions import cos_sin_cache as ort_cos_sin_cache
from onnxscript.rewriter.ort_fusions import rotary_embedding as ort_rotary

from adapter.passes.fusion._engine import FUSION_DOMAIN, Stage, named, rule_set


def _scalar(value: ir.Value | None) -> float | None:
    if value is None or value.const_value is None or value.const_value.size != 1:
        return None
    return float(value.const_value.numpy().reshape(()))


class CosSinCacheBroadcast(RewriteRuleClassBase):
    """Cos/sin from ``Cast(Unsqueeze(pos)) * inv_freq`` (+ scaling) to a runtime cos/sin cache."""

    def __init__(self) -> None:
        # The cos/sin computation is shared by every layer's query and key rotation, so
        # matched nodes stay (unused ones are removed after the pass) and the caches are
        # built once per (inv_freq, position ids, scale).
        super().__init__("cos_sin_cache_broadcast", remove_nodes=False)
        self._caches: dict[tuple, tuple[ir.Value, ir.Value]] = {}

    def cleanup(self) -> None:
        self._caches.clear()

    def pattern(self, op, x, position_ids, inv_freq, cos_scale, sin_scale, interleaved, num_heads):
        positions = op.Cast(op.Unsqueeze(position_ids, [2]), to=ir.DataType.FLOAT)
        freqs = op.Mul(positions, inv_freq)
        emb = op.Concat(freqs, freqs, axis=-1)
        cos = pattern.OrValue([op.Mul(op.Cos(emb), cos_scale), op.Cos(emb)])
        sin = pattern.OrValue([op.Mul(op.Sin(emb), sin_scale), op.Sin(emb)])
        return op.RotaryEmbedding(
            x, op.Unsqueeze(cos, [1]), op.Unsqueeze(sin, [1]),
            interleaved=interleaved, num_heads=num_heads, _domain=FUSION_DOMAIN,
        )  # fmt: skip

    def check(self, context, x, position_ids, inv_freq, cos_scale=None, sin_scale=None, **_) -> MatchResult:
        result = MatchResult()
        if position_ids.shape is None or position_ids.shape.rank() != 2:
            return result.fail("Position ids are not [B, S].", position_ids)
        if position_ids.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
            return result.fail("Position ids are not integers.", position_ids)
        if inv_freq.const_value is None or inv_freq.shape is None or inv_freq.shape.rank() != 1:
            return result.fail("inv_freq is not a constant vector.", inv_freq)
        scales = [_scalar(s) if s is not None else 1.0 for s in (cos_scale, sin_scale)]
        if None in scales or scales[0] != scales[1]:
            return result.fail("Cos and sin are not scaled by the same constant.", [cos_scale, sin_scale])
        if x.shape is None or x.shape.rank() != 4 or x.shape[3] != 2 * inv_freq.shape[0]:
            return result.fail("Input is not [B, H, S, 2 * len(inv_freq)].", x)
        self._scale = scales[0]
        return result

    def rewrite(self, op, x, position_ids, inv_freq, interleaved, num_heads, **_):
        key = (id(inv_freq), id(position_ids), self._scale)
        if key not in self._caches:
            self._caches[key] = self._cos_sin(op, position_ids, inv_freq)
        cos_cache, sin_cache = self._caches[key]
        batch = op.Shape(x, start=0, end=1)
        seq = op.Shape(position_ids, start=1, end=2)
        positions = op.Expand(position_ids, op.Concat(batch, seq, axis=0))
        if position_ids.dtype != ir.DataType.INT64:
            positions = op.Cast(positions, to=ir.DataType.INT64)
        return op.RotaryEmbedding(
            x, positions, cos_cache, sin_cache,
            interleaved=interleaved.value, num_heads=num_heads.value, _domain="com.microsoft",
        )  # fmt: skip

    def _cos_sin(self, op, position_ids, inv_freq) -> tuple[ir.Value, ir.Value]:
        """``cos``/``sin`` of ``range(max(position_ids) + 1) x inv_freq`` (times the scale)."""
        freqs = inv_freq.const_value.numpy().astype(np.float32).reshape(1, -1)
        count = op.Add(op.ReduceMax(position_ids, keepdims=0), op.Constant(value=ir.tensor(np.array(1, np.int64))))
        steps = op.Range(
            op.Constant(value=ir.tensor(np.array(0, np.int64))),
            count,
            op.Constant(value=ir.tensor(np.array(1, np.int64))),
        )
        angles = op.MatMul(
            op.Cast(op.Unsqueeze(steps, op.Constant(value_ints=[1])), to=ir.DataType.FLOAT),
            op.Constant(value=ir.tensor(freqs)),
        )
        cos_cache, sin_cache = op.Cos(angles), op.Sin(angles)
        if self._scale != 1.0:
            scale = op.Constant(value=ir.tensor(np.array(self._scale, np.float32)))
            cos_cache, sin_cache = op.Mul(cos_cache, scale), op.Mul(sin_cache, scale)
        return cos_cache, sin_cache


ORT_STAGES = (
    Stage(named("rotary_embedding", ort_rotary.rotary_embedding_rules.rules)),
    Stage(
        (
            *named("cos_sin_cache", ort_cos_sin_cache.cos_sin_cache_rules.rules),
            *RewriteRuleSet([CosSinCacheBroadcast.rule()], commute=True).rules,
        )
    ),
    Stage(named("partial_rotary_embedding", ort_rotary.partial_embedding_rules.rules)),
)
"""ONNX Runtime: rotary pattern, then its cos/sin caches; partial-dim rotary last."""

rules = rule_set(ORT_STAGES)
