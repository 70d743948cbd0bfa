"""Every zoo model converted for every (target, backend) pair of the cross-target issue, checked cell by cell.

    python benchmarks/targets.py [--models minilm,gpt2,...] [--pairs arm-cortex-a76/edge,...]
                                 [--out build/targets] [--json build/targets.json] [--no-qemu] [--no-cache]
                                 [--in-process] [--expect-refused MODEL@TARGET/BACKEND,...]

Per cell (model x target/backend) this converts ``adapter.zoo:<model>`` with
``adapter.converter.api.convert`` into ``<out>/<model>-<target>-<backend>`` (no latency measurement)
and records:

- the outcome: ``ok``, ``refused`` (convert raised an ``AdapterError``; its message is kept:
  a refusal is a result, not a crash), ``failed`` (converted, but a check below did not
  hold) or ``crashed`` (any other exception, a signal or a timeout);
- seconds, whether the cache served the engine, and the stage timings of the manifest;
- verification: worst max-abs and cosine per output, what ran (``verified_with`` /
  ``engine_ran``: a stand-in when the engine is for another machine);
- the artifact's files and their total size;
- TVM: the kernel checks the manifest records (``backend.config.kernels``), and the same
  checks redone here with the tools (cuobjdump for cubin/fatbin, the ``amdhsa.target`` note
  for .hsaco, ``readelf -h`` for lib.so), compared with the target's architecture;
- TensorRT: whether an engine was built (the note saying why not) and that build.py,
  build.sh and profiles.json are there; MIGraphX: ort_providers.json and its providers;
- ARM64 targets (unless ``--no-qemu``): the artifact run on the emulated ARM64 machine
  (``adapter.backends._arm64``) on the zoo's example inputs, each output compared with
  eager PyTorch (the factory's module under ``torch.inference_mode``); it passes at
  cosine >= 0.9999 when the runner reports an aarch64 machine.

Each cell runs in its own Python process (a native crash in a compiler takes one cell, not
the run; its log lands in ``<out>/logs``); ``--in-process`` runs them here instead. The JSON
is rewritten after every cell. Exit status 1 when a cell that should work (all of them,
minus ``--expect-refused`` ones that were refused) is not ``ok``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from targets_report import ELF_MACHINES, fmt, report, summary

PAIRS = (
    "intel-xeon-spr/tvm",
    "arm-cortex-a76/edge",
    "arm-cortex-a76/tvm",
    "nvidia-a100/tvm",
    "nvidia-a100/tensorrt",
    "amd-mi300x/tvm",
    "amd-mi300x/migraphx",
)
ARM_TARGETS = ("arm-cortex-a76",)
"""Targets whose artifacts run on the emulated ARM64 machine."""
QEMU_MIN_COSINE = 0.9999
TENSORRT_RECIPE = ("build.py", "build.sh", "profiles.json")
TAIL = 4000


def _zoo_names() -> list[str]:
    from adapter.zoo import ZOO

    return list(ZOO)


def _cell_name(model: str, pair: str) -> str:
    target, backend = pair.split("/")
    return f"{model}-{target}-{backend}"


# ----------------------------------------------------------------------------------------------- one cell


def _files(folder: Path) -> tuple[dict[str, int], int]:
    sizes = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    return sizes, sum(sizes.values())


def _expected_machine(target: dict[str, Any]) -> str:
    """The CPU architecture lib.so's code is for: an ``llvm`` target's triple, else the GPU target's host."""
    spec = target if target.get("kind") == "llvm" else dict(target.get("host") or {})
    triple = str(spec.get("mtriple", "")) or platform.machine()
    return triple.split("-")[0]


