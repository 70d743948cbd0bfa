"""Run a sharded artifact with the standard launcher (torchrun, gloo on CPUs); ``adapter launch`` is its command.

One node: ``python -m torch.distributed.run`` starts ``--nproc`` workers (``adapter.runtime.worker``)
with a c10d rendezvous on 127.0.0.1 (or the local address given with ``--master-addr``) and
no restarts; it runs in its own session, and whatever it started is stopped when it returns,
fails or is interrupted. Several nodes: the exact torchrun command for each node is printed,
nothing is launched.

Security: the rendezvous stores and gloo's sockets have no authentication. The rendezvous
endpoint is 127.0.0.1 and gloo's sockets are bound to loopback (``GLOO_SOCKET_IFNAME=lo``),
but torch's TCPStore servers listen on every interface whatever address they are given, so a
one-node run goes into a network namespace of its own (``unshare --net``, loopback only) when
this machine allows it — nothing outside can reach its sockets; otherwise the report says the
stores were reachable (``ADAPTER_LAUNCH_NETNS=0`` turns the namespace off). A multi-node run
needs an address on a network the nodes share, named explicitly. Inputs are read with
``allow_pickle=False`` and tensors travel as raw bytes: nothing is unpickled.
"""

from __future__ import annotations

__all__ = ["DEFAULT_PORT", "check_sharded", "is_loopback", "run_sharded", "torchrun_command", "random_inputs"]

import contextlib
import errno
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from adapter.core.artifact import validate
from adapter.core.errors import AdapterError, ArtifactError
from adapter.core.specs import Dim, TensorSpec
from adapter.runtime.sharded import load_inputs, rank_label, read_sharded, save_outputs

DEFAULT_PORT = 29500
"""Rendezvous port printed in multi-node commands when none is given."""


# --------------------------------------------------------------------------- inputs


def random_inputs(manifest: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs matching the manifest's specs: floats ~N(0,1), integers in [0, 100) (token ids), masks of ones."""
    rng = np.random.default_rng(seed)
    sizes: dict[str, int] = {}
    batch_axis = manifest.get("batch_axis", {})
    feed = {}
    for spec in (TensorSpec.from_json(s) for s in manifest["inputs"]):
        shape = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, Dim):
                wanted = max(int(manifest.get("microbatches", 1)), 2) if batch_axis.get(spec.name) == axis else 8
                shape.append(sizes.setdefault(dim.name, max(dim.min, min(wanted, dim.max))))
            else:
                shape.append(dim)
        dtype = np.dtype(spec.dtype)
        if "mask" in spec.name.lower() or dtype == np.bool_:
            feed[spec.name] = np.ones(shape, dtype=dtype)
        elif np.issubdtype(dtype, np.integer):
            feed[spec.name] = rng.integers(0, 100, size=shape).astype(dtype)
        else:
            feed[spec.name] = rng.standard_normal(shape).astype(dtype)
    return feed


# --------------------------------------------------------------------------- rendezvous


def _check_address(addr: str, port: int) -> int:
    """Bind ``addr:port`` once to see that it is this machine's and free; return the port (a free one for 0).

    Raises:
        AdapterError: The address is not this machine's, or the port is in use.
    """
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise AdapterError(f"Cannot resolve the master address '{addr}': {exc.strerror}.",
                           "Give an IP address of this machine, e.g. --master-addr 127.0.0.1.") from exc
    family, _, _, _, where = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(where)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AdapterError(f"Port {port} on {addr} is already in use, so the rendezvous cannot listen there.",
                                   "Choose another --master-port, or leave it out to take a free one.") from exc
            if exc.errno == errno.EADDRNOTAVAIL:
                raise AdapterError(f"The master address '{addr}' is not an address of this machine, so a one-node "
                                   "run cannot host the rendezvous there.",
                                   "Use 127.0.0.1 (the default) or one of this machine's addresses.") from exc
            raise AdapterError(f"Cannot listen on {addr}:{port}: {exc.strerror}.") from exc
        return probe.getsockname()[1]


