"""What every kernel of ``adapter.kernels`` declares: its Triton function, a NumPy reference,
a tile-size search space with its constraints, and the memory traffic and work of one
configuration (what the tile model in :mod:`adapter.kernels.tuning` ranks).

A kernel is described for one *problem* (a dict of sizes, e.g. ``{"rows": 4096, "n": 768}``)
and one *config* (:class:`Config`: its block sizes, ``num_warps``, ``num_stages``). The same
description launches it (on a GPU, or on the CPU under ``TRITON_INTERPRET=1``) and compiles it
ahead of time for a target architecture (:mod:`adapter.kernels.aot`).
"""

from __future__ import annotations

__all__ = ["FLAGS", "Config", "Kernel", "Work", "next_pow2"]

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

FLAGS = frozenset({"mask", "causal", "zeros"})
"""Problem keys that are switches, not sizes."""


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class Config:
    """One point of a kernel's search space."""

    blocks: Mapping[str, int]
    num_warps: int = 4
    num_stages: int = 1

    def key(self) -> str:
        sizes = ",".join(f"{k}={v}" for k, v in sorted(self.blocks.items()))
        return f"{sizes},w{self.num_warps},s{self.num_stages}"

    def to_json(self) -> dict[str, Any]:
        return {"blocks": dict(self.blocks), "num_warps": self.num_warps, "num_stages": self.num_stages}


@dataclass(frozen=True)
class Work:
    """What one launch of a configuration moves and computes (the tile model's inputs)."""

    bytes: float
    """DRAM traffic: every operand read (re-reads a tiling causes included) and every result written."""
    flops: float
    grid: int
    """Programs (thread blocks / workgroups) launched."""
    shared: int
    """Shared memory (LDS) per program, bytes, as the kernel stages its tiles."""
    accumulators: int
    """Live accumulator elements per program (registers, spread over its threads)."""
    tensor_cores: bool = False
    """Whether the inner product runs as ``tl.dot`` (tensor cores / matrix cores)."""
    reread: float = 0.0
    """The part of ``bytes`` that reads again what another tile of the grid already read
    (K/V per tile of query rows, activations per column tile): L2 serves it when
    ``working_set`` fits there."""
    working_set: float = 0.0
    """Bytes that must stay in L2 for ``reread`` to hit it."""


@dataclass(frozen=True)
class Kernel:
    """A kernel with everything the tests, the tuner and the compiler need (see the module docstring)."""

    name: str
    summary: str
    fn: Any
    """The ``triton.jit`` function."""
    space: Callable[[Mapping[str, int]], list[Config]]
    work: Callable[[Mapping[str, int], Config, int], Work]
    """``work(problem, config, itemsize)``."""
    signature: Callable[[Mapping[str, int], Config, str], tuple[dict[str, str], dict[str, Any]]]
    """``signature(problem, config, dtype)``: Triton's argument types and the constexpr values."""
    grid: Callable[[Mapping[str, int], Config], tuple[int, ...]]
    launch: Callable[..., Any]
    """``launch(config, *tensors, **problem)``: runs the kernel on torch tensors (GPU or interpreter)."""
    reference: Callable[..., Any]
    """NumPy (float64 inside) reference of the fused op."""
    onnx_ops: tuple[str, ...] = field(default=())
    """The fused graph patterns it implements (what a TensorRT plugin would replace)."""
    companions: Callable[[Mapping[str, int], Config, str], list[tuple]] | None = None
    """Kernels a configuration also launches, as (label, fn, signature, constants, grid): the
    combine step of a split attention. Compiled and bundled beside the main one."""
