"""Apache TVM (Relax) backend: x86 and aarch64 CPUs, NVIDIA (``cuda``) and AMD (``rocm``) GPUs.

The passes' ONNX is specialised to fixed input shapes first (TVM's ONNX importer cannot
follow the exporter's symbolic shape arithmetic: a ``Range`` over a dynamic length gets a
fresh symbol, and the ``Add`` of position and token embeddings then loses its shape), folded
with onnxscript's optimizer, imported with ``relax.frontend.onnx.from_onnx`` and built with
``tvm.compile`` and the target's default Relax pipeline (``dlight`` GPU schedules for
``cuda`` and ``rocm``). The fixed shapes are the example inputs' unless ``shapes`` says
otherwise; the engine's input specs say so, and other shapes are refused with a clear error.

Targets come from the profile's ``[backends.tvm] target`` table:

- ``llvm`` for this machine: the library runs here (``lib.so`` + the Relax VM).
- ``llvm`` with an ``mtriple`` for another CPU (aarch64): cross-compiled with the
  ``<triple>-g++`` cross compiler; the library is checked to be an ELF for that machine.
- ``cuda``: the kernels' CUDA source is compiled with ``nvcc`` into ``kernels/*.cubin``
  (SASS for the profile's ``arch``) and a ``.fatbin`` that also carries PTX; ``cuobjdump
  --list-elf`` confirms the architecture. ``lib.so`` holds the host code.
- ``rocm``: code objects (``kernels/*.hsaco``) linked with ``ld.lld`` against the AMD device
  libraries; see ``_tvm_rocm`` for the code-object ABI fix. Their ELF notes name the gfx arch.

Engines built for another machine cannot run here: ``stand_in()`` builds the same Relax
module for this CPU's ``llvm``, which is what verification runs (the GPU schedules are not
exercised; the import, legalisation and numerics of every operator are).
"""

from __future__ import annotations

__all__ = [
    "NAME",
    "PASSES",
    "FIXED_SHAPES",
    "Options",
    "version",
    "require",
    "supports",
    "compile",
    "Engine",
]

import contextlib
import functools
import os
import platform
import shutil
import subprocess
import tempfile
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from adapter.backends import _tvm_decoder, _tvm_profile, _tvm_rocm
from adapter.backends._kernels import attach_kernels, example_sizes
from adapter.backends.base import EngineBase, Support, fix_shapes, profile_options, require_module, threads_for
from adapter.core.errors import AdapterError, BackendUnavailableError
from adapter.core.onnx_io import save_model
from adapter.core.specs import TensorSpec
from adapter.profiles.probe import probe_host

NAME = "tvm"
PASSES: tuple[str, ...] = ()
"""TVM fuses on its own (``FuseOps``/``FuseTIR``) from the canonical graph."""
PRECISIONS = frozenset({"fp32"})
"""Precision modes it builds (the contract: ``adapter.backends.base.Backend``)."""
EMULATES = frozenset()
BUILD_OPTIONS = frozenset({"shapes"})
DEVICE = "cpu"
STAND_IN = True
EXTRA = "tvm"
FIXED_SHAPES = True
"""Builds for fixed input shapes (``Options.shapes``; ``adapter.backends.base.fix_shapes``)."""
AUTO_KINDS: frozenset[str] = frozenset()
"""Not a ``--backend auto`` candidate: untuned TVM is for code generation (DESIGN.md
measured 1.6 s for MiniLM); ask for it with ``--backend tvm`` (and ``tuning_trials``)."""
LIBRARY = "lib.so"
MODEL_FILE = "model.onnx"
KERNELS = "kernels"
TUNING = "tuning"

_MACHINES = {"x86_64": ("x86_64", "Advanced Micro Devices X86-64"), "aarch64": ("aarch64", "AArch64")}
"""``uname -m`` and the ``readelf -h`` Machine line for each CPU architecture TVM targets here."""


