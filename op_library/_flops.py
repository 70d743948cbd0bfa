"""FLOPs formulas shared by the op tables.

Convention: one multiply-add is 2 FLOPs (as ``torch.utils.flop_counter`` counts matmuls
and convolutions); an elementwise op costs a fixed number of FLOPs per output element
(arithmetic 1, a transcendental such as exp/erf/tanh 4); ops that only move or
reinterpret data (Reshape, Transpose, Gather, Cast, ...) cost 0 FLOPs and are
accounted for by their bytes. Every function takes the resolved input and output
tensors (``None`` when absent or unknown) and the node's attributes.
"""

from __future__ import annotations

__all__ = [
    "TRANSCENDENTAL",
    "zero",
    "per_output",
    "per_input",
    "matmul",
    "gemm",
    "conv",
    "pool",
    "softmax",
    "attention",
    "multi_head_attention",
    "matmul_nbits",
]

import math
from collections.abc import Callable, Mapping
from typing import Any

from adapter.op_library._schema import Tensor

TRANSCENDENTAL = 4
"""FLOPs charged per element for exp, log, erf, tanh, sin, cos, sigmoid."""

Formula = Callable[[list[Tensor | None], list[Tensor | None], Mapping[str, Any]], int]


def _first(tensors: list[Tensor | None]) -> Tensor | None:
    return next((t for t in tensors if t is not None), None)


def _broadcast(tensors: list[Tensor | None]) -> int:
    shapes = [t.shape for t in tensors if t is not None]
    if not shapes:
        return 0
    rank = max(len(s) for s in shapes)
    dims = [1] * rank
    for shape in shapes:
        for i, d in enumerate(shape, rank - len(shape)):
            dims[i] = max(dims[i], d)
    return math.prod(dims)


def _out_elements(ins: list[Tensor | None], outs: list[Tensor | None]) -> int:
    out = outs[0] if outs else None
    return out.numel if out is not None else _broadcast(ins)


def zero(ins, outs, attrs) -> int:
    """Data movement: no arithmetic."""
    return 0


def per_output(cost: int) -> Formula:
    """``cost`` FLOPs per element of the first output (broadcast of the inputs if unknown)."""

    def flops(ins, outs, attrs) -> int:
        return cost * _out_elements(ins, outs)

    flops.__name__ = f"per_output_{cost}"
    return flops


def per_input(cost: int) -> Formula:
    """``cost`` FLOPs per element of the first input (reductions, quantizers)."""

    def flops(ins, outs, attrs) -> int:
        first = ins[0] if ins else None
        return cost * (first.numel if first is not None else 0)

    flops.__name__ = f"per_input_{cost}"
    return flops


def matmul(ins, outs, attrs) -> int:
    """2·M·N·K over the broadcast batch: 2 × output elements × K."""
    a = ins[0]
    if a is None:
        return 0
    k = a.shape[-1] if a.shape else 1
    b = ins[1] if len(ins) > 1 else None
    if outs and outs[0] is not None:
        out_elements = outs[0].numel
    elif b is not None:
        batch = _broadcast([Tensor(a.shape[:-2] or (1,)), Tensor(b.shape[:-2] or (1,))])
        m = a.shape[-2] if len(a.shape) > 1 else 1
        n = b.shape[-1] if len(b.shape) > 1 else 1
        out_elements = batch * m * n
    else:
        return 0
    return 2 * out_elements * k


def gemm(ins, outs, attrs) -> int:
    """2·M·N·K, plus M·N for the bias C when present (alpha/beta scaling not counted)."""
    a = ins[0]
    if a is None:
        return 0
    k = a.shape[0] if attrs.get("transA", 0) else a.shape[-1]
    b = ins[1]
    if outs and outs[0] is not None:
        mn = outs[0].numel
    elif b is not None:
        m = a.shape[-1] if attrs.get("transA", 0) else a.shape[0]
        n = b.shape[0] if attrs.get("transB", 0) else b.shape[-1]
        mn = m * n
    else:
        return 0
    bias = mn if len(ins) > 2 and ins[2] is not None else 0
    return 2 * mn * k + bias


