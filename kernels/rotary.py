"""Rotary position embedding (the rotate-half form of Llama, Mistral, Qwen, Gemma, Phi-3):
``out = x * cos + rotate_half(x) * sin`` at each token's position, for a (batch, heads,
seq, head_dim) query or key tensor and cos/sin tables of (max_positions, head_dim / 2).

One program per (batch x head, ``BLOCK_S`` positions); positions come from ``position_ids``
(batch, seq), so left-padded batches and decode steps at any offset work alike.
"""

from __future__ import annotations

__all__ = ["ROTARY"]

from collections.abc import Mapping

import numpy as np
import triton
import triton.language as tl

from adapter.kernels.spec import Config, Kernel, Work, next_pow2


@triton.jit
def _rotary(x_ptr, cos_ptr, sin_ptr, pos_ptr, y_ptr, heads, seq, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
            BLOCK_S: tl.constexpr):  # fmt: skip
    bh = tl.program_id(1)
    b = bh // heads
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    j = tl.arange(0, BLOCK_H)
    rows = s < seq
    cols = j < HALF
    inside = rows[:, None] & cols[None, :]
    pos = tl.load(pos_ptr + b * seq + s, mask=rows, other=0)
    cos = tl.load(cos_ptr + pos[:, None] * HALF + j[None, :], mask=inside, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos[:, None] * HALF + j[None, :], mask=inside, other=0.0).to(tl.float32)
    base = bh.to(tl.int64) * seq * 2 * HALF + s[:, None] * 2 * HALF + j[None, :]
    x1 = tl.load(x_ptr + base, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + base + HALF, mask=inside, other=0.0).to(tl.float32)
    tl.store(y_ptr + base, (x1 * cos - x2 * sin).to(y_ptr.dtype.element_ty), mask=inside)
    tl.store(y_ptr + base + HALF, (x2 * cos + x1 * sin).to(y_ptr.dtype.element_ty), mask=inside)


def _space(problem: Mapping[str, int]) -> list[Config]:
    longest = next_pow2(problem["seq"])
    blocks = sorted({min(b, longest) for b in (1, 2, 4, 8, 16, 32, 64)})
    return [Config({"BLOCK_S": b}, w) for b in blocks for w in (1, 2, 4)]


def _work(problem: Mapping[str, int], config: Config, itemsize: int) -> Work:
    b, h, s, d = problem["batch"], problem["heads"], problem["seq"], problem["head_dim"]
    block = config.blocks["BLOCK_S"]
    tables = b * s * d * itemsize  # cos + sin at each token's position, read once from DRAM (L2 for other heads)
    return Work(bytes=2 * b * h * s * d * itemsize + tables + b * s * 8, flops=3 * b * h * s * d,
                grid=triton.cdiv(s, block) * b * h, shared=0, accumulators=block * d)  # fmt: skip


def _constants(problem: Mapping[str, int], config: Config) -> dict:
    half = problem["head_dim"] // 2
    return {"HALF": half, "BLOCK_H": next_pow2(half), "BLOCK_S": config.blocks["BLOCK_S"]}


def _signature(problem: Mapping[str, int], config: Config, dtype: str):
    ptr = f"*{dtype}"
    sig = {"x_ptr": ptr, "cos_ptr": ptr, "sin_ptr": ptr, "pos_ptr": "*i64", "y_ptr": ptr, "heads": "i32",
           "seq": "i32", "HALF": "constexpr", "BLOCK_H": "constexpr", "BLOCK_S": "constexpr"}  # fmt: skip
    return sig, _constants(problem, config)


def _grid(problem: Mapping[str, int], config: Config) -> tuple[int, ...]:
    return (triton.cdiv(problem["seq"], config.blocks["BLOCK_S"]), problem["batch"] * problem["heads"])


def _launch(config: Config, x, cos, sin, positions):
    import torch

    b, h, s, d = x.shape
    y = torch.empty_like(x)
    problem = {"batch": b, "heads": h, "seq": s, "head_dim": d}
    _rotary[_grid(problem, config)](x, cos, sin, positions, y, h, s, num_warps=config.num_warps,
                                    **_constants(problem, config))  # fmt: skip
    return y


def _reference(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, positions: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    c = cos[positions][:, None].astype(np.float64)  # (batch, 1, seq, half)
    s = sin[positions][:, None].astype(np.float64)
    x1, x2 = x[..., :half].astype(np.float64), x[..., half:].astype(np.float64)
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


ROTARY = Kernel(
    name="rotary",
    summary="rotary embedding (rotate-half) at position_ids",
    fn=_rotary,
    space=_space,
    work=_work,
    signature=_signature,
    grid=_grid,
    launch=_launch,
    reference=_reference,
    onnx_ops=("RotaryEmbedding",),
)
