"""Fused attention (flash-style, one pass with an online softmax) with an additive mask,
causal masking over a KV cache, and grouped-query attention, for prefill and decode alike.

q: (batch, q_heads, m, d); k, v: (batch, kv_heads, n, d) with ``n = past + m``; mask:
additive (batch, 1, m, n) or none. One program per (``BLOCK_M`` packed query rows, batch x
KV head): the rows of a tile are the (query head of the group, query position) pairs of one
KV head, so the group's query heads share each K/V tile. A decode step (m = 1) with 8 query
heads per KV head fills 8 rows of a tile and reads K/V once, not 8 times. ``BLOCK_N`` keys
per inner step. Where that leaves few programs (decode: one tile of rows per KV head), the
keys are split ``SPLIT`` ways (flash-decoding): each split writes its normalized output and
log-sum-exp, and ``_combine`` weighs them. The tile sizes set how often K/V are read again (once per tile of rows) and
how much shared memory and registers a program holds: what the tile model weighs.
"""

from __future__ import annotations

__all__ = ["ATTENTION"]

from collections.abc import Mapping

import numpy as np
import triton
import triton.language as tl

from adapter.kernels.spec import Config, Kernel, Work, next_pow2


@triton.jit
def _attention(q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, lse_ptr, scale, m_len, n_len, kv_heads, group, past, chunk,
               HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):  # fmt: skip
    bh = tl.program_id(1)
    part = tl.program_id(2)
    b = bh // kv_heads
    hk = bh % kv_heads
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # packed: row = member * m_len + position
    member = rows // m_len
    i = rows % m_len
    live = rows < group * m_len
    hq = hk * group + member
    d = tl.arange(0, BLOCK_D)
    dims = d < D
    q_rows = ((b * kv_heads * group + hq).to(tl.int64) * m_len + i) * D
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=live[:, None] & dims[None, :], other=0.0)
    kv_base = (b * kv_heads + hk).to(tl.int64) * n_len * D
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(part * chunk, tl.minimum(n_len, part * chunk + chunk), BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        keys = cols < n_len
        kt = tl.load(k_ptr + kv_base + cols[None, :] * D + d[:, None], mask=keys[None, :] & dims[:, None], other=0.0)
        s = tl.dot(q, kt) * scale
        if HAS_MASK:
            mask_rows = (b.to(tl.int64) * m_len + i) * n_len
            s += tl.load(mask_ptr + mask_rows[:, None] + cols[None, :], mask=live[:, None] & keys[None, :],
                         other=0.0).to(tl.float32)  # fmt: skip
        allowed = keys[None, :] & live[:, None]
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= past + i[:, None])
        s = tl.where(allowed, s, float("-inf"))
        new_best = tl.maximum(best, tl.max(s, 1))
        safe = tl.where(new_best == float("-inf"), 0.0, new_best)  # rows with nothing allowed yet
        p = tl.exp(s - safe[:, None])
        alpha = tl.exp(best - safe)
        total = total * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv_base + cols[:, None] * D + d[None, :], mask=keys[:, None] & dims[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        best = new_best
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    if SPLIT == 1:
        tl.store(o_ptr + q_rows[:, None] + d[None, :], out.to(o_ptr.dtype.element_ty), mask=live[:, None] & dims[None, :])
    else:  # this split's normalized output and log-sum-exp, combined by _combine
        rows_all = (b * kv_heads * group + hq).to(tl.int64) * m_len + i
        total_rows = tl.num_programs(1) * group * m_len
        tl.store(o_ptr + (part * total_rows + rows_all)[:, None] * D + d[None, :], out, mask=live[:, None] & dims[None, :])
        lse = tl.where(total == 0.0, float("-inf"), best + tl.log(tl.where(total == 0.0, 1.0, total)))
        tl.store(lse_ptr + part * total_rows + rows_all, lse, mask=live)


@triton.jit
def _combine(part_ptr, lse_ptr, o_ptr, rows, SPLIT: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_S: tl.constexpr):  # fmt: skip
    """Flash-decoding's second step: the splits' outputs weighted by their softmax mass."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + s * rows + row, mask=s < SPLIT, other=float("-inf"))
    top = tl.max(lse, 0)
    weight = tl.exp(lse - tl.where(top == float("-inf"), 0.0, top))
    inside = (s < SPLIT)[:, None] & (d < D)[None, :]
    parts = tl.load(part_ptr + (s * rows + row)[:, None] * D + d[None, :], mask=inside, other=0.0)
    out = tl.sum(parts * weight[:, None], 0) / tl.maximum(tl.sum(weight, 0), 1e-30)
    tl.store(o_ptr + row * D + d, out.to(o_ptr.dtype.element_ty), mask=d < D)


def _packed(problem: Mapping[str, int]) -> int:
    return problem["q_heads"] // problem["kv_heads"] * problem["m"]


def _space(problem: Mapping[str, int]) -> list[Config]:
    widest_m = max(16, next_pow2(_packed(problem)))
    widest_n = max(16, next_pow2(problem["n"]))
    # splitting the keys pays where few programs would run (decode: one tile of rows per KV head)
    splits = (1, 2, 4, 8, 16, 32, 64) if _packed(problem) <= 64 else (1,)
    return [Config({"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT": sp}, w, st) for bm in (16, 32, 64, 128) if bm <= widest_m
            for bn in (16, 32, 64, 128) if bn <= widest_n for sp in splits if sp == 1 or sp * bn <= problem["n"]
            for w in (2, 4, 8) for st in (1, 2, 3)]  # fmt: skip


def _split(config: Config) -> int:
    return config.blocks.get("SPLIT", 1)


def _chunk(problem: Mapping[str, int], config: Config) -> int:
    """Keys per split, a whole number of BLOCK_N."""
    bn = config.blocks["BLOCK_N"]
    return triton.cdiv(triton.cdiv(problem["n"], _split(config)), bn) * bn


def _work(problem: Mapping[str, int], config: Config, itemsize: int) -> Work:
    b, hq, hk, m, n, d = (problem[k] for k in ("batch", "q_heads", "kv_heads", "m", "n", "head_dim"))
    bm, bn = config.blocks["BLOCK_M"], config.blocks["BLOCK_N"]
    tiles = triton.cdiv(_packed(problem), bm)
    q_and_o = 2 * b * hq * m * d * itemsize
    kv = 2 * b * hk * n * d * itemsize * tiles  # every tile of rows reads its KV head's keys and values
    mask = b * hq * m * n * itemsize if problem.get("mask") else 0
    flops = 4 * b * hq * m * n * d // (2 if problem.get("causal") and m > 1 else 1)
    bd = next_pow2(d)
    shared = (bm * bd + 2 * bn * bd * config.num_stages) * itemsize
    once = kv // tiles
    partials = 2 * _split(config) * b * hq * m * (d + 1) * 4 if _split(config) > 1 else 0  # written, then combined
    return Work(bytes=q_and_o + kv + mask + partials, flops=flops, grid=tiles * b * hk * _split(config), shared=shared,
                accumulators=bm * bd + bm * bn, tensor_cores=True, reread=kv - once, working_set=once)  # fmt: skip


def _constants(problem: Mapping[str, int], config: Config) -> dict:
    d = problem["head_dim"]
    return {"HAS_MASK": bool(problem.get("mask")), "CAUSAL": bool(problem.get("causal")), "D": d,
            "BLOCK_D": max(16, next_pow2(d)), "BLOCK_M": config.blocks["BLOCK_M"], "BLOCK_N": config.blocks["BLOCK_N"],
            "SPLIT": _split(config)}  # fmt: skip


def _signature(problem: Mapping[str, int], config: Config, dtype: str):
    ptr = f"*{dtype}"
    split = _split(config) > 1
    sig = {"q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "mask_ptr": ptr, "o_ptr": "*fp32" if split else ptr,
           "lse_ptr": "*fp32", "scale": "fp32", "m_len": "i32", "n_len": "i32", "kv_heads": "i32", "group": "i32",
           "past": "i32", "chunk": "i32", "HAS_MASK": "constexpr", "CAUSAL": "constexpr", "D": "constexpr",
           "BLOCK_D": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "SPLIT": "constexpr"}  # fmt: skip
    return sig, _constants(problem, config)


def _companions(problem: Mapping[str, int], config: Config, dtype: str) -> list[tuple]:
    """The combine step of a split configuration: (label, fn, signature, constants, grid)."""
    if _split(config) == 1:
        return []
    d = problem["head_dim"]
    sig = {"part_ptr": "*fp32", "lse_ptr": "*fp32", "o_ptr": f"*{dtype}", "rows": "i32", "SPLIT": "constexpr",
           "D": "constexpr", "BLOCK_D": "constexpr", "BLOCK_S": "constexpr"}  # fmt: skip
    rows = problem["batch"] * problem["q_heads"] * problem["m"]
    constants = {"SPLIT": _split(config), "D": d, "BLOCK_D": max(16, next_pow2(d)), "BLOCK_S": next_pow2(_split(config))}
    return [("combine", _combine, sig, constants, (rows,))]


def _grid(problem: Mapping[str, int], config: Config) -> tuple[int, ...]:
    return (triton.cdiv(_packed(problem), config.blocks["BLOCK_M"]), problem["batch"] * problem["kv_heads"],
            _split(config))  # fmt: skip


def _launch(config: Config, q, k, v, mask=None, causal: bool = False, scale: float | None = None):
    import torch

    b, hq, m, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    problem = {"batch": b, "q_heads": hq, "kv_heads": hk, "m": m, "n": n, "head_dim": d, "mask": mask is not None,
               "causal": causal}  # fmt: skip
    split = _split(config)
    parts = torch.empty((split, b * hq * m, d), dtype=torch.float32, device=q.device) if split > 1 else o
    lse = torch.empty((split, b * hq * m), dtype=torch.float32, device=q.device)
    _attention[_grid(problem, config)](
        q, k, v, q if mask is None else mask, parts, lse, scale or d**-0.5, m, n, hk, hq // hk, n - m,
        _chunk(problem, config), num_warps=config.num_warps, num_stages=config.num_stages,
        **_constants(problem, config),
    )  # fmt: skip
    for _label, fn, _sig, constants, grid in _companions(problem, config, "fp32"):
        fn[grid](parts, lse, o, b * hq * m, **constants)
    return o


def _reference(q, k, v, mask=None, causal: bool = False, scale: float | None = None) -> np.ndarray:
    b, hq, m, d = q.shape
    group = hq // k.shape[1]
    n = k.shape[2]
    kk = np.repeat(k.astype(np.float64), group, axis=1)
    vv = np.repeat(v.astype(np.float64), group, axis=1)
    s = q.astype(np.float64) @ kk.transpose(0, 1, 3, 2) * (scale or d**-0.5)
    if mask is not None:
        s = s + mask.astype(np.float64)
    if causal:
        s = np.where(np.arange(n)[None, :] <= (n - m) + np.arange(m)[:, None], s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    return (p / p.sum(-1, keepdims=True) @ vv).astype(q.dtype)


ATTENTION = Kernel(
    name="attention",
    summary="softmax(q k^T * scale + mask) v, GQA, causal over a KV cache, prefill and decode",
    fn=_attention,
    space=_space,
    work=_work,
    signature=_signature,
    grid=_grid,
    launch=_launch,
    reference=_reference,
    onnx_ops=("GroupQueryAttention", "MultiHeadAttention", "Attention"),
    companions=_companions,
)
