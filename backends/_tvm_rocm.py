"""Build AMD ROCm code objects (``.hsaco``) with Apache TVM 0.27 on a machine without a GPU.

Why ``tvm.compile(..., target={"kind": "rocm", ...})`` fails with ``ld.lld: error: unknown abi version:``
---------------------------------------------------------------------------------------------------------

TVM's ROCm codegen (``target.build.rocm``, C++ ``BuildAMDGPU`` in ``codegen_amdgpu.cc``) emits one relocatable
AMDGPU ELF object with the LLVM it is built against, then hands the bytes to the Python callback
``tvm_callback_rocm_link`` (``tvm/support/rocm.py``: ``callback_rocm_link`` -> ``rocm_link``), which runs
``ld.lld --no-undefined -shared`` to turn it into a loadable code object.

1. The code-object version.  The 0.27 wheel is built with LLVM 22.  Since LLVM 21 the AMDGPU backend
   writes code object **v6** unless told otherwise (llvm-project PR #118515, re-landed as #130963, "Use COV6
   by default": the ``amdhsa-code-object-version`` default in ``AMDGPUBaseInfo.cpp``; a module flag
   ``amdhsa_code_object_version`` takes priority over it).  TVM sets no such flag, and the device libraries
   it links carry none either (Debian's rocm-device-libs 5.2.3: ``ocml.bc`` and the ``oclc_*.bc`` files only
   have ``wchar_size``/``PIC Level``).  So the object TVM produced here has ``e_ident[EI_ABIVERSION] == 4``
   (``ELFABIVERSION_AMDGPU_HSA_V6``; ``llvm-readelf -h`` shows ``ABI Version: 4``).

2. The linker.  lld's ``AMDGPU::calcEFlags`` (``lld/ELF/Arch/AMDGPU.cpp``) switches on that byte and
   errors on values it does not know.  Debian's lld 14 knows v2..v4 only (ABI bytes 0..2): it rejects v6
   and, tested here, v5 too.  It streams the ``uint8_t`` as a *character*, which is why the message looks
   empty: ``od -c`` shows ``unknown abi version: \\004`` (v6) or ``\\003`` (v5); llvm-project PR #135082
   proposed printing it as a number.

3. Why a newer lld "did not help".  ``tvm.support.rocm.find_lld`` only tries ``ld.lld-22.0``,
   ``ld.lld-22``, ``ld.lld`` and ``/opt/rocm/llvm/bin``; with Debian's ``lld-19`` installed, ``ld.lld`` is
   still lld 14, and ziglang's lld is never on that list.  Invoked by hand, both lld 19 and ziglang's
   lld 22.1 link the same v6 object without error.

4. A second, silent problem in the stock ``tvm_callback_rocm_bitcode_path``: it links
   ``oclc_isa_version_{803,900,906,1030}`` whatever the target (none for gfx90a or gfx942; rocm-device-libs
   5.2.3 has no 942 file at all), lists both the ``_on`` and ``_off`` variant of several ``oclc_*`` controls
   (whichever comes first wins), and links ``oclc_abi_version_500`` whatever version the backend emits.

The fix, from our side, inside :func:`rocm_build`
-------------------------------------------------

* Pin the code-object version through the IR: :func:`rocm_build` overrides ``tvm_callback_rocm_bitcode_path``
  to return one control library per option (clang's HIP defaults), the matching ``oclc_abi_version_*.bc``,
  and a small generated LLVM-IR file (TVM's ``llvm::parseIRFile`` reads text as well as bitcode) that
  carries the module flag ``amdhsa_code_object_version`` and ``__oclc_ISA_version`` for the requested arch.
  The flag is merged into TVM's module when the libraries are linked, and the AMDGPU backend then emits
  ``.amdhsa_code_object_version 5`` (ELF ABI byte 3).  Version 5 is the default: its implicit kernel
  arguments match ``oclc_abi_version_500`` (the device libraries have no 600 variant), it is the ROCm 6
  default and it does not require the ROCm >= 6.3 runtime that v6 does.  ``code_object_version=4`` is
  there for hosts whose only lld is 14.
* Override ``tvm_callback_rocm_link`` with a linker search that takes the newest lld on the machine
  (``ld.lld-NN``, ``/usr/lib/llvm-NN/bin/ld.lld``, ``ld.lld``, the ``ziglang`` wheel's ``zig ld.lld``), then
  check the result: a shared HSA object of the requested code-object version for the requested arch.
* Both callbacks, and ``ROCM_PATH``, are put back when the ``with`` block ends.

Getting the code objects out: the executable's module tree is ``relax.VMExecutable -> llvm (host) -> hip``.
A ``hip`` module cannot ``write_to_file`` and ``inspect_source("hsaco")`` fails to decode the binary as
UTF-8, so :func:`save_code_objects` serializes each ``hip`` module with ``runtime.ModulePackImportsToTensor``
(the same blob ``export_library`` embeds) and takes the ELF from it: a ``hip`` module serializes as
``fmt, function table, data``, the data being the code object, last, behind its u64 length.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from adapter.core.errors import AdapterError, BackendUnavailableError

__all__ = [
    "DEFAULT_CODE_OBJECT_VERSION",
    "RocmBuild",
    "code_object_arch",
    "find_lld",
    "rocm_build",
    "rocm_path",
    "save_code_objects",
]

DEFAULT_CODE_OBJECT_VERSION = 5
SUPPORTED_CODE_OBJECT_VERSIONS = (4, 5, 6)

INSTALL_HINT = "Install the device libraries and a linker: apt-get install rocm-device-libs lld-19."
LLD_HINT = (
    "Code object v{version} needs an lld that knows it (lld 14 links v4 only): apt-get install lld-19, "
    "or pip install ziglang, or build with code_object_version=4."
)

# One library per device-library option, as clang does for HIP by default; TVM's own list links both
# variants of several options and the first one found wins.
CONTROL_LIBRARIES = (
    "ocml",
    "oclc_daz_opt_off",
    "oclc_correctly_rounded_sqrt_on",
    "oclc_finite_only_off",
    "oclc_unsafe_math_off",
    "oclc_wavefrontsize64_on",
)

LINK_CALLBACK = "tvm_callback_rocm_link"
BITCODE_CALLBACK = "tvm_callback_rocm_bitcode_path"
DEVICE_MODULE_KINDS = ("hip", "rocm")

ELF_MAGIC = b"\x7fELF"
ELFOSABI_AMDGPU_HSA = 64
ET_DYN = 3

_ARCH = re.compile(r"gfx(\d{1,2})([0-9a-f])([0-9a-f])")
_TARGET_NOTE = re.compile(r"amdgcn-amd-amdhsa-[\w.]*-(gfx\d{1,2}[0-9a-f]{2})(?::[\w+:-]*)?\b")
_VERSION = re.compile(r"LLD (\d+)\.")
_build_lock = threading.RLock()


# --------------------------------------------------------------------------------------------- device libraries


def _debian_library_dirs() -> list[Path]:
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    return [Path("/usr/lib") / multiarch, Path("/opt/rocm")]


def rocm_path() -> Path:
    """The folder holding ``amdgcn/bitcode`` (the ROCm device libraries).

    ``ROCM_PATH`` wins when set; then Debian's ``rocm-device-libs`` location (``/usr/lib/<multiarch>``), then
    ``/opt/rocm``.

    Raises:
        BackendUnavailableError: no device libraries found (or ``ROCM_PATH`` points at a folder without them).
    """
    env = os.environ.get("ROCM_PATH")
    if env:
        root = Path(env)
        if (root / "amdgcn" / "bitcode" / "ocml.bc").is_file():
            return root
        raise BackendUnavailableError(
            f"ROCM_PATH={env} has no ROCm device libraries (amdgcn/bitcode/ocml.bc).",
            f"Point ROCM_PATH at the folder that holds amdgcn/bitcode, or unset it. {INSTALL_HINT}",
        )
    for root in _debian_library_dirs():
        if (root / "amdgcn" / "bitcode" / "ocml.bc").is_file():
            return root
    searched = ", ".join(str(d / "amdgcn" / "bitcode") for d in _debian_library_dirs())
    raise BackendUnavailableError(f"ROCm device libraries not found (looked in ROCM_PATH, {searched}).", INSTALL_HINT)


def _isa_version(arch: str) -> int:
    """``__oclc_ISA_version`` for ``gfxXYZ``: major * 1000 + minor * 100 + stepping (gfx90a -> 9010)."""
    match = _ARCH.fullmatch(arch)
    if match is None:
        raise AdapterError(
            f"'{arch}' is not an AMDGPU architecture name.", "Use the LLVM processor name, e.g. gfx90a or gfx942."
        )
    major, minor, stepping = match.groups()
    return int(major) * 1000 + int(minor, 16) * 100 + int(stepping, 16)


def _bitcode_files(root: Path, version: int) -> list[Path]:
    folder = root / "amdgcn" / "bitcode"
    abi = 400 if version == 4 else 500  # v6 keeps v5's implicit-argument layout; 5.2.3 ships no 600 file
    files = [folder / f"{name}.bc" for name in CONTROL_LIBRARIES] + [folder / f"oclc_abi_version_{abi}.bc"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise BackendUnavailableError(f"ROCm device libraries in {folder} lack {', '.join(missing)}.", INSTALL_HINT)
    return files


def _controls_ir(arch: str, version: int) -> str:
    """LLVM IR text: the code-object version module flag and the ISA constant the device libraries read."""
    return (
        f"; written by adapter.backends._tvm_rocm for {arch}, code object v{version}\n"
        f"@__oclc_ISA_version = linkonce_odr protected local_unnamed_addr addrspace(4) "
        f"constant i32 {_isa_version(arch)}, align 4\n\n"
        "!llvm.module.flags = !{!0}\n"
        f'!0 = !{{i32 1, !"amdhsa_code_object_version", i32 {version * 100}}}\n'
    )


# ----------------------------------------------------------------------------------------------------- LLVM tools


def _versioned_tools(name: str) -> list[Path]:
    """``name-NN`` on PATH and ``/usr/lib/llvm-NN/bin/name``, newest first, then plain ``name``."""
    found: dict[Path, int] = {}
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        with contextlib.suppress(OSError):
            for entry in Path(folder or ".").glob(f"{name}-[0-9]*"):
                suffix = entry.name[len(name) + 1 :].split(".")[0]
                if suffix.isdigit() and os.access(entry, os.X_OK):
                    found.setdefault(entry, int(suffix))
    for entry in Path("/usr/lib").glob(f"llvm-[0-9]*/bin/{name}"):
        suffix = entry.parent.parent.name.removeprefix("llvm-")
        if suffix.isdigit() and os.access(entry, os.X_OK):
            found.setdefault(entry, int(suffix))
    ordered = sorted(found, key=lambda p: -found[p])
    plain = shutil.which(name)
    if plain:
        ordered.append(Path(plain))
    return ordered


def _lld_major(command: list[str]) -> int | None:
    try:
        out = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = _VERSION.search(out)
    return int(match.group(1)) if match else None


def find_lld() -> tuple[list[str], int]:
    """The newest ``ld.lld`` on this machine, as ``(command, major version)``.

    Looks at ``ld.lld-NN`` on PATH, ``/usr/lib/llvm-NN/bin/ld.lld``, ``ld.lld`` and the ``ziglang`` wheel
    (``python -m ziglang ld.lld``).

    Raises:
        BackendUnavailableError: no lld found.
    """
    candidates = [[str(p)] for p in _versioned_tools("ld.lld")]
    with contextlib.suppress(ImportError):
        import ziglang  # noqa: F401  (only asks whether the wheel is installed)

        candidates.append([sys.executable, "-m", "ziglang", "ld.lld"])
    best: tuple[list[str], int] | None = None
    for command in candidates:
        major = _lld_major(command)
        if major is not None and (best is None or major > best[1]):
            best = (command, major)
    if best is None:
        raise BackendUnavailableError("No ld.lld found to link ROCm code objects.", INSTALL_HINT)
    return best


def _readelf() -> str:
    tools = _versioned_tools("llvm-readelf")
    if not tools:
        raise BackendUnavailableError(
            "llvm-readelf not found (needed to read AMDGPU code objects).", "apt-get install llvm (or llvm-19)."
        )
    return str(tools[0])


def code_object_arch(path: Path) -> str:
    """The GPU architecture a code object was built for, read from its ``amdhsa.target`` note (e.g. "gfx90a").

    Raises:
        AdapterError: the file is missing or holds no AMDGPU HSA target note.
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"Code object {path} does not exist.")
    proc = subprocess.run([_readelf(), "--notes", str(path)], capture_output=True, text=True, timeout=120)
    match = _TARGET_NOTE.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no amdhsa.target note"]
        raise AdapterError(
            f"Cannot read the AMDGPU target of {path}: {detail[0]}",
            "Expected an AMDGPU HSA code object (v3 or later) as written by save_code_objects.",
        )
    return match.group(1)


