"""Weight-only INT4 GEMM: ``y = a @ dequant(w).T`` with the weights dequantized in registers.

The weights are the LLM issue's format (ONNX Runtime's ``MatMulNBits``): ``w`` (n, k // 2)
uint8, two 4-bit values per byte along k (low nibble first), block-wise ``scales`` (n, k //
group) and optional zero points (n, k // group, one uint8 each here; 8 when absent:
symmetric). One program per (``BLOCK_M`` x ``BLOCK_N``) output tile, ``BLOCK_K`` of k per
step: the even and odd k of a step multiply the low and high nibbles (two ``tl.dot``), so no
interleave is needed. A decode step (m = 1) is a weight stream: the model's time is the
packed weights' bytes over the bandwidth, which ``BLOCK_N`` and ``BLOCK_K`` must keep at the
peak.
"""

from __future__ import annotations

__all__ = ["INT4_GEMM", "pack_int4"]

from collections.abc import Mapping

import numpy as np
import triton
import triton.language as tl

from adapter.kernels.spec import Config, Kernel, Work


@triton.jit
def _int4_gemm(a_ptr, w_ptr, s_ptr, z_ptr, y_ptr, m, n, k, group, HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, BLOCK_K // 2)
    rows = rm < m
    cols = rn < n
    groups = k // group
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, k, BLOCK_K):
        even = start + 2 * j
        depth = even < k
        a_even = tl.load(a_ptr + rm[:, None].to(tl.int64) * k + even[None, :], mask=rows[:, None] & depth[None, :],
                         other=0.0)  # fmt: skip
        a_odd = tl.load(a_ptr + rm[:, None].to(tl.int64) * k + even[None, :] + 1, mask=rows[:, None] & depth[None, :],
                        other=0.0)  # fmt: skip
        inside = depth[:, None] & cols[None, :]
        packed = tl.load(w_ptr + rn[None, :].to(tl.int64) * (k // 2) + (start // 2 + j)[:, None], mask=inside, other=0)
        g = rn[None, :].to(tl.int64) * groups + (even // group)[:, None]
        scale = tl.load(s_ptr + g, mask=inside, other=0.0).to(tl.float32)
        if HAS_ZERO:
            zero = tl.load(z_ptr + g, mask=inside, other=8).to(tl.float32)
        else:
            zero = 8.0
        low = ((packed & 15).to(tl.float32) - zero) * scale
        high = ((packed >> 4).to(tl.float32) - zero) * scale
        acc += tl.dot(a_even, low.to(a_even.dtype)) + tl.dot(a_odd, high.to(a_odd.dtype))
    tl.store(y_ptr + rm[:, None].to(tl.int64) * n + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=rows[:, None] & cols[None, :])  # fmt: skip


def _space(problem: Mapping[str, int]) -> list[Config]:
    tall = problem["m"] > 16
    return [Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, w, st)
            for bm in ((16, 32, 64, 128) if tall else (16,)) for bn in (32, 64, 128, 256) for bk in (32, 64, 128)
            if bk <= problem["group"] or bk % problem["group"] == 0 for w in (2, 4, 8) for st in (1, 2, 3, 4)]  # fmt: skip


def _work(problem: Mapping[str, int], config: Config, itemsize: int) -> Work:
    m, n, k, group = problem["m"], problem["n"], problem["k"], problem["group"]
    bm, bn, bk = (config.blocks[x] for x in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    row_tiles, col_tiles = triton.cdiv(m, bm), triton.cdiv(n, bn)
    weights = (n * k // 2 + n * (k // group) * (itemsize + (1 if problem.get("zeros") else 0))) * row_tiles
    activations = m * k * itemsize * col_tiles
    shared = (bm * bk + bk * bn) * itemsize * config.num_stages
    reread = weights - weights // row_tiles + activations - activations // col_tiles
    return Work(bytes=weights + activations + m * n * itemsize, flops=2 * m * n * k, grid=row_tiles * col_tiles,
                shared=shared, accumulators=bm * bn + bk * bn, tensor_cores=True, reread=reread,
                working_set=m * k * itemsize + (weights // row_tiles if row_tiles > 1 else 0))  # fmt: skip


def _constants(problem: Mapping[str, int], config: Config) -> dict:
    return {"HAS_ZERO": bool(problem.get("zeros")), **{k: config.blocks[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}}


def _signature(problem: Mapping[str, int], config: Config, dtype: str):
    ptr = f"*{dtype}"
    sig = {"a_ptr": ptr, "w_ptr": "*u8", "s_ptr": ptr, "z_ptr": "*u8", "y_ptr": ptr, "m": "i32", "n": "i32",
           "k": "i32", "group": "i32", "HAS_ZERO": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
           "BLOCK_K": "constexpr"}  # fmt: skip
    return sig, _constants(problem, config)


def _grid(problem: Mapping[str, int], config: Config) -> tuple[int, ...]:
    return (triton.cdiv(problem["m"], config.blocks["BLOCK_M"]), triton.cdiv(problem["n"], config.blocks["BLOCK_N"]))


def _launch(config: Config, a, w, scales, zeros=None, group: int = 32):
    import torch

    m, k = a.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=a.dtype, device=a.device)
    problem = {"m": m, "n": n, "k": k, "group": group, "zeros": zeros is not None}
    _int4_gemm[_grid(problem, config)](a, w, scales, w if zeros is None else zeros, y, m, n, k, group,
                                       num_warps=config.num_warps, num_stages=config.num_stages,
                                       **_constants(problem, config))  # fmt: skip
    return y


def pack_int4(weight: np.ndarray, group: int, symmetric: bool = True):
    """Block-wise INT4 of a float (n, k) weight in the kernel's layout: (packed, scales, zeros or None)."""
    n, k = weight.shape
    blocks = weight.reshape(n, k // group, group).astype(np.float64)
    if symmetric:
        scales = np.maximum(np.abs(blocks).max(-1), 1e-12) / 7.0
        zeros = np.full(scales.shape, 8.0)
    else:
        low, high = blocks.min(-1), blocks.max(-1)
        scales = np.maximum(high - low, 1e-12) / 15.0
        zeros = np.clip(np.round(-low / scales), 0, 15)
    q = np.clip(np.round(blocks / scales[..., None]) + zeros[..., None], 0, 15).astype(np.uint8).reshape(n, k)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    return packed, scales.astype(weight.dtype), None if symmetric else zeros.astype(np.uint8)


def _reference(a, w, scales, zeros=None, group: int = 32) -> np.ndarray:
    n = w.shape[0]
    q = np.empty((n, w.shape[1] * 2), np.float64)
    q[:, 0::2], q[:, 1::2] = w & 15, w >> 4
    z = 8.0 if zeros is None else np.repeat(zeros.astype(np.float64), group, axis=1)
    dequant = (q - z) * np.repeat(scales.astype(np.float64), group, axis=1)
    return (a.astype(np.float64) @ dequant.T).astype(a.dtype)


INT4_GEMM = Kernel(
    name="int4_gemm",
    summary="y = a @ dequant(w).T, block-wise INT4 weights (MatMulNBits layout)",
    fn=_int4_gemm,
    space=_space,
    work=_work,
    signature=_signature,
    grid=_grid,
    launch=_launch,
    reference=_reference,
    onnx_ops=("MatMulNBits",),
)
