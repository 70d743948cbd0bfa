"""``adapter launch``: run a sharded artifact with the standard launcher (torchrun, gloo on CPUs).

One node: ``python -m torch.distributed.run`` starts ``--nproc`` workers (``adapter.distributed``)
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

__all__ = ["launch", "run_sharded", "torchrun_command", "random_inputs"]

import contextlib
import errno
import ipaddress
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from adapter.errors import AdapterError, ArtifactError

DEFAULT_PORT = 29500
"""Rendezvous port printed in multi-node commands when none is given."""


# --------------------------------------------------------------------------- inputs


def random_inputs(manifest: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs matching the manifest's specs: floats ~N(0,1), integers in [0, 100) (token ids), masks of ones."""
    from adapter.specs import Dim, TensorSpec

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


def _is_loopback(addr: str) -> bool:
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
) -> list[str]:
    """The torchrun command line for one node (``python -m torch.distributed.run``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", str(nnodes),
           "--max-restarts", "0", "--monitor-interval", "0.1", "--shutdown-timeout", "5"]  # fmt: skip
    if nnodes == 1:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{master_addr}:{master_port}", "--local-addr", master_addr,
                "--rdzv-conf", f"join_timeout={int(timeout)},read_timeout={int(timeout)}"]  # fmt: skip
    else:  # static rendezvous: node R holds ranks R*nproc .. R*nproc+nproc-1, so tensor-parallel groups stay on a node
        cmd += ["--node-rank", str(node_rank), "--master-addr", master_addr, "--master-port", str(master_port)]
    cmd += ["-m", "adapter.distributed", str(artifact), "--inputs", str(inputs), "--output", str(output),
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


def _run_torchrun(cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, float, int]:
    """Run torchrun in its own session; return (exit code, seconds, processes left over and killed)."""
    started = time.perf_counter()
    seen: set[int] = set()
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip
        try:
            while proc.poll() is None:
                seen |= _descendants(proc.pid)  # workers run in sessions of their own: track them by parentage
                time.sleep(0.2)
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
    from adapter.distributed import rank_label

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


def _render(reports: list[dict[str, Any]], outputs: dict[str, np.ndarray], output: Path | None, elapsed: float,
            network: str):  # fmt: skip
    from rich.table import Table

    from adapter.cli import out

    table = Table(title=f"Ranks ({elapsed:.1f} s from launch to exit)", title_justify="left")
    for column in ("rank", "stage", "tp", "microbatches", "wall s", "load s", "engine s", "comm s", "weights MB",
                   "peak RSS MB"):  # fmt: skip
        table.add_column(column, justify="right")
    for r in reports:
        weights = "" if r.get("weights_bytes") is None else f"{r['weights_bytes'] / 1e6:.2f}"
        table.add_row(str(r["rank"]), str(r["stage"]), str(r["tp_rank"]), str(r["microbatches"]), f"{r['wall_s']:.3f}",
                      f"{r['load_s']:.3f}", f"{r['engine_s']:.3f}", f"{r['comm_s']:.3f}", weights,
                      f"{r['peak_rss_bytes'] / 1e6:.0f}")  # fmt: skip
    out.print(table)
    shapes = ", ".join(f"{n}: {v.dtype}{list(v.shape)}" for n, v in outputs.items())
    out.print(f"outputs {shapes}" + (f" written to {output}" if output else ""))
    out.print(f"rendezvous network: {network}")


def run_sharded(
    artifact: Path, nproc: int, inputs: Path | None = None, output: Path | None = None, timeout: float = 60.0,
    master_addr: str = "127.0.0.1", master_port: int | None = None, env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run a sharded artifact on this machine under torchrun.

    Returns:
        ``{"outputs": {name: array}, "ranks": [per-rank report], "seconds": launch to exit, "leftover": 0}``.

    Raises:
        ArtifactError: Not a sharded artifact, or ``nproc`` differs from its world size.
        InputMismatchError: The inputs do not match the artifact's input specs.
        AdapterError: Bad rendezvous settings, or a rank failed (the message names it and its stage).
    """
    from adapter.distributed import load_inputs, save_outputs

    artifact = Path(artifact).resolve()
    manifest = _check(artifact, nproc, 1)
    port = _check_address(master_addr, master_port or 0)
    rundir = Path(tempfile.mkdtemp(prefix="adapter-launch-"))  # private (0700)
    keep = False
    try:
        if inputs is None:
            inputs = rundir / "inputs.npz"
            save_outputs(inputs, random_inputs(manifest))
        else:
            inputs = Path(inputs).resolve()
            load_inputs(inputs, manifest)  # a clear error here, before any process starts
        target = Path(output).resolve() if output else rundir / "outputs.npz"
        reports_dir = rundir / "ranks"
        reports_dir.mkdir()
        cmd = torchrun_command(artifact, nproc, inputs, target, timeout, master_addr=master_addr, master_port=port,
                               report_dir=reports_dir)  # fmt: skip
        env = dict(os.environ if env is None else env)
        network = "host"
        if _is_loopback(master_addr):
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
        code, elapsed, leftover = _run_torchrun(cmd, env, log)
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
        with np.load(target, allow_pickle=False) as data:
            outputs = {name: data[name] for name in data.files}
        return {"outputs": outputs, "ranks": [reports[r] for r in sorted(reports)], "seconds": round(elapsed, 3),
                "leftover": leftover, "output": str(output) if output else None, "network": network}  # fmt: skip
    finally:
        if not keep:
            import shutil

            shutil.rmtree(rundir, ignore_errors=True)


