"""Residual add + LayerNorm / RMSNorm in one kernel: ``h = x + residual``, ``y = norm(h) * w (+ b)``;
both ``y`` and ``h`` (the next residual) are written.

One program per row. With ``BLOCK >= n`` the row stays in registers (one read, centred
variance); a smaller ``BLOCK`` loops over the row twice (statistics, then normalize),
reading ``h`` again: the tile model sees that extra traffic, which is what makes the block
size matter for wide rows.
"""

from __future__ import annotations

__all__ = ["ADD_LAYERNORM", "ADD_RMSNORM"]

from collections.abc import Mapping

import numpy as np
import triton
import triton.language as tl

from adapter.kernels.spec import Config, Kernel, Work, next_pow2


@triton.jit
def _add_norm(x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, h_ptr, n, eps,
              RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):  # fmt: skip
    base = tl.program_id(0).to(tl.int64) * n
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)
        inside = cols < n
        h = tl.load(x_ptr + base + cols, mask=inside, other=0.0).to(tl.float32)
        h += tl.load(r_ptr + base + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(h_ptr + base + cols, h.to(h_ptr.dtype.element_ty), mask=inside)
        if RMS:
            centred = h
        else:
            centred = tl.where(inside, h - tl.sum(h, 0) / n, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 0) / n + eps)
        y = centred * rstd * tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(y_ptr + base + cols, y.to(y_ptr.dtype.element_ty), mask=inside)
    else:
        total = tl.zeros([BLOCK], tl.float32)
        squares = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < n
            h = tl.load(x_ptr + base + cols, mask=inside, other=0.0).to(tl.float32)
            h += tl.load(r_ptr + base + cols, mask=inside, other=0.0).to(tl.float32)
            tl.store(h_ptr + base + cols, h.to(h_ptr.dtype.element_ty), mask=inside)
            total += h
            squares += h * h
        mean = tl.sum(total, 0) / n
        if RMS:
            mean = 0.0
            rstd = 1.0 / tl.sqrt(tl.sum(squares, 0) / n + eps)
        else:
            rstd = 1.0 / tl.sqrt(tl.maximum(tl.sum(squares, 0) / n - mean * mean, 0.0) + eps)
        for start in range(0, n, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < n
            h = tl.load(h_ptr + base + cols, mask=inside, other=0.0).to(tl.float32)
            y = (h - mean) * rstd * tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(b_ptr + cols, mask=inside, other=0.0).to(tl.float32)
            tl.store(y_ptr + base + cols, y.to(y_ptr.dtype.element_ty), mask=inside)


def _space(problem: Mapping[str, int]) -> list[Config]:
    widest = next_pow2(problem["n"])
    blocks = sorted({min(b, widest) for b in (256, 512, 1024, 2048, 4096, 8192, 16384)})
    return [Config({"BLOCK": b}, w) for b in blocks for w in (1, 2, 4, 8, 16)]


def _work(problem: Mapping[str, int], config: Config, itemsize: int) -> Work:
    rows, n = problem["rows"], problem["n"]
    block = config.blocks["BLOCK"]
    reads = 3 if block >= n else 4  # x, residual (+ h again when looping)
    return Work(bytes=rows * n * itemsize * (reads + 2) + 2 * n * itemsize, flops=8 * rows * n, grid=rows,
                shared=0, accumulators=2 * block)  # fmt: skip


def _signer(rms: bool):
    def signature(problem: Mapping[str, int], config: Config, dtype: str):
        ptr = f"*{dtype}"
        sig = {"x_ptr": ptr, "r_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "y_ptr": ptr, "h_ptr": ptr, "n": "i32",
               "eps": "fp32", "RMS": "constexpr", "HAS_BIAS": "constexpr", "BLOCK": "constexpr",
               "ONE_PASS": "constexpr"}  # fmt: skip
        return sig, _constants(problem, config, rms)

    return signature


def _constants(problem: Mapping[str, int], config: Config, rms: bool) -> dict:
    block = config.blocks["BLOCK"]
    return {"RMS": rms, "HAS_BIAS": not rms, "BLOCK": block, "ONE_PASS": block >= problem["n"]}


def _grid(problem: Mapping[str, int], config: Config) -> tuple[int, ...]:
    return (problem["rows"],)


def _launcher(rms: bool):
    def launch(config: Config, x, residual, weight, bias=None, eps: float = 1e-5):
        import torch

        n = x.shape[-1]
        rows = x.numel() // n
        y, h = torch.empty_like(x), torch.empty_like(x)
        problem = {"rows": rows, "n": n}
        _add_norm[_grid(problem, config)](x, residual, weight, weight if bias is None else bias, y, h, n, eps,
                                          num_warps=config.num_warps, **_constants(problem, config, rms))  # fmt: skip
        return y, h

    return launch


def _reference_layernorm(x, residual, weight, bias=None, eps: float = 1e-5):
    h = x.astype(np.float64) + residual
    centred = h - h.mean(-1, keepdims=True)
    y = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + eps) * weight
    return (y + (0 if bias is None else bias)).astype(x.dtype), h.astype(x.dtype)


def _reference_rmsnorm(x, residual, weight, bias=None, eps: float = 1e-6):
    h = x.astype(np.float64) + residual
    return (h / np.sqrt((h**2).mean(-1, keepdims=True) + eps) * weight).astype(x.dtype), h.astype(x.dtype)


def _kernel(rms: bool) -> Kernel:
    return Kernel(
        name="add_rmsnorm" if rms else "add_layernorm",
        summary=("h = x + residual; y = rmsnorm(h) * w" if rms else "h = x + residual; y = layernorm(h) * w + b"),
        fn=_add_norm,
        space=_space,
        work=_work,
        signature=_signer(rms),
        grid=_grid,
        launch=_launcher(rms),
        reference=_reference_rmsnorm if rms else _reference_layernorm,
        onnx_ops=("SkipSimplifiedLayerNormalization",) if rms else ("SkipLayerNormalization",),
    )


ADD_LAYERNORM = _kernel(False)
ADD_RMSNORM = _kernel(True)
