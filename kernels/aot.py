"""Ahead-of-time compilation of a kernel configuration for a GPU architecture, no GPU needed:
Triton's compiler for ``GPUTarget("cuda", 80|90, 32)`` gives PTX and a cubin,
``GPUTarget("hip", "gfx942", 64)`` AMDGCN and an hsaco code object.

Compiled kernels are cached by what determines the binary (the kernel's source, its argument
types and constants, warps, stages, architecture, Triton's version) under adapter's cache;
:func:`bundle` writes the best-predicted configuration of each kernel into an artifact folder
with its launch metadata (symbol, warps, shared memory, grid, argument order) and the tile
model's prediction.
"""

from __future__ import annotations

__all__ = ["CompiledKernel", "bundle", "compile_function", "compile_kernel", "gpu_target"]

import hashlib
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from adapter.core import artifact
from adapter.core.errors import AdapterError
from adapter.kernels.spec import Config, Kernel
from adapter.kernels.tuning import rank

_BINARY = {"cuda": ("cubin", "ptx"), "hip": ("hsaco", "amdgcn")}


def gpu_target(arch: str) -> GPUTarget:
    """``sm_90`` -> CUDA 9.0, warps of 32; ``gfx942`` -> HIP, wavefronts of 64."""
    if arch.startswith("sm_") and arch[3:].isdigit():
        return GPUTarget("cuda", int(arch[3:]), 32)
    if arch.startswith("gfx"):
        return GPUTarget("hip", arch, 64)
    raise AdapterError(f"Triton kernels compile for NVIDIA sm_XX and AMD gfxXXX targets, not '{arch}'.")


@dataclass(frozen=True)
class CompiledKernel:
    kernel: str
    arch: str
    binary: Path
    """The cubin or hsaco."""
    assembly: Path
    """The PTX or AMDGCN text."""
    meta: dict[str, Any]


def _key(fn: Any, signature: Mapping[str, str], constants: Mapping[str, Any], config: Config, arch: str) -> str:
    settings = {k: v for k, v in os.environ.items() if k.startswith("TRITON_") and k != "TRITON_INTERPRET"}
    text = json.dumps({"source": inspect.getsource(fn), "signature": dict(signature), "constants": dict(constants),
                       "warps": config.num_warps, "stages": config.num_stages, "arch": arch,
                       "triton": triton.__version__, "settings": settings}, sort_keys=True, default=str)  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()


def compile_kernel(kernel: Kernel, problem: Mapping[str, int], config: Config, arch: str, dtype: str = "fp16",
                   cache: Path | None = None) -> CompiledKernel:  # fmt: skip
    """The kernel compiled for ``arch`` (cached; see the module docstring)."""
    signature, constants = kernel.signature(problem, config, dtype)
    return compile_function(kernel.name, kernel.fn, signature, constants, config, arch, dtype, cache)


def _job(name: str, fn: Any, signature: Mapping[str, str], constants: Mapping[str, Any], config: Config, arch: str,
         dtype: str, cache: Path | None) -> dict[str, Any]:  # fmt: skip
    gpu_target(arch)  # a clear error for an architecture Triton does not target
    function = fn.fn if hasattr(fn, "fn") else fn
    folder = (cache or artifact.cache_root() / "kernels") / _key(function, signature, constants, config, arch)
    return {"module": function.__module__, "function": function.__name__, "name": name, "signature": dict(signature),
            "constants": dict(constants), "config": config.to_json(), "arch": arch, "dtype": dtype,
            "folder": str(folder)}  # fmt: skip


def _ensure(jobs: list[dict[str, Any]], fns: list[Any]) -> None:
    """Compile the jobs not in the cache yet. Under ``TRITON_INTERPRET=1`` (the interpreter
    patches Triton's language in this process) they compile in one child process without it
    (``python -m adapter.kernels.aot``)."""
    missing = [(job, fn) for job, fn in zip(jobs, fns) if not (Path(job["folder"]) / "meta.json").is_file()]
    if missing and triton.knobs.runtime.interpret:
        _compile_elsewhere([job for job, _ in missing])
    else:
        for job, fn in missing:
            _compile(job, fn)


def _loaded(job: dict[str, Any]) -> CompiledKernel:
    folder = Path(job["folder"])
    binary_kind, asm_kind = _BINARY[gpu_target(job["arch"]).backend]
    meta = json.loads((folder / "meta.json").read_text())
    return CompiledKernel(job["name"], job["arch"], folder / f"kernel.{binary_kind}", folder / f"kernel.{asm_kind}", meta)


def compile_function(name: str, fn: Any, signature: Mapping[str, str], constants: Mapping[str, Any], config: Config,
                     arch: str, dtype: str = "fp16", cache: Path | None = None) -> CompiledKernel:  # fmt: skip
    """One ``triton.jit`` function compiled for ``arch`` with these argument types and constants."""
    job = _job(name, fn, signature, constants, config, arch, dtype, cache)
    _ensure([job], [fn])
    return _loaded(job)