# -------------------------------------------------------------------------------------------------- the build


@dataclass
class RocmBuild:
    """What one :func:`rocm_build` block uses; ``linked`` collects every code object it linked."""

    arch: str
    code_object_version: int
    rocm_path: Path
    lld: list[str]
    lld_version: int
    linked: list[bytes]
    error: AdapterError | None = None


def _check_code_object(data: bytes, build: RocmBuild, where: Path) -> None:
    if len(data) < 64 or data[:4] != ELF_MAGIC:
        raise AdapterError(f"lld wrote no ELF file for the {build.arch} kernels.")
    osabi, abi_version = data[7], data[8]
    (e_type,) = struct.unpack_from("<H", data, 16)
    if osabi != ELFOSABI_AMDGPU_HSA or e_type != ET_DYN or abi_version != build.code_object_version - 2:
        raise AdapterError(
            f"The linked code object is not a v{build.code_object_version} HSA shared object "
            f"(OS/ABI {osabi}, ABI version byte {abi_version}, ELF type {e_type}).",
            "The amdhsa_code_object_version flag did not reach TVM's module; check the device libraries.",
        )
    found = code_object_arch(where)
    if found != build.arch:
        raise AdapterError(
            f"The kernels were compiled for {found}, but rocm_build() was opened for {build.arch}.",
            f"Use the same arch in the target's mcpu and in rocm_build({found!r}).",
        )


