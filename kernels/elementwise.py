"""Bias + GELU (erf form) in one pass: ``y = gelu(x + b)`` over a (rows, n) activation.

Where it applies: BERT/ViT/Whisper MLPs (``Add(MatMul, bias) -> Gelu``), when the engine did
not fuse the bias into the GEMM epilogue. Memory-bound: one read of ``x``, one write of ``y``.
"""

from __future__ import annotations

__all__ = ["BIAS_GELU"]

from collections.abc import Mapping

import numpy as np
import triton
import triton.language as tl

from adapter.kernels.spec import Config, Kernel, Work


@triton.jit
def _bias_gelu(x_ptr, b_ptr, y_ptr, n_cols, total, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < total
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs % n_cols, mask=inside, other=0.0).to(tl.float32)
    h = x + b
    y = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inside)


def _space(problem: Mapping[str, int]) -> list[Config]:
    return [Config({"BLOCK": b}, w) for b in (256, 512, 1024, 2048, 4096, 8192) for w in (1, 2, 4, 8)]


def _work(problem: Mapping[str, int], config: Config, itemsize: int) -> Work:
    total = problem["rows"] * problem["n"]
    block = config.blocks["BLOCK"]
    return Work(bytes=2 * total * itemsize + problem["n"] * itemsize, flops=10 * total,
                grid=triton.cdiv(total, block), shared=0, accumulators=block)  # fmt: skip


def _signature(problem: Mapping[str, int], config: Config, dtype: str):
    ptr = f"*{dtype}"
    sig = {"x_ptr": ptr, "b_ptr": ptr, "y_ptr": ptr, "n_cols": "i32", "total": "i32", "BLOCK": "constexpr"}
    return sig, {"BLOCK": config.blocks["BLOCK"]}


def _grid(problem: Mapping[str, int], config: Config) -> tuple[int, ...]:
    return (triton.cdiv(problem["rows"] * problem["n"], config.blocks["BLOCK"]),)


def _launch(config: Config, x, bias):
    import torch

    y = torch.empty_like(x)
    n = x.shape[-1]
    _bias_gelu[_grid({"rows": x.numel() // n, "n": n}, config)](
        x, bias, y, n, x.numel(), BLOCK=config.blocks["BLOCK"], num_warps=config.num_warps
    )
    return y


def _reference(x: np.ndarray, bias: np.ndarray) -> np.ndarray:
    from math import erf

    h = x.astype(np.float64) + bias.astype(np.float64)
    return (0.5 * h * (1.0 + np.vectorize(erf)(h / np.sqrt(2.0)))).astype(x.dtype)


BIAS_GELU = Kernel(
    name="bias_gelu",
    summary="y = gelu(x + b), erf form",
    fn=_bias_gelu,
    space=_space,
    work=_work,
    signature=_signature,
    grid=_grid,
    launch=_launch,
    reference=_reference,
    onnx_ops=("Add", "Gelu"),
)
