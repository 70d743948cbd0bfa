"""An emulated ARM64 machine for engines built for ARM boards (a Raspberry Pi 5 and the like).

The machine is an arm64 Debian bookworm root filesystem and QEMU's user-mode emulator:
programs run as ``qemu-aarch64 -L ROOTFS ROOTFS/usr/bin/python3 ...``, so neither
binfmt_misc nor chroot is needed (containers often have neither). The root filesystem is
built once and cached:

1. ``debootstrap --foreign --arch=arm64 --variant=minbase --include=python3`` resolves and
   downloads Debian's packages and unpacks the essential ones (its first stage);
2. the remaining packages (python3 and its libraries) are unpacked from the same ``.deb``
   files with the host's ``dpkg-deb``; no maintainer script has to run for Python to work,
   which is why debootstrap's second stage (it needs to execute arm64 programs through
   binfmt) is skipped;
3. the pinned aarch64 wheels (numpy, onnxruntime, apache-tvm) are fetched on the host with
   ``pip download --platform`` and unpacked into the root's ``dist-packages`` by
   ``pip install --target`` (no ARM code runs while installing);
4. ``/proc/cpuinfo`` is replaced by an ARM one: QEMU 7 passes the host's x86 file through,
   and ONNX Runtime's CPU detection crashes on it.

The build happens in a sibling temporary folder renamed into place at the end, under a
file lock, so a killed build leaves no half root filesystem and two processes never build
at once.
"""

from __future__ import annotations

__all__ = ["available", "ensure_rootfs", "default_rootfs", "run_artifact", "qemu_cpu", "SUITE", "WHEELS", "RUNNER", "CPU"]

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from adapter.core.artifact import cache_root
from adapter.core.errors import AdapterError

SUITE = "bookworm"
"""Debian release of the root filesystem (Raspberry Pi OS 12 is bookworm, Python 3.11)."""
MIRROR = "http://deb.debian.org/debian"
"""Default Debian mirror; ``$ADAPTER_ARM64_MIRROR`` overrides it."""
DEBS = ("python3",)
"""Debian packages on top of debootstrap's minimal base."""
WHEELS = ("numpy==2.4.6", "onnxruntime==1.32.0", "apache-tvm==0.27.0.post1")
"""aarch64 wheels installed into the root filesystem (their dependencies come along)."""
PLATFORM = ("manylinux_2_28_aarch64", "3.11", "cp", "cp311")
"""pip's --platform, --python-version, --implementation and --abi for bookworm's Python."""
LAYOUT = 1
"""Bumped when the way the root filesystem is built changes."""
STAMP = ".adapter-arm64.json"
"""File at the root recording what was built; its presence means the build finished."""
SITE = "usr/lib/python3/dist-packages"
"""Where the wheels go: on the default sys.path of Debian's python3 even with -I."""
PYTHON = "usr/bin/python3.11"
RUNNER = Path(__file__).with_name("_arm64_runner.py")
"""The standalone script run inside the emulated machine."""
CPU = "cortex-a76"
"""The core QEMU emulates by default: the Raspberry Pi 5's. QEMU's own default ("max") has
SVE, and ONNX Runtime 1.32's INT8 dynamic MatMul computes wrong results on it under
QEMU 7.2 (cosine 0.54 against numpy; right with sve=off) -- a Pi 5 has no SVE anyway."""
QEMU_CPUS = ("cortex-a35", "cortex-a53", "cortex-a57", "cortex-a72", "cortex-a76", "neoverse-n1", "a64fx", "max")
"""CPU models QEMU 7.2's qemu-aarch64 knows (``qemu-aarch64 -cpu help``)."""

_KINDS = ("ort", "tvm", "ort-generate")
_TAIL_LINES = 15


def _key() -> str:
    """Hash of everything that decides the root filesystem's contents."""
    blob = json.dumps({"suite": SUITE, "debs": DEBS, "wheels": WHEELS, "platform": PLATFORM, "layout": LAYOUT})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_rootfs() -> Path:
    """``$ADAPTER_ARM64_ROOTFS``, else ``<cache>/arm64/bookworm-<hash of the pinned versions>``."""
    env = os.environ.get("ADAPTER_ARM64_ROOTFS")
    if env:
        return Path(env).expanduser().absolute()
    return cache_root() / "arm64" / f"{SUITE}-{_key()}"