def _link(build: RocmBuild, obj: bytes) -> bytearray:
    with tempfile.TemporaryDirectory(prefix="adapter-rocm-") as tmp:
        src, out = Path(tmp) / "kernels.o", Path(tmp) / "kernels.hsaco"
        src.write_bytes(obj)
        proc = subprocess.run(
            [*build.lld, "--no-undefined", "-shared", str(src), "-o", str(out)],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=600,
        )
        if proc.returncode != 0:
            message = (proc.stderr + proc.stdout).strip().replace("\x00", "")
            hint = LLD_HINT.format(version=build.code_object_version) if "unknown abi version" in message else None
            raise AdapterError(f"ld.lld {build.lld_version} failed to link the {build.arch} kernels: {message}", hint)
        data = out.read_bytes()
        _check_code_object(data, build, out)
    build.linked.append(data)
    return bytearray(data)


@contextlib.contextmanager
def rocm_build(arch: str, *, code_object_version: int = DEFAULT_CODE_OBJECT_VERSION) -> Iterator[RocmBuild]:
    """Make ``tvm.compile`` for a ``{"kind": "rocm", "mcpu": arch}`` target link on this machine.

    Inside the block TVM links the device libraries for ``arch`` plus the code-object version pin, and the
    link step runs the newest lld found (see the module docstring).  ``ROCM_PATH`` and both TVM callbacks
    are restored afterwards.  Blocks are serialized (the callbacks are process-global).

    Raises:
        BackendUnavailableError: TVM, the device libraries or a suitable lld is missing.
        AdapterError: an unknown arch or version, a failed link, or kernels built for another arch.
    """
    if code_object_version not in SUPPORTED_CODE_OBJECT_VERSIONS:
        raise AdapterError(
            f"Unsupported AMDGPU code object version {code_object_version}.",
            f"Use one of {', '.join(map(str, SUPPORTED_CODE_OBJECT_VERSIONS))}.",
        )
    _isa_version(arch)  # validates the name
    try:
        import tvm  # noqa: F401  (registers TVM's own callbacks first, so ours can override them)
        import tvm_ffi
    except ImportError as exc:
        raise BackendUnavailableError(
            f"Apache TVM is not installed ({exc}).", "pip install 'adapter[tvm]' (apache-tvm==0.27.0.post1)."
        ) from exc
    root = rocm_path()
    libraries = _bitcode_files(root, code_object_version)
    lld, lld_version = find_lld()
    minimum = {4: 1, 5: 15, 6: 18}[code_object_version]
    if lld_version < minimum:
        raise BackendUnavailableError(
            f"ld.lld {lld_version} ({' '.join(lld)}) cannot link AMDGPU code object v{code_object_version}.",
            LLD_HINT.format(version=code_object_version),
        )
    build = RocmBuild(arch, code_object_version, root, lld, lld_version, [])

    def link(obj: bytes) -> bytearray:
        try:
            return _link(build, bytes(obj))
        except AdapterError as exc:  # TVM turns it into a RuntimeError; re-raised as is below
            build.error = exc
            raise

    with _build_lock, tempfile.TemporaryDirectory(prefix="adapter-rocm-") as tmp:
        controls = Path(tmp) / f"controls_{arch}_v{code_object_version}.ll"
        controls.write_text(_controls_ir(arch, code_object_version))
        paths = [str(p) for p in libraries] + [str(controls)]
        previous = {
            name: tvm_ffi.get_global_func(name, allow_missing=True) for name in (LINK_CALLBACK, BITCODE_CALLBACK)
        }
        previous_env = os.environ.get("ROCM_PATH")
        os.environ["ROCM_PATH"] = str(root)
        tvm_ffi.register_global_func(LINK_CALLBACK, link, override=True)
        tvm_ffi.register_global_func(BITCODE_CALLBACK, lambda *_: list(paths), override=True)
        try:
            yield build
        except Exception as exc:
            if build.error is not None and build.error is not exc:
                raise build.error from exc
            raise
        finally:
            for name, func in previous.items():
                if func is None:
                    tvm_ffi.remove_global_func(name)
                else:
                    tvm_ffi.register_global_func(name, func, override=True)
            if previous_env is None:
                os.environ.pop("ROCM_PATH", None)
            else:
                os.environ["ROCM_PATH"] = previous_env