@dataclass(frozen=True)
class Options:
    """Build settings; ``target`` comes from the profile."""

    target: dict[str, Any] = field(default_factory=lambda: {"kind": "llvm"})
    """A TVM target as a dict, e.g. ``{"kind": "cuda", "arch": "sm_80"}``."""
    shapes: dict[str, list[int]] = field(default_factory=dict)
    """Fixed input shapes the engine is built for (default: the example inputs')."""
    tuning_trials: int = 0
    """MetaSchedule trials (0: default schedules). Tuning records are kept in the artifact."""
    tuning_timeout_s: float = 1800.0
    """Seconds the tuning process may take before it is stopped (and the build fails with a clear error)."""
    threads: int = 0
    """Runtime threads for CPU engines; 0 means the profile's count, capped at the cores available."""

    @classmethod
    def from_profile(cls, profile: Any, overrides: dict[str, Any] | None = None) -> Options:
        options = profile_options(cls, NAME, profile, overrides)
        target = _thaw(options.target)
        if not isinstance(target, dict) or "kind" not in target:
            raise AdapterError(
                f"The TVM target must be a table with a 'kind' (got {options.target!r}).",
                'Write it as target = { kind = "llvm", mcpu = "..." } in the profile.',
            )
        shapes = {k: list(v) for k, v in _thaw(options.shapes).items()}
        return cls(target, shapes, options.tuning_trials, options.tuning_timeout_s, options.threads)


def _thaw(value: Any) -> Any:
    """Plain dicts and lists from the profile's frozen mappings."""
    if hasattr(value, "items"):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thaw(v) for v in value]
    return value


def require() -> None:
    """Raise a clear error when apache-tvm is missing."""
    require_module("tvm", NAME, "pip install 'adapter[tvm]' (apache-tvm==0.27.0.post1)")


def version() -> str:
    from importlib import metadata

    return metadata.version("apache-tvm")


@functools.cache
def _converters() -> frozenset[str]:
    from tvm.relax.frontend.onnx import onnx_frontend

    return frozenset(onnx_frontend._get_convert_map()) | {"If"}  # the importer converts If itself


def supports(node: ir.Node, model: ir.Model, profile: Any = None) -> Support:
    """Whether TVM's ONNX importer has a converter for the node's op."""
    if (node.domain, node.op_type, node.overload) in model.functions:
        return Support(True)
    if node.op_type in _converters():
        return Support(True)
    return Support(False, f"TVM {version()}'s ONNX importer (relax.frontend.onnx) has no converter for {node.op_type}")


# ----------------------------------------------------------------------------- shapes


def _input_order(model: ir.Model) -> list[str]:
    return [v.name for v in model.graph.inputs if not v.is_initializer()]


# ----------------------------------------------------------------------------- targets


def _kind(target: dict[str, Any]) -> str:
    return str(target["kind"])


def _machine_of(target: dict[str, Any]) -> str:
    """The CPU architecture an ``llvm`` target's code runs on."""
    triple = str(target.get("mtriple", "")) or platform.machine()
    return triple.split("-")[0]


def _host_machine(target: dict[str, Any]) -> str:
    """The CPU the library's host code runs on (a GPU target's ``host`` table, else this one)."""
    if _kind(target) == "llvm":
        return _machine_of(target)
    return _machine_of(dict(target.get("host") or {}))


def _missing_features(target: dict[str, Any]) -> list[str]:
    """LLVM CPU features the target's code may use that this machine's target lacks."""
    from tvm.target import codegen

    wanted = set(codegen.llvm_get_cpu_features(_tvm_target(target)))
    have = set(codegen.llvm_get_cpu_features(_tvm_target(_host_target())))
    return sorted(wanted - have)