def _qemu() -> str | None:
    return shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")


def _debootstrap() -> str | None:
    return shutil.which("debootstrap") or next(
        (p for p in ("/usr/sbin/debootstrap", "/sbin/debootstrap") if os.access(p, os.X_OK)), None
    )


def _ready(root: Path) -> bool:
    """Whether ``root`` holds a finished build of the current pinned versions."""
    try:
        stamp = json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("key") == _key() and (root / PYTHON).is_file()


def available() -> str | None:
    """None when ARM64 programs can be run here, else the reason they cannot."""
    if _qemu() is None:
        return "qemu-aarch64 is not installed (Debian package qemu-user or qemu-user-static)"
    if _ready(default_rootfs()):
        return None
    missing = [tool for tool, found in (("debootstrap", _debootstrap()), ("dpkg-deb", shutil.which("dpkg-deb")))
               if found is None]
    if missing:
        return f"{' and '.join(missing)} not installed (needed to build the arm64 root filesystem)"
    if os.geteuid() != 0:
        return "building the arm64 root filesystem with debootstrap needs root"
    return None


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept)


def _die_with_parent() -> None:
    """In a child before exec: be killed when the process that started us dies (Linux prctl),
    so a killed build or run leaves no debootstrap, pip or emulator running on."""
    import ctypes
    import signal

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _run(cmd: list[str], what: str, hint: str, timeout: float = 3600, **kwargs: Any) -> str:
    """Run ``cmd``; raise AdapterError with its last output lines when it fails."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=_die_with_parent,
                              **kwargs)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise AdapterError(f"{what} did not finish within {timeout:.0f} s. Last output: {_tail(out)}.", hint) from exc
    except OSError as exc:
        raise AdapterError(f"{what} could not start ({cmd[0]}): {exc}.", hint) from exc
    if done.returncode != 0:
        raise AdapterError(
            f"{what} failed (exit {done.returncode}: {' '.join(cmd[:4])} ...). Last output: "
            f"{_tail(done.stdout + chr(10) + done.stderr)}.",
            hint,
        )
    return done.stdout


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (a killed debootstrap can leave /proc or /dev mounted)."""
    prefix = str(path.resolve())
    found = []
    with contextlib.suppress(OSError), open("/proc/self/mounts") as handle:
        for line in handle:
            point = line.split()[1].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def _remove_tree(path: Path) -> None:
    """Delete a (partial) root filesystem, unmounting anything left mounted in it first."""
    if not path.exists() and not path.is_symlink():
        return
    for point in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
    if _mounts_under(path):
        raise AdapterError(
            f"'{path}' still has file systems mounted in it ({', '.join(_mounts_under(path))}).",
            "Unmount them by hand, then delete the folder.",
        )
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if needed), held for the block."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cpuinfo(cores: int) -> str:
    """An arm64 /proc/cpuinfo describing ``cores`` Cortex-A76 cores (Raspberry Pi 5)."""
    block = (
        "processor\t: {n}\nBogoMIPS\t: 108.00\n"
        "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
        "asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\n"
        "CPU revision\t: 1\n"
    )
    return "\n".join(block.format(n=n) for n in range(cores))