def _check(artifact: Path, nproc: int, nnodes: int) -> dict[str, Any]:
    from adapter.distributed import read_sharded

    manifest = read_sharded(artifact)
    if "format_version" in manifest and "files" in manifest:
        from adapter.artifact import validate

        validate(artifact)
    world = int(manifest["world_size"])
    if nproc < 1 or nnodes < 1 or nproc * nnodes != world:
        raise ArtifactError(
            f"'{artifact}' is sharded over {world} ranks (tp {manifest.get('tp', 1)} x pp {manifest.get('pp', 1)}), "
            f"but --nproc {nproc} x --nnodes {nnodes} gives {nproc * nnodes} processes; nothing was launched.",
            f"Use --nproc {world}" + (f" / --nnodes so that nproc x nnodes = {world}." if nnodes > 1 else "."),
        )
    return manifest


@click.command("launch")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--nproc", type=int, required=True, help="Processes on this node (ranks per node).")
@click.option("--inputs", type=click.Path(path_type=Path), default=None, help="Model inputs (.npz); default: random.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Write the outputs here (.npz).")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds any rank may wait for another before the whole run is stopped.")  # fmt: skip
@click.option("--nnodes", type=int, default=1, show_default=True, help="Nodes; above 1, print each node's command.")
@click.option("--node-rank", type=int, default=None, help="With --nnodes: print only this node's command.")
@click.option("--master-addr", default="127.0.0.1", show_default=True,
              help="Rendezvous address (unauthenticated: loopback unless the nodes need a shared network).")  # fmt: skip
@click.option("--master-port", type=int, default=None, help="Rendezvous port; default: a free one (29500 multi-node).")
@click.option("--json", "as_json", is_flag=True, help="Print the per-rank reports as JSON.")
def launch(artifact, nproc, inputs, output, timeout, nnodes, node_rank, master_addr, master_port, as_json):
    """Run a sharded ARTIFACT with torchrun: NPROC processes, gloo on CPUs.

    Every wait between ranks obeys --timeout: a rank that dies or hangs stops the whole run
    with a message naming it and its stage. Prints per-rank wall time, engine and
    communication time, weight bytes and peak memory.

    \b
    Examples:
      adapter launch gpt2-tp2 --nproc 2 --inputs ids.npz --output logits.npz
      adapter launch gpt2-tp2pp2 --nproc 2 --nnodes 2 --master-addr 10.0.0.1
    """
    if timeout <= 0:
        raise click.BadParameter("must be positive", param_hint="--timeout")
    if nnodes > 1:
        _print_commands(artifact, nproc, inputs, output, timeout, nnodes, node_rank, master_addr, master_port)
        return
    result = run_sharded(artifact, nproc, inputs, output, timeout, master_addr, master_port)
    if as_json:
        click.echo(json.dumps({k: v for k, v in result.items() if k != "outputs"}, indent=2))
        return
    _render(result["ranks"], result["outputs"], output, result["seconds"], result["network"])


def _print_commands(artifact, nproc, inputs, output, timeout, nnodes, node_rank, master_addr, master_port) -> None:
    artifact = Path(artifact).resolve()
    manifest = _check(artifact, nproc, nnodes)
    if _is_loopback(master_addr):
        raise AdapterError(
            f"A {nnodes}-node run needs the rendezvous on an address the other nodes reach, not '{master_addr}'.",
            "Give --master-addr: node 0's address on the network the nodes share (the rendezvous has no "
            "authentication, so keep that network private).",
        )
    if node_rank is not None and not 0 <= node_rank < nnodes:
        raise click.BadParameter(f"must be in 0..{nnodes - 1}", param_hint="--node-rank")
    if inputs is None:
        raise click.UsageError("A multi-node run needs --inputs (the same .npz path on every node).")
    target = output or Path("outputs.npz")
    click.echo(f"# {manifest['world_size']} ranks: {nnodes} nodes x {nproc} processes. Run on each node, with the "
               f"artifact and the inputs at the same paths; set GLOO_SOCKET_IFNAME to the shared interface.")  # fmt: skip
    for r in range(nnodes) if node_rank is None else [node_rank]:
        cmd = torchrun_command(artifact, nproc, Path(inputs), Path(target), timeout, nnodes=nnodes, node_rank=r,
                               master_addr=master_addr, master_port=master_port or DEFAULT_PORT)  # fmt: skip
        cmd[:3] = ["torchrun"]
        click.echo(f"# node {r}\n{shlex.join(cmd)}")