def _runs_here(target: dict[str, Any]) -> bool:
    kind = _kind(target)
    if _host_machine(target) != platform.machine():
        return False
    if kind == "llvm":  # same architecture: the code may still use instructions this CPU lacks (AVX-512, AMX)
        return not _missing_features(target)
    import tvm

    device = {"cuda": tvm.cuda, "rocm": tvm.rocm}.get(kind)
    try:
        return bool(device and device(0).exist)
    except Exception:  # a runtime without that device type
        return False


def _host_target() -> dict[str, Any]:
    """This machine's ``llvm`` target (the host probe's, else a generic one)."""
    return dict(_thaw(probe_host().backends.get(NAME, {}).get("target", {"kind": "llvm"})))


def _tvm_target(target: dict[str, Any]):
    import tvm

    spec = {k: v for k, v in target.items() if k != "host"}
    try:
        if _kind(target) in ("cuda", "rocm"):  # device code plus host code: the profile's host, else this CPU
            return tvm.target.Target(spec, host=dict(target.get("host") or _host_target()))
        return tvm.target.Target(spec)
    except Exception as exc:
        raise AdapterError(f"TVM does not accept the target {target}: {str(exc).splitlines()[0][:300]}") from exc


# ----------------------------------------------------------------------------- build


def _relax_module(model: ir.Model):
    from tvm.relax.frontend.onnx import from_onnx

    proto = ir.serde.serialize_model(model)
    try:
        return from_onnx(proto, keep_params_in_input=False)
    except Exception as exc:
        raise AdapterError(
            f"TVM's ONNX importer failed: {str(exc).strip().splitlines()[-1][:400]}",
            "Run `adapter check` on the source; try another backend (onnxruntime, openvino).",
        ) from exc