def _write_cpuinfo(root: Path) -> None:
    """Give the root a real /proc folder with an ARM cpuinfo listing this host's cores.

    Under ``qemu-aarch64 -L`` a file that exists inside the root shadows the host's, and
    everything else in /proc (``/proc/self/...``) still comes from the host.
    """
    proc = root / "proc"
    if proc.is_symlink() or proc.is_file():
        proc.unlink()
    proc.mkdir(exist_ok=True)
    text = _cpuinfo(os.cpu_count() or 1)
    target = proc / "cpuinfo"
    with contextlib.suppress(OSError):
        if target.read_text() == text:
            return
    fd, tmp = tempfile.mkstemp(dir=proc, prefix=".cpuinfo.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)


def _unpack_base(root: Path, say: Callable[[str], Any]) -> int:
    """Unpack the packages debootstrap downloaded but left for its second stage."""
    base = (root / "debootstrap" / "base").read_text().split()
    paths = dict(line.split(maxsplit=1) for line in (root / "debootstrap" / "debpaths").read_text().splitlines() if line)
    count = 0
    for package in base:
        deb = root / paths[package].strip().lstrip("/")
        if not deb.is_file():
            raise AdapterError(f"debootstrap did not download the package '{package}' ({deb}).",
                               "Check the Debian mirror, then build again.")
        unpack = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        tar = subprocess.run(["tar", "--keep-directory-symlink", "-xf", "-", "-C", str(root)], stdin=unpack.stdout,
                             capture_output=True, text=True)
        unpack.stdout.close()
        err = unpack.stderr.read().decode(errors="replace")
        if unpack.wait() != 0 or tar.returncode != 0:
            raise AdapterError(f"Unpacking the arm64 package '{package}' failed: {_tail(err + tar.stderr)}",
                               "Check that dpkg-deb and GNU tar work on this host.")
        count += 1
    say(f"arm64: unpacked {count} packages over debootstrap's base")
    return count


def _python_env(home: Path) -> dict[str, str]:
    """A small, known environment for the emulated Python (nothing from the host's Python)."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(home), "TMPDIR": str(home),
            "OMP_NUM_THREADS": str(os.cpu_count() or 1)}


def qemu_cpu(core: str | None) -> str:
    """QEMU's CPU model for a profile's core name (its ``arch``); :data:`CPU` when unknown or None."""
    return core if core in QEMU_CPUS else CPU


def _emulated(root: Path, *args: str, cpu: str = CPU) -> list[str]:
    """The command line running arm64 Python inside ``root`` (isolated mode, no .pyc writes)."""
    return [_qemu() or "qemu-aarch64", "-cpu", cpu, "-L", str(root), str(root / PYTHON), "-I", "-B", *args]


def _build(build: Path, say: Callable[[str], Any]) -> dict[str, Any]:
    """Build a complete root filesystem in ``build`` (an empty or absent folder)."""
    started = time.monotonic()
    mirror = os.environ.get("ADAPTER_ARM64_MIRROR", MIRROR)
    hint = "Check network access to the Debian mirror (or set ADAPTER_ARM64_MIRROR), then build again."
    say(f"arm64: debootstrap {SUITE} (first stage) from {mirror}")
    _run([_debootstrap() or "debootstrap", "--foreign", "--arch=arm64", "--variant=minbase",
          f"--include={','.join(DEBS)}", SUITE, str(build), mirror], "debootstrap", hint)
    stage1 = time.monotonic()
    _unpack_base(build, say)
    _write_cpuinfo(build)
    shutil.rmtree(build / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    (build / "var" / "cache" / "apt" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    stage2 = time.monotonic()

    wheels = build / "tmp" / "adapter-wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    plat, pyver, impl, abi = PLATFORM
    target = ["--only-binary=:all:", "--platform", plat, "--python-version", pyver, "--implementation", impl,
              "--abi", abi]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    say(f"arm64: pip download {' '.join(WHEELS)} for {plat}")
    _run([*pip, "download", *target, "-d", str(wheels), *WHEELS], "pip download (aarch64 wheels)",
         "Check access to PyPI (or your pip index settings), then build again.")
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    say(f"arm64: pip install --target {SITE} ({len(files)} wheels)")
    _run([*pip, "install", "--no-deps", "--no-index", "--no-compile", "--upgrade", *target, "--target",
          str(build / SITE), *files], "pip install (aarch64 wheels into the root filesystem)",
         "Check free disk space, then build again.")
    shutil.rmtree(wheels)
    stage3 = time.monotonic()

    say("arm64: smoke test under qemu-aarch64")
    probe = ("import json, platform, numpy, onnxruntime, importlib.metadata as m;"
             "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(),"
             "'numpy': numpy.__version__, 'onnxruntime': onnxruntime.__version__,"
             "'apache-tvm': m.version('apache-tvm')}))")
    out = _run(_emulated(build, "-c", probe), "The smoke test of the arm64 root filesystem",
               "The emulator could not run the installed packages; see the output above.", timeout=600,
               env=_python_env(build / "tmp"), cwd=build / "tmp")
    found = json.loads(out.strip().splitlines()[-1])
    if found.get("machine") != "aarch64":
        raise AdapterError(f"The emulated Python reports machine '{found.get('machine')}', not aarch64.")
    done = time.monotonic()
    return {
        "key": _key(), "suite": SUITE, "debs": list(DEBS), "wheels": list(WHEELS),
        "installed": sorted(Path(f).name for f in files), "found": found, "mirror": mirror,
        "seconds": {"debootstrap": round(stage1 - started, 1), "unpack": round(stage2 - stage1, 1),
                    "wheels": round(stage3 - stage2, 1), "smoke_test": round(done - stage3, 1),
                    "total": round(done - started, 1)},
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def ensure_rootfs(root: Path | None = None, say: Callable[[str], Any] = print) -> Path:
    """Return an arm64 bookworm root filesystem with numpy/onnxruntime/apache-tvm, building it if needed.

    Args:
        root: Where it lives; default :func:`default_rootfs`. An existing folder built for
            other pinned versions is replaced.
        say: Progress messages (one line each).

    Raises:
        AdapterError: A tool is missing, or debootstrap, pip or the smoke test failed
            (with the failing command's last output lines).
    """
    root = Path(root).absolute() if root is not None else default_rootfs()
    if _ready(root):
        _write_cpuinfo(root)
        return root
    if _qemu() is None:
        raise AdapterError("Cannot build the arm64 root filesystem: qemu-aarch64 is not installed.",
                           "On Debian/Ubuntu: apt-get install qemu-user debootstrap.")
    if _debootstrap() is None or shutil.which("dpkg-deb") is None:
        raise AdapterError("Cannot build the arm64 root filesystem: debootstrap or dpkg-deb is missing.",
                           "On Debian/Ubuntu: apt-get install debootstrap.")
    if os.geteuid() != 0:
        raise AdapterError("Building the arm64 root filesystem with debootstrap needs root.",
                           f"Run once as root, or point ADAPTER_ARM64_ROOTFS at a built one (missing: {root}).")
    root.parent.mkdir(parents=True, exist_ok=True)
    with _lock(root.parent / f".{root.name}.lock"):
        if _ready(root):  # another process finished it while we waited
            _write_cpuinfo(root)
            return root
        for stale in root.parent.glob(f".{root.name}.build-*"):  # left by killed builds (we hold the lock)
            say(f"arm64: removing an unfinished build {stale.name}")
            _remove_tree(stale)
        build = Path(tempfile.mkdtemp(prefix=f".{root.name}.build-", dir=root.parent))
        try:
            say(f"arm64: building the root filesystem in {root} (takes a few minutes)")
            stamp = _build(build, say)
            (build / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
            old = None
            if root.exists() or root.is_symlink():  # built for other versions: swap it out
                old = root.parent / f".{root.name}.build-old-{os.getpid()}"
                os.replace(root, old)
            os.replace(build, root)
            if old is not None:
                _remove_tree(old)
        except BaseException:
            with contextlib.suppress(Exception):
                _remove_tree(build)
            raise
    say(f"arm64: root filesystem ready in {stamp['seconds']['total']} s ({stamp['seconds']})")
    return root


def _check_spec(folder: Path, spec: dict[str, Any], inputs: dict[str, np.ndarray]) -> None:
    if spec.get("kind") not in _KINDS:
        raise AdapterError(f"Unknown artifact kind '{spec.get('kind')}' for the arm64 runner.",
                           f"Use one of {', '.join(_KINDS)}.")
    model = Path(str(spec.get("model", "")))
    if not model.parts or model.is_absolute() or ".." in model.parts or not (folder / model).is_file():
        raise AdapterError(f"The model file '{spec.get('model')}' is not a file inside '{folder}'.",
                           "Give the engine's file relative to its folder.")
    missing = [name for name in spec.get("inputs", []) if name not in inputs]
    if missing:
        raise AdapterError(f"Inputs missing for the arm64 run: {', '.join(missing)}.",
                           f"Pass every input in spec['inputs'] ({', '.join(spec.get('inputs', []))}).")


def run_artifact(
    rootfs: Path,
    folder: Path,
    spec: dict[str, Any],
    inputs: dict[str, np.ndarray],
    timeout: float = 600,
    *,
    cpu: str = CPU,
    info: dict[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Run an engine folder inside the emulated ARM64 machine and return its outputs.

    Args:
        rootfs: A root filesystem from :func:`ensure_rootfs`.
        folder: The engine's folder (copied into the root's /tmp for the run).
        spec: ``{"kind": "ort" | "tvm" | "ort-generate", "model": file relative to folder,
            "inputs": names in call order, "outputs": names}``; ``ort-generate`` (a decoder,
            greedy) also takes ``"generate": {"past": names, "present": names, "cache":
            [kv_heads, head_dim], "steps": new tokens}`` and one input, the prompt's ids.
        inputs: Arrays by input name.
        timeout: Seconds before the emulator is killed.
        cpu: QEMU CPU model to emulate (one of :data:`QEMU_CPUS`); the Pi 5's core by default.
        info: When given, filled with what the runner reported about the machine it ran on
            (``machine``, ``uname``, ``python``, library versions, ``seconds``).

    Raises:
        AdapterError: Bad spec, the emulator missing, the run failing or timing out.
    """
    rootfs, folder = Path(rootfs).absolute(), Path(folder).absolute()
    if _qemu() is None:
        raise AdapterError("qemu-aarch64 is not installed.", "apt-get install qemu-user (Debian/Ubuntu).")
    if not (rootfs / PYTHON).is_file():
        raise AdapterError(f"'{rootfs}' is not an arm64 root filesystem with {PYTHON}.",
                           "Build one with adapter.backends._arm64.ensure_rootfs().")
    _check_spec(folder, spec, inputs)
    if cpu not in QEMU_CPUS:
        raise AdapterError(f"QEMU has no CPU model '{cpu}'.", f"Use one of {', '.join(QEMU_CPUS)}.")
    _write_cpuinfo(rootfs)
    names = list(spec["inputs"])
    work = Path(tempfile.mkdtemp(prefix="adapter-run-", dir=rootfs / "tmp"))
    try:
        shutil.copytree(folder, work / "engine", symlinks=False)
        np.savez(work / "inputs.npz", **{f"i{k}": np.asarray(inputs[name]) for k, name in enumerate(names)})
        job = {"kind": spec["kind"], "model": str(Path("engine") / spec["model"]), "inputs": names,
               "outputs": list(spec.get("outputs", [])), "generate": spec.get("generate")}
        (work / "job.json").write_text(json.dumps(job))
        shutil.copy2(RUNNER, work / "runner.py")
        cmd = _emulated(rootfs, str(work / "runner.py"), str(work), cpu=cpu)
        proc = subprocess.Popen(cmd, cwd=work, env=_python_env(work), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                preexec_fn=_die_with_parent)
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            os.killpg(proc.pid, 9)
            log, _ = proc.communicate()
            raise AdapterError(f"The arm64 run of '{folder.name}' did not finish within {timeout:.0f} s "
                               f"(emulation is slow). Last output: {_tail(log or '')}.",
                               "Raise the timeout or try a smaller input.") from exc
        machine_file = work / "machine.json"
        if info is not None and machine_file.is_file():
            info.update(json.loads(machine_file.read_text()), qemu_cpu=cpu)
        if proc.returncode != 0 or not (work / "out.npz").is_file():
            raise AdapterError(f"The arm64 run of '{folder.name}' failed (exit {proc.returncode}) under qemu-aarch64."
                               f" Last output: {_tail(log or '')}.",
                               "Check that the engine was built for aarch64 and the runtime version matches.")
        with np.load(work / "out.npz", allow_pickle=False) as data:
            arrays = [data[f"o{k}"] for k in range(len(data.files))]
        out_names = json.loads((work / "outputs.json").read_text())
        return dict(zip(out_names, arrays))
    finally:
        shutil.rmtree(work, ignore_errors=True)
