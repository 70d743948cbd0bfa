"""The sharded runtime: one worker per rank, started by ``torchrun`` (``adapter launch`` does it).

``python -m adapter.runtime.worker ARTIFACT --inputs in.npz --output out.npz [--timeout 60]``

Each rank reads the artifact's ``manifest.json`` (``kind: sharded``), loads the engines of its
``run`` steps and runs a GPipe schedule: the inputs are split into microbatches along their
``batch_axis``; stage 0 starts each microbatch from its slice of the inputs, later stages from
what the previous stage sends; ``all_reduce`` / ``all_gather`` steps go over the rank's
tensor-parallel group; the last stage's tensor-parallel rank 0 concatenates the microbatches'
outputs and writes them (temp file, then rename). Point-to-point messages carry a fixed-size
int64 header (value count, then per value a dtype code, its rank and dims) and one byte payload,
so no stage needs to know the shapes in advance. Nothing is unpickled: inputs are read with
``allow_pickle=False`` and tensors travel as raw bytes described by the header.

Faults: every blocking wait (process-group set-up, receive, collective, the final barrier)
obeys ``--timeout``; a rank that times out or loses a peer writes a report naming itself and
the rank and stage it waited for, and exits non-zero; torchrun's agent then stops the others.
Workers die with their agent (``PR_SET_PDEATHSIG``), so none outlive it.

Test hook: ``ADAPTER_FAULT="die:rank=1,at=step2"`` makes rank 1 kill itself (SIGKILL) before its
step 2; ``"hang:rank=1"`` makes it sleep forever instead. ``at`` is ``init`` (before the process
group forms), ``step<i>`` (before step *i*, default ``step0``) or ``end`` (before the final
barrier); ``mb=<k>`` picks the microbatch (default 0). It is a test hook, not a feature.
"""

from __future__ import annotations

__all__ = ["Job", "RankFailure", "add_common_arguments", "main", "run_rank"]

import argparse
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from adapter.backends import BACKENDS, DEFAULT, get_backend
from adapter.core.errors import AdapterError
from adapter.core.mapped import peak_rss_bytes
from adapter.core.specs import TensorSpec
from adapter.runtime.sharded import (
    FAULT_ENV,
    Fault,
    load_inputs,
    microbatch_count,
    parse_fault,
    peers_label,
    rank_label,
    read_sharded,
    save_outputs,
    split_microbatches,
    weights_bytes,
)

DTYPES = (
    "float32", "float16", "float64", "int64", "int32", "int16", "int8",
    "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128",
)  # fmt: skip
"""Dtype codes of the point-to-point header (index in this tuple)."""
MAX_RANK = 8
"""Most dims a value sent between stages may have (the header has a slot per dim)."""