def _tune(model_path: Path, target: dict[str, Any], trials: int, tuning_dir: Path, timeout: float) -> None:
    """MetaSchedule over ``trials`` candidates in a child process; its database lands in ``tuning_dir``."""
    import json
    import sys

    tuning_dir.mkdir(parents=True, exist_ok=True)
    spec = {k: v for k, v in target.items() if k != "host"}
    # run as a script (-P: its folder, which holds a module named tvm, stays off sys.path),
    # so the child imports TVM and onnx only, not adapter and torch
    script = str(Path(__file__).with_name("_tvm_tune.py"))
    command = [sys.executable, "-P", script, str(model_path), json.dumps(spec), str(trials)]
    # its own process group: MetaSchedule's builder/runner workers go with it on a timeout
    child = subprocess.Popen(
        [*command, str(tuning_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = child.communicate(timeout=timeout)
        result = subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
    except subprocess.TimeoutExpired as exc:
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        raise AdapterError(
            f"MetaSchedule tuning ({trials} trials) did not finish within {timeout:g} s; it was stopped.",
            "Give fewer tuning_trials or a longer tuning_timeout_s, or build with tuning_trials=0.",
        ) from exc
    if result.returncode != 0:
        died = f"died with signal {-result.returncode}" if result.returncode < 0 else f"exited {result.returncode}"
        lines = result.stderr.strip().splitlines() or ["no output"]
        last = next((ln for ln in reversed(lines) if "Error" in ln or "Segfault" in ln), lines[-1]).strip()[:300]
        raise AdapterError(
            f"MetaSchedule tuning ({trials} trials) {died}: {last}. The tuning logs are in {tuning_dir}.",
            "Build with the default schedules (tuning_trials=0), or use another apache-tvm release.",
        )


def _compile_relax(mod, target: dict[str, Any], trials: int, tuning_dir: Path | None):
    import tvm
    from tvm import relax

    tvm_target = _tvm_target(target)
    try:
        if trials > 0 and tuning_dir is not None:  # apply the records _tune wrote
            with tvm_target:
                mod = relax.get_pipeline(
                    "static_shape_tuning", target=tvm_target, total_trials=0, work_dir=str(tuning_dir)
                )(mod)
        with contextlib.ExitStack() as stack:
            if _kind(target) == "rocm":
                stack.enter_context(_tvm_rocm.rocm_build(str(target.get("mcpu", ""))))
            return tvm.compile(mod, target=tvm_target)
    except AdapterError:
        raise
    except Exception as exc:
        raise AdapterError(
            f"TVM could not build for {target}: {str(exc).strip().splitlines()[-1][:400]}",
            "Check the target in the profile; run `adapter check` on the source.",
        ) from exc


def _cross_compiler(machine: str) -> str:
    compiler = f"{machine}-linux-gnu-g++"
    if shutil.which(compiler) is None:
        raise BackendUnavailableError(
            f"Cross-compiling TVM's library for {machine} needs {compiler}, which is not on PATH.",
            f"Install it: apt-get install g++-{machine.replace('_', '-')}-linux-gnu.",
        )
    return compiler


def _export(executable, path: Path, target: dict[str, Any]) -> None:
    """Write the library; ``llvm`` code for another CPU goes through its cross compiler."""
    machine = _host_machine(target)
    tmp = path.with_name(path.name + ".tmp.so")
    if machine != platform.machine():
        from tvm.support import cc

        executable.export_library(str(tmp), fcompile=cc.cross_compiler(_cross_compiler(machine)))
    else:
        executable.export_library(str(tmp))
    os.replace(tmp, path)


def elf_machine(path: Path) -> str:
    """The ``Machine`` line of an ELF header (``readelf -h``)."""
    tool = shutil.which("readelf") or shutil.which("llvm-readelf")
    if tool is None:
        raise BackendUnavailableError("Checking a library's architecture needs readelf.", "apt-get install binutils.")
    out = subprocess.run([tool, "-h", str(path)], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        if line.strip().startswith("Machine:"):
            return line.split(":", 1)[1].strip()
    raise AdapterError(f"'{path}' is not an ELF file readelf can read.")


def _cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import nvidia.cu13  # PyPI nvidia-cuda-cuobjdump

        candidate = Path(list(nvidia.cu13.__path__)[0]) / "bin" / "cuobjdump"
        if candidate.is_file():
            return str(candidate)
    raise BackendUnavailableError(
        "Checking CUDA kernels needs cuobjdump.", "Install it: pip install 'adapter[tvm]' (nvidia-cuda-cuobjdump)."
    )


def cuda_architectures(path: Path) -> dict[str, list[str]]:
    """The SASS (``elf``) and PTX architectures in a cubin or fatbin, read with ``cuobjdump``."""
    result = subprocess.run(
        [_cuobjdump(), "--list-elf", "--list-ptx", str(path)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise AdapterError(f"cuobjdump cannot read '{path}': {result.stderr.strip()[:300]}")
    found: dict[str, list[str]] = {"elf": [], "ptx": []}
    for line in result.stdout.splitlines():
        kind = "elf" if line.startswith("ELF file") else "ptx" if line.startswith("PTX file") else None
        if kind:
            name = line.split(":", 1)[1].strip()
            found[kind].extend(part for part in name.split(".") if part.startswith(("sm_", "compute_")))
    return {kind: sorted(set(archs)) for kind, archs in found.items()}


def _nvcc() -> str:
    found = shutil.which("nvcc")
    if found is None:
        raise BackendUnavailableError(
            "Compiling TVM's CUDA kernels needs nvcc (the CUDA toolkit), which is not on PATH.",
            "Install the CUDA toolkit, or choose a CPU target.",
        )
    return found


def _cuda_kernels(executable, folder: Path, arch: str) -> list[str]:
    """Compile the executable's CUDA source to ``kernels/<arch>.cubin`` and a fatbin with PTX."""
    sources = [m.inspect_source("cuda") for m in _device_modules(executable, "cuda")]
    if not sources:
        raise AdapterError("TVM produced no CUDA kernels for this model.")
    kernels = folder / KERNELS
    kernels.mkdir(parents=True, exist_ok=True)
    number = arch.removeprefix("sm_")
    files = []
    for index, source in enumerate(sources):
        stem = f"cuda{index}"
        (kernels / f"{stem}.cu").write_text(source)
        outputs = {
            f"{stem}.{arch}.cubin": ["--cubin", f"-arch={arch}"],
            f"{stem}.{arch}.fatbin": [
                "--fatbin",
                f"-gencode=arch=compute_{number},code={arch}",
                f"-gencode=arch=compute_{number},code=compute_{number}",
            ],
        }
        for name, flags in outputs.items():
            result = subprocess.run(
                [_nvcc(), *flags, "-O3", "-w", "-o", str(kernels / name), str(kernels / f"{stem}.cu")],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise AdapterError(f"nvcc failed on TVM's CUDA kernels for {arch}: {result.stderr.strip()[-400:]}")
            files.append(f"{KERNELS}/{name}")
        files.append(f"{KERNELS}/{stem}.cu")
    return files


def _device_modules(executable, kind: str) -> list:
    found, todo = [], [executable.mod]
    while todo:
        module = todo.pop()
        if module.kind == kind:
            found.append(module)
        todo.extend(module.imports)
    return found


def _check_kernels(folder: Path, files: list[str], target: dict[str, Any]) -> dict[str, Any]:
    """What the tools say each kernel file was built for; raise when it is not the target's."""
    kind = _kind(target)
    checked: dict[str, Any] = {}
    if kind == "cuda":
        arch = str(target.get("arch", ""))
        for name in files:
            if name.endswith((".cubin", ".fatbin")):
                found = cuda_architectures(folder / name)
                if arch not in found["elf"]:
                    raise AdapterError(f"{name} holds SASS for {found['elf'] or 'nothing'}, not {arch}.")
                checked[name] = found
    elif kind == "rocm":
        arch = str(target.get("mcpu", ""))
        for name in files:
            if name.endswith(".hsaco"):
                found_arch = _tvm_rocm.code_object_arch(folder / name)
                if found_arch != arch:
                    raise AdapterError(f"{name} is a code object for {found_arch}, not {arch}.")
                checked[name] = found_arch
    expected = _MACHINES.get(_host_machine(target), ("", ""))[1]
    machine = elf_machine(folder / LIBRARY)
    if expected and machine != expected:
        raise AdapterError(f"{LIBRARY} is built for {machine}, not {expected}.")
    checked[LIBRARY] = machine
    return checked


def compile(
    model: ir.Model, profile: Any, options: Options, specs: tuple[list[TensorSpec], list[TensorSpec]], workdir: Path
) -> Engine:
    """Specialise, import, build for the target and write the library and kernels into ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    target = dict(options.target)
    fixed = fix_shapes(model, options.shapes)
    files = save_model(fixed, workdir / MODEL_FILE)
    mod = _relax_module(fixed)
    tuning = workdir / TUNING if options.tuning_trials > 0 else None
    if tuning is not None:
        _tune(workdir / MODEL_FILE, target, options.tuning_trials, tuning, options.tuning_timeout_s)
    executable = _compile_relax(mod, target, options.tuning_trials, tuning)
    _export(executable, workdir / LIBRARY, target)
    files.append(LIBRARY)
    kind = _kind(target)
    if kind == "cuda":
        files += _cuda_kernels(executable, workdir, str(target.get("arch", "sm_80")))
    elif kind == "rocm":
        files += _tvm_rocm.save_code_objects(executable, workdir)
    if tuning is not None:
        files += [str(p.relative_to(workdir)) for p in sorted(tuning.rglob("*")) if p.is_file()]
    inputs = [_fixed_spec(s, options.shapes) for s in specs[0]]
    # GPU targets: the Triton kernels of the graph's fused patterns, beside TVM's own code
    kernels = attach_kernels(fixed, profile, example_sizes(specs[0], options.shapes), "fp32", workdir) if kind in (
        "cuda", "rocm") else {}  # fmt: skip
    config: dict[str, Any] = {
        **asdict(options),
        **kernels,
        "target": target,
        "threads": threads_for(options.threads, profile) if kind == "llvm" else 0,
        "files": files,
        "library": LIBRARY,
        "input_order": _input_order(fixed),
        "tvm_version": version(),
        "kernels": _check_kernels(workdir, files, target),
    }
    config["files"] = files + [f for k in kernels.get("triton_kernels", []) for f in k["files"]]
    return Engine(workdir, inputs, specs[1], config)


def _fixed_spec(spec: TensorSpec, shapes: dict[str, list[int]]) -> TensorSpec:
    shape = shapes.get(spec.name)
    return TensorSpec(spec.name, spec.dtype, tuple(int(d) for d in shape)) if shape else spec


# ----------------------------------------------------------------------------- engine


class Engine(EngineBase):
    """A TVM Relax VM over the artifact's library (on this machine), or its files for another."""

    backend = NAME

    def __init__(
        self, folder: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], config: dict[str, Any]
    ) -> None:
        super().__init__(folder, inputs, outputs, config)
        self.runs_here = _runs_here(config["target"])
        self._vm = None
        self._device = None
        self._stand_in: tuple[EngineBase, str] | None = None

    def _load(self) -> None:
        import tvm
        from tvm import relax

        kind = _kind(self.config["target"])
        self._device = {"llvm": tvm.cpu, "cuda": tvm.cuda, "rocm": tvm.rocm}[kind](0)
        if kind == "llvm":
            os.environ.setdefault("TVM_NUM_THREADS", str(threads_for(self.config.get("threads", 0), None)))
        library = tvm.runtime.load_module(str(self.folder / self.config["library"]))
        self._vm = relax.VirtualMachine(library, self._device)

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.runs_here:
            raise AdapterError(
                f"This TVM engine is built for {self.config['target']}, which is not this machine.",
                "Copy the artifact to such a machine, or run the stand-in built for this CPU (Engine.stand_in()).",
            )
        args = self.vm_args(feed)
        try:
            result = self._vm["main"](*args)
        except Exception as exc:
            raise AdapterError(
                f"TVM failed while running the engine: {str(exc).strip().splitlines()[-1][:400]}"
            ) from exc
        values = list(result) if not hasattr(result, "numpy") else [result]
        return {spec.name: value.numpy() for spec, value in zip(self.outputs, values)}

    def vm_args(self, feed: dict[str, np.ndarray]) -> list:
        """The feed as the Relax VM's arguments on the engine's device (the VM loaded first)."""
        import tvm

        if self._vm is None:
            self._load()
        return [tvm.runtime.tensor(np.ascontiguousarray(feed[n]), self._device) for n in self.config["input_order"]]

    def stand_in(self) -> tuple[EngineBase, str] | None:
        """The same ONNX graph built by TVM for this CPU (cached for the engine's lifetime)."""
        if self.runs_here:
            return None
        if self._stand_in is None:
            host = _host_target()
            folder = Path(tempfile.mkdtemp(prefix="adapter-tvm-standin-"))
            weakref.finalize(self, shutil.rmtree, folder, True)
            model = ir.load(self.folder / MODEL_FILE)
            shapes = {s.name: [int(d) for d in s.shape] for s in self.inputs}
            options = Options(target=host, shapes=shapes, threads=0)
            engine = compile(model, None, options, (self.inputs, self.outputs), folder)
            self._stand_in = (
                engine,
                f"TVM {version()} llvm build of the same graph for this CPU ({host.get('mcpu', 'generic')})",
            )
        return self._stand_in


CAPTURE = _tvm_profile.capture
"""The profiler hook: per-node timings from the backend's own profiler."""
DECODER = _tvm_decoder
"""Generation engines: fixed-shape decode and prefill programs over a sliding cache window."""