def _compile(job: dict[str, Any], fn: Any) -> None:
    """Compile ``job`` and publish its folder (binary, assembly, meta.json) atomically."""
    config = Config(job["config"]["blocks"], job["config"]["num_warps"], job["config"]["num_stages"])
    target = gpu_target(job["arch"])
    binary_kind, asm_kind = _BINARY[target.backend]
    source = ASTSource(fn=fn, signature=job["signature"], constexprs=job["constants"])
    try:
        compiled = triton.compile(source, target=target, options={"num_warps": config.num_warps,
                                                                  "num_stages": config.num_stages})  # fmt: skip
    except Exception as exc:
        raise AdapterError(f"Triton could not compile kernel '{job['name']}' ({config.key()}) for {job['arch']}: "
                           f"{str(exc).splitlines()[-1][:300] if str(exc) else type(exc).__name__}") from exc  # fmt: skip
    meta = {"kernel": job["name"], "symbol": compiled.metadata.name, "arch": job["arch"], "dtype": job["dtype"],
            "num_warps": compiled.metadata.num_warps, "num_stages": config.num_stages,
            "shared": compiled.metadata.shared, "warp_size": target.warp_size,
            "arguments": [a for a, kind in job["signature"].items() if kind != "constexpr"],
            "signature": job["signature"], "constants": job["constants"], "config": config.to_json(),
            "triton": triton.__version__}  # fmt: skip
    folder = Path(job["folder"])
    folder.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{folder.name[:12]}.", dir=folder.parent))
    (staged / f"kernel.{binary_kind}").write_bytes(compiled.asm[binary_kind])
    (staged / f"kernel.{asm_kind}").write_text(compiled.asm[asm_kind])
    (staged / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        os.replace(staged, folder)
    except OSError:  # another process published it first
        shutil.rmtree(staged, ignore_errors=True)


def _compile_elsewhere(jobs: list[dict[str, Any]]) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    try:
        done = subprocess.run([sys.executable, "-m", "adapter.kernels.aot"], input=json.dumps(jobs), text=True,
                              capture_output=True, env=env, timeout=600)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise AdapterError(f"Compiling {len(jobs)} Triton kernel(s) took over 600 s; none was bundled.") from exc
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise AdapterError(lines[-1] if lines else f"The kernel compiler exited with {done.returncode}.")


def main() -> int:
    """``python -m adapter.kernels.aot`` < jobs.json: compile a list of jobs (see ``_ensure``)."""
    try:
        for job in json.loads(sys.stdin.read()):
            _compile(job, getattr(importlib.import_module(job["module"]), job["function"]))
    except AdapterError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    return 0


def _copy(compiled: CompiledKernel, folder: Path, label: str) -> list[str]:
    files = []
    for source in (compiled.binary, compiled.assembly):
        target = folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', label)}.{compiled.arch}{source.suffix}"
        shutil.copyfile(source, target)
        files.append(target.name)
    return files


def bundle(folder: Path, profile, problems: Mapping[str, tuple[Kernel, Mapping[str, int]]], dtype: str = "fp16",
           cache: Path | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Rank each kernel's configurations for its problem on ``profile``, compile the best for
    the profile's architecture and copy binary + assembly into ``folder`` (``kernels/`` of an
    artifact). Returns the manifest entries: launch metadata, files, the predicted figures and
    the runner-up configurations."""
    folder.mkdir(parents=True, exist_ok=True)
    plans, jobs, fns = [], [], []
    for label, (kernel, problem) in problems.items():
        ranked = rank(kernel, problem, profile, dtype)
        best = ranked[0]
        if not best.feasible:
            raise AdapterError(f"No configuration of kernel '{kernel.name}' fits {profile.arch}: {best.reason}.")
        signature, constants = kernel.signature(problem, best.config, dtype)
        jobs.append(_job(kernel.name, kernel.fn, signature, constants, best.config, profile.arch, dtype, cache))
        fns.append(kernel.fn)
        plans.append({"name": label, "problem": dict(problem), "grid": list(kernel.grid(problem, best.config)),
                      "predicted": best.to_json(), "candidates": [p.to_json() for p in ranked[1:4] if p.feasible],
                      "fused": list(kernel.onnx_ops)})  # fmt: skip
        for part, fn, signature, constants, grid in (kernel.companions or (lambda *_: []))(problem, best.config, dtype):
            jobs.append(_job(f"{kernel.name}.{part}", fn, signature, constants, Config({}, 4), profile.arch, dtype,
                             cache))  # fmt: skip
            fns.append(fn)
            plans.append({"name": f"{label}.{part}", "companion_of": label, "grid": list(grid)})
    _ensure(jobs, fns)  # all at once: one child process under the interpreter
    entries = []
    for plan, job in zip(plans, jobs):
        compiled = _loaded(job)
        entries.append({**plan, **compiled.meta, "name": plan["name"], "files": _copy(compiled, folder, plan["name"])})
    return entries


if __name__ == "__main__":
    sys.exit(main())