class RankFailure(AdapterError):
    """A rank failed; ``waited_for`` names the ranks it was waiting for when it gave up."""

    def __init__(self, message: str, kind: str = "error", waited_for: list[int] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.waited_for = list(waited_for or [])


# --------------------------------------------------------------------------- the rank


def _timed_out(exc: BaseException) -> bool:
    return bool(re.search(r"timed? ?out|timeout|deadline|failed to pass monitoredBarrier", str(exc), re.IGNORECASE))


def _first_line(exc: BaseException) -> str:
    """The gist of an error: its last line, without gloo's source location and boilerplate advice."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = re.sub(r"\[[^\]\s]*\.(?:cc|cpp|h):\d+\]\s*", "", lines[-1])
    return re.split(r"\. This is (?:typically|likely)", text)[0].strip()[:300]


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when its torchrun agent dies."""
    import contextlib
    import ctypes

    parent = os.getppid()
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the agent died before the request took effect
        os._exit(1)


class _Rank:
    """One rank of a sharded run: engines, groups, schedule and the report."""

    def __init__(self, folder: Path, manifest: dict[str, Any], rank: int, timeout: float, fault: Fault | None):
        self.folder = folder
        self.manifest = manifest
        self.rank = rank
        self.spec = manifest["ranks"][rank]
        self.timeout = timeout
        self.delta = timedelta(seconds=timeout)
        self.fault = fault
        self.label = rank_label(manifest, rank)
        self.engine_s = 0.0
        self.comm_s = 0.0
        self.load_s = 0.0
        self.groups: dict[tuple[int, ...], Any] = {}
        self.engines: list[Any] = []
        self.device = "cpu"
        self.microbatches = 0

    # -- set-up

    def wants_gpu(self) -> bool:
        import torch

        gpu_backends = {name for name, backend in BACKENDS.items() if backend.DEVICE == "gpu"}
        for step in self.spec.get("steps", []):
            engine = step.get("engine") or {}
            provider = str(engine.get("config", {}).get("provider", ""))
            if engine.get("backend") in gpu_backends or "CUDA" in provider or "ROCM" in provider:
                return torch.cuda.is_available()
        return False

    def init_group(self) -> None:
        import torch.distributed as dist

        if self.fault:
            self.fault.hit(self.rank, "init")
        backend = "gloo"
        if self.wants_gpu():  # GPU engines: NCCL, with its watchdog bounded by the same timeout
            import torch

            backend = "nccl"
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
            os.environ.setdefault("TORCH_NCCL_ENABLE_MONITORING", "1")
            os.environ.setdefault("TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", str(int(self.timeout) + 10))
            self.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(self.device)
        started = time.perf_counter()
        try:
            dist.init_process_group(backend, timeout=self.delta)
            # every rank creates every group, in the same order (first appearance in rank order)
            for spec in self.manifest["ranks"]:
                members = tuple(spec.get("tp_group", [spec["rank"]]))
                if len(members) > 1 and members not in self.groups:
                    self.groups[members] = dist.new_group(list(members), timeout=self.delta)
            # barriers go over gloo even when the data goes over NCCL (monitored_barrier is gloo-only)
            self.control = dist.new_group(backend="gloo", timeout=self.delta) if backend == "nccl" else None
        except Exception as exc:
            raise self._comm_failure(exc, "forming the process group", list(range(self.world))) from exc
        self.comm_s += time.perf_counter() - started

    @property
    def world(self) -> int:
        return int(self.manifest["world_size"])

    def load_engines(self) -> None:
        started = time.perf_counter()
        for step in self.spec.get("steps", []):
            if step["op"] != "run":
                self.engines.append(None)
                continue
            engine = step["engine"]
            module = get_backend(engine.get("backend") or self.manifest.get("backend", DEFAULT))
            inputs = [TensorSpec.from_json(s) for s in engine["inputs"]]
            outputs = [TensorSpec.from_json(s) for s in engine["outputs"]]
            self.engines.append(
                module.Engine(self.folder / engine["folder"], inputs, outputs, engine.get("config", {}))
            )
        self.load_s = time.perf_counter() - started

    # -- communication

    def _comm_failure(self, exc: BaseException, what: str, peers: list[int]) -> RankFailure:
        others = [p for p in peers if p != self.rank]
        ranks = re.search(r"Ranks? ([\d, ]+) failed to pass", str(exc))
        who = peers_label(self.manifest, others)
        if ranks:  # monitored_barrier names the ranks that never arrived
            others = [int(r) for r in re.findall(r"\d+", ranks.group(1))]
            who = peers_label(self.manifest, others)
        elif len(others) > 1:
            who = f"at least one of {who}"
        if _timed_out(exc):
            return RankFailure(f"{self.label}: no data from {who} within {self.timeout:g} s ({what}).",
                               "timeout", others)  # fmt: skip
        return RankFailure(f"{self.label}: lost the connection to {who} ({what}): {_first_line(exc)}; "
                           "that rank has probably died.", "lost", others)  # fmt: skip

    def _wait(self, work, what: str, peers: list[int]) -> None:
        started = time.perf_counter()
        try:
            work.wait(self.delta)
        except Exception as exc:
            raise self._comm_failure(exc, what, peers) from exc
        finally:
            self.comm_s += time.perf_counter() - started

    def _tensor(self, array: np.ndarray):
        import torch

        tensor = torch.from_numpy(np.array(array, copy=True, order="C"))
        return tensor if self.device == "cpu" else tensor.to(self.device)

    def _numpy(self, tensor) -> np.ndarray:
        return tensor.cpu().numpy() if self.device != "cpu" else tensor.numpy()

    def send(self, env: dict[str, np.ndarray], k: int) -> list[tuple[Any, Any]]:
        """Start sending microbatch ``k``'s ``send`` values; return the pending works (with their buffers)."""
        import torch
        import torch.distributed as dist

        names = self.spec.get("send", [])
        header = np.full(1 + len(names) * (2 + MAX_RANK), -1, dtype=np.int64)
        header[0] = len(names)
        chunks = []
        for i, name in enumerate(names):
            value = np.asarray(env[name], order="C")  # ascontiguousarray would make a scalar 1-D
            if value.dtype.name not in DTYPES or value.ndim > MAX_RANK:
                raise RankFailure(
                    f"{self.label}: cannot send '{name}' ({value.dtype}, rank {value.ndim}) to the "
                    f"next stage: dtypes {', '.join(DTYPES)} up to rank {MAX_RANK} travel."
                )
            at = 1 + i * (2 + MAX_RANK)
            header[at] = DTYPES.index(value.dtype.name)
            header[at + 1] = value.ndim
            header[at + 2 : at + 2 + value.ndim] = value.shape
            chunks.append(value.reshape(-1).view(np.uint8))
        peer = self.spec["send_to"]
        head = self._tensor(header)
        works = [(dist.isend(head, peer, tag=2 * k), head)]
        if sum(c.size for c in chunks):
            blob = self._tensor(np.concatenate(chunks)) if chunks else torch.empty(0, dtype=torch.uint8)
            works.append((dist.isend(blob, peer, tag=2 * k + 1), blob))
        return works

    def recv(self, k: int) -> dict[str, np.ndarray]:
        """Receive microbatch ``k``'s values from the previous stage."""
        import torch.distributed as dist

        names = self.spec.get("recv", [])
        peer = self.spec["recv_from"]
        what = f"receiving microbatch {k}"
        head = self._tensor(np.zeros(1 + len(names) * (2 + MAX_RANK), dtype=np.int64))
        self._wait(dist.irecv(head, peer, tag=2 * k), what, [peer])
        header = self._numpy(head)
        if header[0] != len(names):
            raise RankFailure(
                f"{self.label}: {rank_label(self.manifest, peer)} sent {header[0]} values for "
                f"microbatch {k}, the manifest lists {len(names)} ({', '.join(names)})."
            )
        layout = []
        for i in range(len(names)):
            at = 1 + i * (2 + MAX_RANK)
            layout.append(
                (np.dtype(DTYPES[header[at]]), tuple(int(d) for d in header[at + 2 : at + 2 + header[at + 1]]))
            )
        sizes = [int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for dtype, shape in layout]
        env: dict[str, np.ndarray] = {}
        blob = np.zeros(0, dtype=np.uint8)
        if sum(sizes):
            buffer = self._tensor(np.empty(sum(sizes), dtype=np.uint8))
            self._wait(dist.irecv(buffer, peer, tag=2 * k + 1), what, [peer])
            blob = self._numpy(buffer)
        offset = 0
        for name, (dtype, shape), size in zip(names, layout, sizes):
            env[name] = blob[offset : offset + size].view(dtype).reshape(shape)
            offset += size
        return env

    def all_reduce(self, value: np.ndarray, what: str) -> np.ndarray:
        import torch.distributed as dist

        members = self.spec["tp_group"]
        if len(members) == 1:
            return value
        tensor = self._tensor(value)
        self._wait(dist.all_reduce(tensor, group=self.groups[tuple(members)], async_op=True), what, members)
        return self._numpy(tensor)

    def all_gather(self, value: np.ndarray, axis: int, what: str) -> np.ndarray:
        import torch
        import torch.distributed as dist

        members = self.spec["tp_group"]
        if len(members) == 1:
            return value
        group = self.groups[tuple(members)]
        axis = axis % value.ndim
        # shards may differ in size along the axis (an uneven split): share the sizes, pad, gather, trim
        shape = self._tensor(np.array(value.shape, dtype=np.int64))
        shapes = [torch.zeros_like(shape) for _ in members]
        self._wait(dist.all_gather(shapes, shape, group=group, async_op=True), what, members)
        lengths = [int(self._numpy(s)[axis]) for s in shapes]
        padded = np.zeros([max(lengths) if a == axis else d for a, d in enumerate(value.shape)], dtype=value.dtype)
        padded[tuple(slice(0, d) for d in value.shape)] = value
        tensor = self._tensor(padded)
        parts = [torch.empty_like(tensor) for _ in members]
        self._wait(dist.all_gather(parts, tensor, group=group, async_op=True), what, members)
        pieces = [np.take(self._numpy(p), np.arange(n), axis=axis) for p, n in zip(parts, lengths)]
        return np.concatenate(pieces, axis=axis)

    def broadcast(self, value: np.ndarray, source: int, what: str) -> np.ndarray:
        """``value`` of rank ``source`` on every rank (the others pass a buffer of its shape and dtype)."""
        import torch.distributed as dist

        tensor = self._tensor(value)
        self._wait(dist.broadcast(tensor, src=source, async_op=True), what, [source])
        return self._numpy(tensor)

    def barrier(self, what: str) -> None:
        import torch.distributed as dist

        started = time.perf_counter()
        try:
            dist.monitored_barrier(group=self.control, timeout=self.delta, wait_all_ranks=True)
        except Exception as exc:
            raise self._comm_failure(exc, what, list(range(self.world))) from exc
        finally:
            self.comm_s += time.perf_counter() - started

    # -- schedule

    def run_microbatch(self, env: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
        for i, (step, engine) in enumerate(zip(self.spec.get("steps", []), self.engines)):
            if self.fault:
                self.fault.hit(self.rank, f"step{i}", k)
            what = f"step {i} {step['op']}"
            if step["op"] == "run":
                started = time.perf_counter()
                try:
                    env.update(engine.run({s.name: env[s.name] for s in engine.inputs}))
                except KeyError as exc:
                    raise RankFailure(f"{self.label}: step {i} needs '{exc.args[0]}', which no earlier step, "
                                      "input or receive provides.") from exc  # fmt: skip
                except AdapterError as exc:
                    raise RankFailure(f"{self.label}: step {i} ({step['engine']['folder']}) failed: {exc}") from exc
                self.engine_s += time.perf_counter() - started
            elif step["op"] == "all_reduce":
                env[step["output"]] = self.all_reduce(
                    env[step["input"]], f"{what} of '{step['input']}', microbatch {k}"
                )
            else:
                env[step["output"]] = self.all_gather(
                    env[step["input"]], int(step.get("axis", -1)), f"{what} of '{step['input']}', microbatch {k}"
                )
        return env

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """The GPipe schedule over this rank's microbatches; the model outputs on the writer rank."""
        self.microbatches = microbatch_count(self.manifest, inputs)
        slices = split_microbatches(inputs, self.manifest.get("batch_axis", {}), self.microbatches)
        pending: list[tuple[int, list[tuple[Any, Any]]]] = []
        collected: list[dict[str, np.ndarray]] = []
        for k in range(self.microbatches):
            env = dict(slices[k]) if self.spec.get("recv_from") is None else self.recv(k)
            env = self.run_microbatch(env, k)
            if self.spec.get("send_to") is not None:
                pending.append((k, self.send(env, k)))
                # at most two microbatches in flight: sending never runs far ahead of the next stage
                while len(pending) > 2:
                    self._finish_send(*pending.pop(0))
            if self.spec.get("outputs"):
                missing = [n for n in self.spec["outputs"] if n not in env]
                if missing:
                    raise RankFailure(f"{self.label}: the model output(s) {', '.join(missing)} were not produced.")
                collected.append({n: env[n] for n in self.spec["outputs"]})
        for k, works in pending:
            self._finish_send(k, works)
        if not collected:
            return None
        axes = self.manifest.get("batch_axis", {})
        return {n: np.concatenate([c[n] for c in collected], axis=axes.get(n, 0)) if len(collected) > 1
                else collected[0][n] for n in self.spec["outputs"]}  # fmt: skip

    def _finish_send(self, k: int, works: list[tuple[Any, Any]]) -> None:
        for work, _buffer in works:
            self._wait(work, f"sending microbatch {k}", [self.spec["send_to"]])

    def report(self, wall_s: float, error: RankFailure | None = None) -> dict[str, Any]:
        data = {
            "rank": self.rank,
            "stage": self.spec.get("stage", 0),
            "tp_rank": self.spec.get("tp_rank", 0),
            "ok": error is None,
            "wall_s": round(wall_s, 4),
            "load_s": round(self.load_s, 4),
            "engine_s": round(self.engine_s, 4),
            "comm_s": round(self.comm_s, 4),
            "microbatches": self.microbatches,
            "peak_rss_bytes": peak_rss_bytes(),  # VmHWM: ru_maxrss would count the launcher's peak too
            "pid": os.getpid(),
        }
        try:
            data["weights_bytes"] = weights_bytes(self.folder, self.manifest, self.rank)
        except AdapterError:
            data["weights_bytes"] = None
        if error is not None:
            data.update(error=str(error), kind=error.kind, waited_for=error.waited_for)
        return data


# --------------------------------------------------------------------------- entry point


def _write_report(report_dir: Path | None, data: dict[str, Any]) -> None:
    text = json.dumps(data)
    if report_dir is None:
        print(f"adapter-rank-report {text}", flush=True)
        return
    path = Path(report_dir) / f"rank{data['rank']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m adapter.runtime.worker", description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--inputs", type=Path, required=True, help="Model inputs (.npz).")
    parser.add_argument("--output", type=Path, required=True, help="Where the last stage writes the outputs (.npz).")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--timeout`` and ``--report-dir``, which every rank entry point takes."""
    parser.add_argument("--timeout", type=float, default=60.0, help="Seconds any wait may take (default 60).")
    parser.add_argument("--report-dir", type=Path, default=None, help="Write rank<r>.json here (default: stdout).")


@dataclass
class Job:
    """What a rank does once its engines are loaded and its peers have joined.

    ``prepare(manifest)`` runs first (before any engine loads: bad inputs fail fast),
    ``run(rank, prepared)`` runs the work and ``write(rank, result)`` runs after the final
    barrier (so no output appears unless every rank got through).
    """

    prepare: Callable[[dict[str, Any]], Any]
    run: Callable[[_Rank, Any], Any]
    write: Callable[[_Rank, Any], None]


def run_rank(args: argparse.Namespace, job: Job) -> None:
    """Run this process's rank (``RANK`` / ``WORLD_SIZE`` from torchrun's environment); never returns."""
    started = time.perf_counter()
    _die_with_parent()
    rank = int(os.environ.get("RANK", "-1"))
    world = int(os.environ.get("WORLD_SIZE", "0"))
    worker: _Rank | None = None
    try:
        if rank < 0 or world < 1:
            raise AdapterError(
                "This worker runs under torchrun (RANK and WORLD_SIZE are not set).",
                "Start it with `adapter launch ARTIFACT --nproc N`.",
            )
        manifest = read_sharded(args.artifact)
        if world != int(manifest["world_size"]):
            raise AdapterError(
                f"torchrun started {world} processes, the artifact '{args.artifact}' needs "
                f"world_size {manifest['world_size']}.",
                "Launch with a matching --nproc / --nnodes.",
            )
        fault = parse_fault(os.environ.get(FAULT_ENV))
        worker = _Rank(args.artifact, manifest, rank, args.timeout, fault)
        prepared = job.prepare(manifest)
        worker.load_engines()
        worker.init_group()
        worker.barrier("waiting for every rank to load its engines")
        result = job.run(worker, prepared)
        if fault:
            fault.hit(rank, "end")
        worker.barrier("waiting for every rank to finish")  # no output unless every rank got through
        job.write(worker, result)
        _write_report(args.report_dir, worker.report(time.perf_counter() - started))
    except Exception as exc:
        error = exc if isinstance(exc, RankFailure) else RankFailure(
            f"{worker.label if worker else f'rank {rank}'}: {exc}" if isinstance(exc, AdapterError)
            else f"{worker.label if worker else f'rank {rank}'}: internal error {type(exc).__name__}: {_first_line(exc)}"
        )  # fmt: skip
        sys.stderr.write(f"adapter: {error}\n")
        sys.stderr.flush()
        if worker is not None:
            _write_report(args.report_dir, worker.report(time.perf_counter() - started, error))
        elif rank >= 0:
            _write_report(args.report_dir, {"rank": rank, "ok": False, "error": str(error), "kind": "error"})
        os._exit(1)  # skip interpreter teardown: a broken process group can block in its destructor
    import torch.distributed as dist

    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # outputs and report are on disk; torch's interpreter teardown only costs seconds here


def main(argv: list[str] | None = None) -> int:
    """One rank of a forward pass over the sharded artifact."""
    args = _parse(argv)

    def write(worker: _Rank, outputs: dict[str, np.ndarray] | None) -> None:
        if outputs is not None and worker.spec.get("tp_rank", 0) == 0:
            save_outputs(args.output, outputs)

    run_rank(args, Job(lambda manifest: load_inputs(args.inputs, manifest), lambda w, inputs: w.run(inputs), write))
    return 0


if __name__ == "__main__":
    sys.exit(main())