def _kernel_checks(folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Redo TVM's kernel checks with the tools; compare with the target and with the manifest."""
    from adapter.backends import _tvm_rocm
    from adapter.backends.tvm import cuda_architectures, elf_machine

    target = dict(config.get("target") or {})
    kind = str(target.get("kind", ""))
    recorded = config.get("kernels") or {}
    checked: dict[str, Any] = {}
    problems: list[str] = []
    for name in config.get("files", []):
        path = folder / name
        try:
            if name.endswith((".cubin", ".fatbin")):
                found: Any = cuda_architectures(path)
                want = str(target.get("arch", ""))
                if want not in found["elf"]:
                    problems.append(f"{name}: SASS for {found['elf']}, not {want}")
            elif name.endswith(".hsaco"):
                found = _tvm_rocm.code_object_arch(path)
                want = str(target.get("mcpu", ""))
                if found != want:
                    problems.append(f"{name}: code object for {found}, not {want}")
            elif name == config.get("library", "lib.so"):
                found = elf_machine(path)
                want = ELF_MACHINES.get(_expected_machine(target), "")
                if want and found != want:
                    problems.append(f"{name}: ELF for {found}, not {want}")
            else:
                continue
        except Exception as exc:  # a tool missing or a file it cannot read: a figure too
            found = None
            problems.append(f"{name}: {exc}")
        checked[name] = found
        if name in recorded and recorded[name] != found:
            problems.append(f"{name}: manifest says {recorded[name]}, the tools say {found}")
    missing = sorted(set(recorded) - set(checked))
    if missing:
        problems.append(f"manifest lists kernels not in the files: {', '.join(missing)}")
    device = sorted(n for n in checked if n.endswith((".cubin", ".fatbin", ".hsaco")))
    if kind in ("cuda", "rocm") and not device:
        problems.append(f"no {kind} kernel files in the artifact")
    return {"kind": kind, "recorded": recorded, "checked": checked, "problems": problems, "ok": not problems}


def _eager_reference(model: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The factory's example inputs (as convert sees them) and the eager outputs, by output name."""
    import torch

    from adapter.converter.torch_export import broaden_examples, flatten_outputs, to_numpy
    from adapter.zoo import ZOO

    module, inputs, dynamic = ZOO[model]()
    inputs = broaden_examples(inputs, dynamic or {})
    with torch.inference_mode():
        result = module(**inputs)
    outputs = {name: to_numpy(t).copy() for name, t in flatten_outputs(result)}
    return {k: to_numpy(v).copy() for k, v in inputs.items()}, outputs


def _compare(got: np.ndarray, want: np.ndarray) -> dict[str, Any]:
    if got.shape != want.shape:
        return {
            "shape": list(want.shape),
            "problem": f"shape {list(got.shape)} vs {list(want.shape)}",
            "cosine": None,
            "max_abs": None,
            "passed": False,
        }
    a, e = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
    if not (np.isfinite(a).all() and np.isfinite(e).all()):
        return {
            "shape": list(want.shape),
            "problem": "NaN/Inf in the outputs",
            "cosine": None,
            "max_abs": None,
            "passed": False,
        }
    norm = float(np.linalg.norm(a) * np.linalg.norm(e))
    cosine = float(np.dot(a, e) / norm) if norm > 0 else float(np.array_equal(a, e))
    max_abs = float(np.max(np.abs(a - e))) if a.size else 0.0
    return {"shape": list(want.shape), "cosine": cosine, "max_abs": max_abs, "passed": cosine >= QEMU_MIN_COSINE}


def _qemu(model: str, folder: Path, manifest: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run the artifact on the emulated ARM64 machine and compare with eager PyTorch."""
    from adapter import load
    from adapter.backends import _arm64
    from adapter.core.specs import check_inputs

    started = time.perf_counter()
    engine = load(folder)
    inputs, expected = _eager_reference(model)
    names = [o["name"] for o in manifest["outputs"]]
    if set(names) != set(expected):
        raise RuntimeError(f"manifest outputs {names} are not the eager model's {sorted(expected)}")
    feed = check_inputs(engine.inputs, inputs)
    backend = manifest["backend"]["name"]
    if backend == "edge":
        spec = {
            "kind": "ort",
            "model": engine.config.get("ort_file", "model.ort"),
            "inputs": [s.name for s in engine.inputs],
            "outputs": names,
        }
        cpu = _arm64.qemu_cpu(engine.config.get("core"))
    elif backend == "tvm":
        spec = {
            "kind": "tvm",
            "model": engine.config.get("library", "lib.so"),
            "inputs": list(engine.config["input_order"]),
            "outputs": names,
        }
        cpu = _arm64.qemu_cpu(str(engine.config["target"].get("mcpu", "")) or None)
    else:
        raise RuntimeError(f"no emulated run defined for the {backend} backend")
    root = _arm64.ensure_rootfs(say=lambda line: print(line, flush=True))
    info: dict[str, Any] = {}
    outputs = _arm64.run_artifact(root, folder, spec, feed, timeout, cpu=cpu, info=info)
    per_output = {
        name: _compare(np.asarray(outputs[name]), expected[name])
        if name in outputs
        else {"problem": "missing from the run's outputs", "passed": False}
        for name in names
    }
    machine = info.get("machine")
    return {
        "spec": spec,
        "machine": machine,
        "info": info,
        "outputs": per_output,
        "min_cosine": QEMU_MIN_COSINE,
        "passed": machine == "aarch64" and all(o["passed"] for o in per_output.values()),
        "seconds": round(time.perf_counter() - started, 2),
    }


def run_cell(model: str, pair: str, out_root: Path, qemu: bool, use_cache: bool, qemu_timeout: float) -> dict:
    """Convert one model for one (target, backend) and check what came out; never raises."""
    from adapter.converter.api import ConvertOptions, convert
    from adapter.core.errors import AdapterError

    target, backend = pair.split("/")
    folder = out_root / _cell_name(model, pair)
    cell: dict[str, Any] = {"model": model, "target": target, "backend": backend, "output": str(folder)}
    started = time.perf_counter()
    options = ConvertOptions(target=target, backend=backend, benchmark=False, use_cache=use_cache)
    try:
        result = convert(f"adapter.zoo:{model}", folder, options)
    except AdapterError as exc:
        cell.update(
            status="refused",
            error=str(exc),
            error_type=type(exc).__name__,
            seconds=round(time.perf_counter() - started, 2),
        )
        return cell
    except Exception as exc:
        cell.update(
            status="crashed",
            error=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc()[-TAIL:],
            seconds=round(time.perf_counter() - started, 2),
        )
        return cell
    manifest = result.manifest
    verification = manifest.get("verification") or {}
    config = manifest["backend"]["config"]
    problems: list[str] = []
    cell.update(
        seconds=round(result.seconds, 2),
        cache_hit=result.cache_hit,
        cache_note=result.cache_note,
        timings_s=manifest.get("timings_s", {}),
        chosen_backend=manifest["backend"]["name"],
        verification={
            "passed": verification.get("passed"),
            "worst": verification.get("worst", {}),
            "verified_with": verification.get("verified_with", "the engine itself"),
            "engine_ran": verification.get("engine_ran", True),
            "tolerance": verification.get("tolerance"),
        },
    )
    if not verification.get("passed"):
        problems.append("verification did not pass")
    cell["files"], cell["bytes"] = _files(folder)
    if backend == "tvm":
        cell["kernels"] = _kernel_checks(folder, config)
        problems += cell["kernels"]["problems"]
    elif backend == "tensorrt":
        present = {name: (folder / name).is_file() for name in TENSORRT_RECIPE}
        cell["tensorrt"] = {
            "engine_built": bool(config.get("engine_built")),
            "note": config.get("note", ""),
            "recipe": present,
            "builder_flags": config.get("builder_flags"),
        }
        problems += [f"{name} missing" for name, there in present.items() if not there]
    elif backend == "migraphx":
        path = folder / "ort_providers.json"
        providers = json.loads(path.read_text()) if path.is_file() else None
        cell["migraphx"] = {
            "ort_providers.json": providers is not None,
            "providers": (providers or {}).get("providers"),
            "session_here": config.get("session_here"),
            "note": config.get("note", ""),
        }
        if providers is None:
            problems.append("ort_providers.json missing")
    if qemu and target in ARM_TARGETS:
        try:
            cell["qemu"] = _qemu(model, folder, manifest, qemu_timeout)
            if not cell["qemu"]["passed"]:
                worst = {k: v.get("cosine") for k, v in cell["qemu"]["outputs"].items()}
                problems.append(f"qemu run: machine {cell['qemu']['machine']}, cosine {worst}")
        except Exception as exc:
            cell["qemu"] = {"passed": False, "error": f"{type(exc).__name__}: {exc}"}
            problems.append(f"qemu run: {type(exc).__name__}: {exc}")
    cell["problems"] = problems
    cell["status"] = "ok" if not problems else "failed"
    return cell


# ----------------------------------------------------------------------------------------------- the matrix


def _isolated(model: str, pair: str, args: argparse.Namespace) -> dict:
    """Run one cell in a child Python; a crash, signal or timeout becomes a ``crashed`` cell."""
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    name = _cell_name(model, pair)
    result_file, log_file = logs / f"{name}.json", logs / f"{name}.log"
    result_file.unlink(missing_ok=True)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--cell",
        f"{model}@{pair}",
        "--cell-json",
        str(result_file),
        "--out",
        str(args.out),
        "--qemu-timeout",
        str(args.qemu_timeout),
    ]
    command += [] if args.qemu else ["--no-qemu"]
    command += [] if args.cache else ["--no-cache"]
    started = time.perf_counter()
    with open(log_file, "w") as log:
        try:
            rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=args.cell_timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    target, backend = pair.split("/")
    if result_file.is_file():
        cell = json.loads(result_file.read_text())
    else:
        tail = log_file.read_text(errors="replace")[-TAIL:]
        why = (
            f"timed out after {args.cell_timeout:.0f} s"
            if rc is None
            else (f"died with signal {-rc}" if rc < 0 else f"exited {rc} without a result")
        )
        cell = {
            "model": model,
            "target": target,
            "backend": backend,
            "status": "crashed",
            "error": f"the cell's process {why}",
            "log_tail": tail,
            "seconds": round(time.perf_counter() - started, 2),
        }
    cell["rc"] = rc
    cell["wall_seconds"] = round(time.perf_counter() - started, 2)
    cell["log"] = str(log_file)
    return cell


def _save(path: Path, args: argparse.Namespace, cells: list[dict], started: float, done: bool) -> None:
    from adapter.core.artifact import library_versions

    data = {
        "host": {
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "libraries": library_versions(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "finished": done,
        "seconds": round(time.perf_counter() - started, 1),
        "summary": summary(cells, set(args.expect_refused)),
        "cells": cells,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="all", help="zoo names, comma-separated, or 'all' (default)")
    parser.add_argument("--pairs", default=",".join(PAIRS), help="target/backend pairs, comma-separated")
    parser.add_argument("--out", type=Path, default=Path("build/targets"), help="folder of the cells' artifacts")
    parser.add_argument("--json", type=Path, default=Path("build/targets.json"))
    parser.add_argument("--no-qemu", dest="qemu", action="store_false", help="skip the emulated ARM64 runs")
    parser.add_argument("--no-cache", dest="cache", action="store_false", help="rebuild engines (no cache)")
    parser.add_argument("--in-process", action="store_true", help="run the cells in this process")
    parser.add_argument("--qemu-timeout", type=float, default=1800.0, help="seconds per emulated run")
    parser.add_argument("--cell-timeout", type=float, default=3600.0, help="seconds per isolated cell")
    parser.add_argument(
        "--expect-refused",
        type=_split,
        default=[],
        help="MODEL@TARGET/BACKEND cells whose refusal does not fail the run",
    )
    parser.add_argument("--report", type=Path, help="print the table of a saved JSON instead of running")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    parser.add_argument("--cell-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.cell:  # the child of an isolated run
        model, pair = args.cell.split("@")
        cell = run_cell(model, pair, args.out, args.qemu, args.cache, args.qemu_timeout)
        args.cell_json.write_text(json.dumps(cell, indent=1, default=str) + "\n")
        return 0

    from rich.console import Console

    console = Console(width=220)
    if args.report:
        saved = json.loads(args.report.read_text())
        expected = set(saved.get("args", {}).get("expect_refused") or [])
        return report(console, saved["cells"], expected, args.report, float(saved.get("seconds", 0)))

    zoo = _zoo_names()
    models = zoo if args.models == "all" else _split(args.models)
    pairs = _split(args.pairs)
    unknown = [m for m in models if m not in zoo] + [p for p in pairs if p not in PAIRS]
    if unknown:
        parser.error(
            f"unknown model or pair: {', '.join(unknown)} (models: {', '.join(zoo)}; pairs: {', '.join(PAIRS)})"
        )
    if args.qemu and any(p.split("/")[0] in ARM_TARGETS for p in pairs):
        from adapter.backends import _arm64

        print(f"arm64 root filesystem: {_arm64.ensure_rootfs()}", flush=True)

    started = time.perf_counter()
    cells: list[dict] = []
    todo = [(m, p) for m in models for p in pairs]
    for index, (model, pair) in enumerate(todo, 1):
        console.print(f"[{index}/{len(todo)}] {model} @ {pair} ...", highlight=False)
        if args.in_process:
            cell = run_cell(model, pair, args.out, args.qemu, args.cache, args.qemu_timeout)
            cell["rc"] = 0 if cell["status"] == "ok" else 1
        else:
            cell = _isolated(model, pair, args)
        cells.append(cell)
        console.print(
            f"    {cell['status']} in {fmt(cell.get('seconds'), '.1f')} s"
            + (f": {cell['error'][:300]}" if cell.get("error") else "")
            + (f": {'; '.join(cell['problems'])[:300]}" if cell.get("problems") else ""),
            highlight=False,
        )
        _save(args.json, args, cells, started, done=False)

    _save(args.json, args, cells, started, done=True)
    return report(console, cells, set(args.expect_refused), args.json, time.perf_counter() - started)


if __name__ == "__main__":
    sys.exit(main())