# ------------------------------------------------------------------------------------------------ code objects


def _device_modules(module) -> list:
    """Every ROCm device module in the import tree of ``module`` (depth first, each once)."""
    found, seen, stack = [], set(), [module]
    while stack:
        current = stack.pop()
        key = current.__chandle__() if hasattr(current, "__chandle__") else id(current)
        if key in seen:
            continue
        seen.add(key)
        if current.kind in DEVICE_MODULE_KINDS:
            found.append(current)
        stack.extend(reversed(list(current.imports)))
    return found


def _read_u64(blob: bytes, pos: int) -> tuple[int, int]:
    if pos + 8 > len(blob):
        raise AdapterError("The TVM module blob ends early; cannot extract the ROCm code objects.")
    return struct.unpack_from("<Q", blob, pos)[0], pos + 8


def _code_object_of(device_module) -> bytes:
    """Serialize one device module the way ``export_library`` does and take its code object out."""
    import tvm

    holder = tvm.get_global_func("runtime.SourceModuleCreate")("", "c")
    holder.import_module(device_module)
    blob = tvm.get_global_func("runtime.ModulePackImportsToTensor")(holder).numpy().tobytes()
    # <nbytes: u64> <indptr: vec<u64>> <children: vec<u64>> then per module <kind: str> [<payload: bytes>]
    _, pos = _read_u64(blob, 0)
    for _ in range(2):
        count, pos = _read_u64(blob, pos)
        pos += 8 * count
    while pos < len(blob):
        size, pos = _read_u64(blob, pos)
        kind, pos = blob[pos : pos + size].decode("utf-8", "replace"), pos + size
        if kind == "_lib":
            continue
        size, pos = _read_u64(blob, pos)
        payload, pos = blob[pos : pos + size], pos + size
        if kind not in DEVICE_MODULE_KINDS:
            continue
        # payload = <fmt: str> <function table> <data: bytes>; the data, last, is the code object.
        start = payload.find(ELF_MAGIC)
        while start >= 8:
            if struct.unpack_from("<Q", payload, start - 8)[0] == len(payload) - start:
                return payload[start:]
            start = payload.find(ELF_MAGIC, start + 1)
    raise AdapterError(f"No code object found in the serialized '{device_module.kind}' module.")


def save_code_objects(executable, folder: Path) -> list[str]:
    """Write every ROCm code object of a built executable to ``folder/kernels/rocm_<i>.hsaco``.

    Args:
        executable: what ``tvm.compile`` returned (or its runtime module).
        folder: where to write; ``kernels/`` is created under it.

    Returns:
        The files' names relative to ``folder`` (POSIX separators), in import-tree order; empty when the
        executable has no ROCm device module.
    """
    module = getattr(executable, "mod", executable)
    folder = Path(folder)
    names = []
    for index, device_module in enumerate(_device_modules(module)):
        data = _code_object_of(device_module)
        name = f"kernels/rocm_{index}.hsaco"
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        names.append(name)
    return names
