"""The tile model: each configuration's memory traffic and occupancy against a GPU's limits,
bandwidth and compute peak, ranking a kernel's search space without running it.

For one problem and config the kernel says what a launch moves and computes
(:class:`adapter.kernels.spec.Work`). The model then:

* rejects configs the architecture cannot run: shared memory (LDS) over the per-block limit,
  registers per thread over the limit (``32 + accumulators / threads``, a floor estimate);
* finds programs resident per SM/CU (warps, shared memory, registers, the block limit),
  the waves of the grid and the last wave's idle share;
* counts a tile's re-reads (K/V per tile of query rows, activations per column tile) as
  DRAM traffic only for the part of their working set that does not fit half the L2;
* times memory as those bytes over the bandwidth the resident warps can draw (fewer than
  ``warps_to_saturate`` per SM leave latency uncovered, fewer programs than SMs leave SMs
  idle), all loads (re-reads included) over the L2 bandwidth, compute as FLOPs over the peak (tensor cores for ``tl.dot`` kernels in 16-bit
  types, the FP32 rate otherwise), and takes the larger plus a launch overhead.

The predicted efficiency is the least traffic any config of the space needs (no re-reads)
over the predicted time, as a fraction of peak bandwidth; and FLOPs over time as a fraction of
the compute peak. On a GPU, ``kernels/device_check.py`` measures the top configs and reports
achieved against predicted.
"""

from __future__ import annotations

__all__ = ["LIMITS", "GpuLimits", "Prediction", "limits_for", "predict", "rank"]

import math
from collections.abc import Mapping
from dataclasses import dataclass

from adapter.core.errors import AdapterError
from adapter.kernels.spec import FLAGS, Config, Kernel

ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
LAUNCH_S = 3e-6
"""Launch and tail overhead of one kernel (a few microseconds on current GPUs)."""


@dataclass(frozen=True)
class GpuLimits:
    """Per-architecture limits the tile model checks (CUDA C++ Programming Guide, "Technical
    Specifications per Compute Capability"; AMD CDNA3 ISA guide and the MI300 instinct docs)."""

    arch: str
    warp_size: int
    shared_per_block: int
    shared_per_sm: int
    registers_per_sm: int
    """32-bit registers per SM (NVIDIA) or vector registers per CU in 32-bit lanes (AMD)."""
    max_registers_per_thread: int
    max_warps_per_sm: int
    max_blocks_per_sm: int
    l2_bytes: int
    warps_to_saturate: int = 16
    """Resident warps per SM that keep enough loads in flight to reach peak bandwidth."""
    l2_factor: float = 2.0
    """L2 bandwidth over DRAM bandwidth (an estimate: microbenchmarks of H100, A100 and MI300X
    read their L2 at roughly 2-3x their HBM rate); every tile's loads, re-reads included, pass it."""


LIMITS = {
    # compute capability 8.0: 164 KB shared per SM, 163 KB opt-in per block; 64K registers,
    # 255 per thread; 64 warps and 32 blocks per SM; A100: 40 MB L2
    "sm_80": GpuLimits("sm_80", 32, 163 * 1024, 164 * 1024, 65536, 255, 64, 32, 40 << 20),
    # compute capability 9.0: 228 KB shared per SM, 227 KB per block; H100 SXM: 50 MB L2
    "sm_90": GpuLimits("sm_90", 32, 227 * 1024, 228 * 1024, 65536, 255, 64, 32, 50 << 20),
    # CDNA3 (MI300X): 64 KB LDS per CU and workgroup, wave64, 512 VGPRs per lane, 4 SIMDs x
    # 8 waves per CU; 4 MB L2 per XCD
    "gfx942": GpuLimits("gfx942", 64, 64 * 1024, 64 * 1024, 4 * 512 * 64, 512, 32, 32, 4 << 20, 8),
    # CDNA2 (MI250X): 64 KB LDS, wave64, 512 VGPRs, 8 waves per SIMD; 8 MB L2 per GCD
    "gfx90a": GpuLimits("gfx90a", 64, 64 * 1024, 64 * 1024, 4 * 512 * 64, 512, 32, 32, 8 << 20, 8),
}


def limits_for(profile) -> GpuLimits:
    arch = profile.arch
    if arch not in LIMITS:
        raise AdapterError(
            f"The tile model has no limits for architecture '{arch}' (profile '{profile.name}').",
            f"Known: {', '.join(sorted(LIMITS))}.",
        )
    return LIMITS[arch]