def is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(addr)).is_loopback
    except (OSError, ValueError):
        return False


_LOOPBACK_UP = (
    "import fcntl, os, socket, struct, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "flags = struct.unpack('16sH22x', fcntl.ioctl(s, 0x8913, struct.pack('16sH22x', b'lo', 0)))[1]\n"
    "fcntl.ioctl(s, 0x8914, struct.pack('16sH22x', b'lo', flags | 1))\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)
"""Run inside the new namespace: bring its loopback up (SIOCGIFFLAGS / SIOCSIFFLAGS, IFF_UP), then exec the command."""


def _private_network() -> list[str] | None:
    """The ``unshare`` prefix that runs a command in a network namespace of its own (loopback only), if allowed here.

    torch's TCPStore servers (the rendezvous store and the agent's store) listen on every interface whatever
    address they are given; inside a private network namespace there is no interface but loopback to reach them.
    """
    import shutil

    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    prefix = [unshare, "--net", "--map-root-user"] if os.geteuid() else [unshare, "--net"]
    prefix += ["--", sys.executable, "-c", _LOOPBACK_UP]
    try:
        probe = subprocess.run([*prefix, sys.executable, "-c", "pass"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return prefix if probe.returncode == 0 else None


def torchrun_command(
    artifact: Path, nproc: int, inputs: Path, output: Path, timeout: float, *, nnodes: int = 1, node_rank: int = 0,
    master_addr: str = "127.0.0.1", master_port: int = DEFAULT_PORT, report_dir: Path | None = None,
    worker: tuple[str, str] = ("adapter.runtime.worker", "--inputs"),
) -> list[str]:
    """The torchrun command line for one node (``python -m torch.distributed.run``).

    ``worker`` is the rank's module and the option that names its input file (a generation
    worker takes ``--request``).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", str(nnodes),
           "--max-restarts", "0", "--monitor-interval", "0.1", "--shutdown-timeout", "5"]  # fmt: skip
    if nnodes == 1:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{master_addr}:{master_port}", "--local-addr", master_addr,
                "--rdzv-conf", f"join_timeout={int(timeout)},read_timeout={int(timeout)}"]  # fmt: skip
    else:  # static rendezvous: node R holds ranks R*nproc .. R*nproc+nproc-1, so tensor-parallel groups stay on a node
        cmd += ["--node-rank", str(node_rank), "--master-addr", master_addr, "--master-port", str(master_port)]
    cmd += ["-m", worker[0], str(artifact), worker[1], str(inputs), "--output", str(output),
            "--timeout", f"{timeout:g}"]  # fmt: skip
    if report_dir is not None:
        cmd += ["--report-dir", str(report_dir)]
    return cmd


# --------------------------------------------------------------------------- processes


def _children() -> dict[int, list[int]]:
    """Parent pid → child pids, from /proc."""
    table: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            table.setdefault(ppid, []).append(int(entry.name))
    return table


def _descendants(pid: int) -> set[int]:
    table, found, todo = _children(), set(), [pid]
    while todo:
        for child in table.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def _stop(pids: set[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _die_with_parent() -> None:
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Lines:
    """Complete lines appended to a log since the last read, for ``on_line``."""

    def __init__(self, path: Path, on_line: Callable[[str], None] | None) -> None:
        self.path, self.on_line, self.offset, self.rest = path, on_line, 0, b""

    def __call__(self) -> None:
        if self.on_line is None:
            return
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        self.offset += len(data)
        *lines, self.rest = (self.rest + data).split(b"\n")
        for line in lines:
            self.on_line(line.decode(errors="replace"))


def _run_torchrun(
    cmd: list[str], env: dict[str, str], log: Path, on_line: Callable[[str], None] | None = None
) -> tuple[int, float, int]:
    """Run torchrun in its own session; return (exit code, seconds, processes left over and killed).

    ``on_line`` is called with each line of its output as it comes (streamed tokens).
    """
    started = time.perf_counter()
    seen: set[int] = set()
    follow = _Lines(log, on_line)
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip
        try:
            while proc.poll() is None:
                seen |= _descendants(proc.pid)  # workers run in sessions of their own: track them by parentage
                follow()
                time.sleep(0.05 if on_line else 0.2)
            follow()
        except BaseException:  # Ctrl-C or any other way out: stop the agent, then its workers
            seen |= _descendants(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            _stop({p for p in seen if _alive(p)}, signal.SIGKILL)
            raise
    elapsed = time.perf_counter() - started
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything left in torchrun's own group
    left = {p for p in seen if _alive(p)}
    _stop(left, signal.SIGKILL)
    return proc.returncode, elapsed, len(left)


# --------------------------------------------------------------------------- results


def _torchrun_failures(log_text: str) -> dict[int, str]:
    """Ranks torchrun lists as failed, with how they ended (``exit code 1`` / ``killed by SIGKILL``)."""
    found = {}
    for rank, code in re.findall(r"rank\s*:\s*(\d+)\s*\(local_rank[^\n]*\n\s*exitcode\s*:\s*(-?\d+)", log_text):
        code = int(code)
        if code < 0:
            with contextlib.suppress(ValueError):
                found[int(rank)] = f"killed by {signal.Signals(-code).name}"
                continue
        found[int(rank)] = f"exit code {code}"
    return found


def _failure_message(manifest: dict[str, Any], reports: dict[int, dict[str, Any]], log_text: str, code: int,
                     elapsed: float, log: Path) -> str:  # fmt: skip
    world = int(manifest["world_size"])
    failed = {r: d for r, d in reports.items() if not d.get("ok")}
    ended = _torchrun_failures(log_text)
    waited = sorted({w for d in failed.values() for w in d.get("waited_for", []) if w not in failed})
    parts = []
    # root causes first: a rank's own error, then ranks that ended without a word, then the ranks that gave up waiting
    parts += [d["error"] for d in failed.values() if d.get("kind") == "error"]
    for rank in range(world):
        if rank in reports:
            continue
        how = ended.get(rank)
        if rank in waited and how in (None, "killed by SIGTERM"):  # the agent's stop signal: it had hung
            parts.append(f"{rank_label(manifest, rank)} stopped responding (the others waited for it) and was "
                         "stopped by torchrun")  # fmt: skip
        elif how and how != "killed by SIGTERM":
            parts.append(f"{rank_label(manifest, rank)} died ({how}) without a report")
    parts += [d["error"].rstrip(".") for d in failed.values() if d.get("kind") != "error"]
    if not parts:
        lines = [line for line in log_text.splitlines() if line.strip()]
        parts.append(f"torchrun exited with code {code} before any rank reported: "
                     f"{lines[-1][:300] if lines else 'no output'}")  # fmt: skip
    text = "; ".join(p.rstrip(".") for p in parts)
    return (f"The sharded run failed: {text}. Every process had exited {elapsed:.1f} s after the launch; "
            f"no output was written. torchrun's log: {log}.")


def run_sharded(
    artifact: Path, nproc: int, inputs: Path | None = None, output: Path | None = None, timeout: float = 60.0,
    master_addr: str = "127.0.0.1", master_port: int | None = None, env: dict[str, str] | None = None,
    request: dict[str, Any] | None = None, worker: str = "adapter.runtime.worker",
    on_line: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run a sharded artifact on this machine under torchrun.

    With ``request`` (a JSON object) the ranks run ``worker``'s module with ``--request`` instead
    of a forward pass over ``inputs``, and rank 0's JSON answer comes back under ``"result"``;
    ``on_line`` sees the run's output lines as they come.

    Returns:
        ``{"outputs": {name: array}, "ranks": [per-rank report], "seconds": launch to exit, "leftover": 0}``.

    Raises:
        ArtifactError: Not a sharded artifact, or ``nproc`` differs from its world size.
        InputMismatchError: The inputs do not match the artifact's input specs.
        AdapterError: Bad rendezvous settings, or a rank failed (the message names it and its stage).
    """
    artifact = Path(artifact).resolve()
    manifest = check_sharded(artifact, nproc, 1)
    port = _check_address(master_addr, master_port or 0)
    rundir = Path(tempfile.mkdtemp(prefix="adapter-launch-"))  # private (0700)
    keep = False
    try:
        entry = (worker, "--inputs")
        if request is not None:
            inputs = rundir / "request.json"
            inputs.write_text(json.dumps(request))
            entry = (worker, "--request")
        elif inputs is None:
            inputs = rundir / "inputs.npz"
            save_outputs(inputs, random_inputs(manifest))
        else:
            inputs = Path(inputs).resolve()
            load_inputs(inputs, manifest)  # a clear error here, before any process starts
        target = rundir / "result.json" if request is not None else (
            Path(output).resolve() if output else rundir / "outputs.npz")  # fmt: skip
        reports_dir = rundir / "ranks"
        reports_dir.mkdir()
        cmd = torchrun_command(artifact, nproc, inputs, target, timeout, master_addr=master_addr, master_port=port,
                               report_dir=reports_dir, worker=entry)  # fmt: skip
        env = dict(os.environ if env is None else env)
        network = "host"
        if is_loopback(master_addr):
            env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's peer sockets on loopback too, not every interface
            prefix = _private_network() if env.get("ADAPTER_LAUNCH_NETNS", "1") != "0" else None
            if prefix:  # the loopback of a network namespace of its own: nothing outside can reach the stores
                cmd = [*prefix, *cmd]
                network = "private namespace (loopback only)"
            else:
                network = "host loopback (torch's TCPStore servers still listen on every interface)"
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONUNBUFFERED"] = "1"
        log = rundir / "torchrun.log"
        code, elapsed, leftover = _run_torchrun(cmd, env, log, on_line)
        reports = {}
        for path in reports_dir.glob("rank*.json"):
            with contextlib.suppress(OSError, json.JSONDecodeError):
                data = json.loads(path.read_text())
                reports[int(data["rank"])] = data
        ok = code == 0 and len(reports) == nproc and all(d.get("ok") for d in reports.values()) and target.is_file()
        if not ok:
            keep = True
            log_text = log.read_text(errors="replace")
            raise AdapterError(_failure_message(manifest, reports, log_text, code, elapsed, log))
        outputs: dict[str, Any] = {}
        result = None
        if request is not None:
            result = json.loads(target.read_text())
        else:
            with np.load(target, allow_pickle=False) as data:
                outputs = {name: data[name] for name in data.files}
        return {"outputs": outputs, "result": result, "ranks": [reports[r] for r in sorted(reports)], "seconds": round(elapsed, 3),
                "leftover": leftover, "output": str(output) if output else None, "network": network}  # fmt: skip
    finally:
        if not keep:
            import shutil

            shutil.rmtree(rundir, ignore_errors=True)


def check_sharded(artifact: Path, nproc: int, nnodes: int) -> dict[str, Any]:
    manifest = read_sharded(artifact)
    if "format_version" in manifest and "files" in manifest:
        validate(artifact)
    world = int(manifest["world_size"])
    if nproc < 1 or nnodes < 1 or nproc * nnodes != world:
        raise ArtifactError(
            f"'{artifact}' is sharded over {world} ranks (tp {manifest.get('tp', 1)} x pp {manifest.get('pp', 1)}), "
            f"but --nproc {nproc} x --nnodes {nnodes} gives {nproc * nnodes} processes; nothing was launched.",
            f"Use --nproc {world}" + (f" / --nnodes so that nproc x nnodes = {world}." if nnodes > 1 else "."),
        )
    return manifest