def conv(ins, outs, attrs) -> int:
    """2 × output elements × (C_in / group) × kernel elements, plus one add per output for a bias."""
    out = outs[0] if outs else None
    w = ins[1] if len(ins) > 1 else None
    if out is None or w is None:
        return 0
    per_output_macs = math.prod(w.shape[1:])  # (C_in / group) × kH × kW
    bias = out.numel if len(ins) > 2 and ins[2] is not None else 0
    return 2 * out.numel * per_output_macs + bias


def pool(ins, outs, attrs) -> int:
    """One FLOP per window element per output (max or add)."""
    out = outs[0] if outs else None
    if out is None:
        return 0
    return out.numel * math.prod(attrs.get("kernel_shape", (1,)))


def softmax(ins, outs, attrs) -> int:
    """Per element: max, subtract, exp, sum, divide (exp counted as 4): 8."""
    return (4 + TRANSCENDENTAL) * _out_elements(ins, outs)


def _score_flops(batch: int, heads: int, q_len: int, kv_len: int, head_qk: int, head_v: int) -> int:
    """Q·Kᵀ and P·V matmuls plus the softmax over the scores."""
    scores = batch * heads * q_len * kv_len
    return 2 * scores * head_qk + 2 * scores * head_v + (4 + TRANSCENDENTAL) * scores


def attention(ins, outs, attrs) -> int:
    """com.microsoft Attention: input·W_qkv (+bias), then QKᵀ, softmax, PV; no output projection."""
    x, w = ins[0], ins[1] if len(ins) > 1 else None
    if x is None or w is None:
        return 0
    batch, seq, hidden_in = x.shape[0], x.shape[1], x.shape[-1]
    qkv = w.shape[-1]
    sizes = attrs.get("qkv_hidden_sizes") or (qkv // 3, qkv // 3, qkv - 2 * (qkv // 3))
    heads = int(attrs.get("num_heads", 1))
    projection = 2 * batch * seq * hidden_in * qkv + (batch * seq * qkv if len(ins) > 2 and ins[2] is not None else 0)
    past = ins[4] if len(ins) > 4 and ins[4] is not None else None
    kv_len = seq + (past.shape[3] if past is not None and len(past.shape) > 3 else 0)
    return projection + _score_flops(batch, heads, seq, kv_len, sizes[0] // heads, sizes[2] // heads)


def multi_head_attention(ins, outs, attrs) -> int:
    """com.microsoft MultiHeadAttention on projected Q/K/V: QKᵀ, softmax, PV (+ bias adds)."""
    q = ins[0]
    k = ins[1] if len(ins) > 1 else None
    v = ins[2] if len(ins) > 2 else None
    if q is None:
        return 0
    heads = int(attrs.get("num_heads", 1))
    batch, q_len = q.shape[0], q.shape[1]
    if len(q.shape) == 5:  # packed QKV: (B, S, N, 3, H)
        head = q.shape[-1]
        return _score_flops(batch, heads, q_len, q_len, head, head)
    hidden_q = q.shape[2]
    if k is None:
        return 0
    if len(k.shape) == 4:  # (B, N, L, H)
        kv_len, head_qk = k.shape[2], k.shape[3]
    else:
        kv_len, head_qk = k.shape[1], k.shape[2] // heads
    head_v = head_qk
    if v is not None:
        head_v = v.shape[3] if len(v.shape) == 4 else v.shape[2] // heads
    bias = ins[3] if len(ins) > 3 and ins[3] is not None else None
    return _score_flops(batch, heads, q_len, kv_len, head_qk, head_v) + (batch * q_len * hidden_q * 3 if bias else 0)


def matmul_nbits(ins, outs, attrs) -> int:
    """2·M·N·K from the attributes K and N (the weight is packed), plus 2 per weight to dequantize."""
    a = ins[0]
    if a is None:
        return 0
    k, n = int(attrs.get("K", a.shape[-1])), int(attrs.get("N", 0))
    rows = math.prod(a.shape[:-1])
    return 2 * rows * n * k + 2 * n * k