@dataclass(frozen=True)
class Prediction:
    config: Config
    feasible: bool
    reason: str = ""
    time_s: float = math.inf
    bytes: float = 0.0
    flops: float = 0.0
    grid: int = 0
    blocks_per_sm: int = 0
    waves: int = 0
    bound: str = ""
    bandwidth_fraction: float = 0.0
    """Least traffic of the space over the predicted time, as a fraction of peak bandwidth."""
    flops_fraction: float = 0.0

    def to_json(self) -> dict:
        data = {"config": self.config.to_json(), "feasible": self.feasible}
        if not self.feasible:
            return {**data, "reason": self.reason}
        return {**data, "time_us": round(self.time_s * 1e6, 3), "bytes": self.bytes, "flops": self.flops,
                "grid": self.grid, "blocks_per_sm": self.blocks_per_sm, "waves": self.waves, "bound": self.bound,
                "bandwidth_fraction": round(self.bandwidth_fraction, 4),
                "flops_fraction": round(self.flops_fraction, 4)}  # fmt: skip


def predict(kernel: Kernel, problem: Mapping[str, int], config: Config, profile, dtype: str = "fp16",
            ideal_bytes: float | None = None) -> Prediction:  # fmt: skip
    """The model's verdict on one configuration (see the module docstring)."""
    gpu = limits_for(profile)
    work = kernel.work(problem, config, ITEMSIZE[dtype])
    if work.grid <= 0:
        return Prediction(config, False, "nothing to launch (an empty dimension)")
    threads = config.num_warps * gpu.warp_size
    registers = 32 + math.ceil(work.accumulators / threads)
    if work.shared > gpu.shared_per_block:
        return Prediction(config, False, f"shared memory {work.shared} B > {gpu.shared_per_block} B per block")
    if registers > gpu.max_registers_per_thread:
        return Prediction(config, False, f"~{registers} registers per thread > {gpu.max_registers_per_thread}")
    per_sm = [gpu.max_blocks_per_sm, gpu.max_warps_per_sm // config.num_warps,
              gpu.registers_per_sm // (registers * threads)]  # fmt: skip
    if work.shared:
        per_sm.append(gpu.shared_per_sm // work.shared)
    blocks = min(per_sm)
    if blocks < 1:
        return Prediction(config, False, "no program fits an SM (warps, registers or shared memory)")
    sms = profile.compute_units
    slots = sms * blocks
    waves = math.ceil(work.grid / slots)
    busy = min(1.0, work.grid / sms)  # SMs with work in the first wave
    tail = work.grid / (waves * slots) if waves > 1 else 1.0
    resident = min(blocks, math.ceil(work.grid / sms)) * config.num_warps
    latency = min(1.0, resident / gpu.warps_to_saturate)
    hit = 1.0 if work.working_set <= gpu.l2_bytes / 2 else gpu.l2_bytes / 2 / work.working_set
    dram = work.bytes - work.reread * hit
    memory_s = dram / (profile.memory_bandwidth * busy * latency * tail)
    peak = profile.peak_flops.get(dtype if work.tensor_cores and dtype != "fp32" else "fp32")
    peak = peak or profile.peak_flops["fp32"]
    compute_s = work.flops / (peak * busy * tail * min(1.0, resident / 4))
    l2_s = work.bytes / (profile.memory_bandwidth * gpu.l2_factor * busy * tail)
    time_s = max(memory_s, l2_s, compute_s) + LAUNCH_S
    least = ideal_bytes if ideal_bytes is not None else work.bytes - work.reread
    return Prediction(config, True, "", time_s, dram, work.flops, work.grid, blocks, waves,
                      max((memory_s, "memory"), (l2_s, "L2"), (compute_s, "compute"))[1], least / time_s / profile.memory_bandwidth,
                      work.flops / time_s / peak)  # fmt: skip


def rank(kernel: Kernel, problem: Mapping[str, int], profile, dtype: str = "fp16") -> list[Prediction]:
    """Every config of the kernel's space for ``problem``, fastest predicted first, infeasible last."""
    space = kernel.space(problem)
    if not space:
        raise AdapterError(f"Kernel '{kernel.name}' has no configuration for {dict(problem)}.")
    if any(v <= 0 for k, v in problem.items() if k not in FLAGS):
        raise AdapterError(f"Kernel '{kernel.name}' has nothing to launch for {dict(problem)} (an empty dimension).")
    itemsize = ITEMSIZE[dtype]
    ideal = min(w.bytes - w.reread for w in (kernel.work(problem, c, itemsize) for c in space))
    found = [predict(kernel, problem, c, profile, dtype, ideal) for c in space]
    return sorted(found, key=lambda p: (not p.feasible, p.time_s, p.config.key()))
